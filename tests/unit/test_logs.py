"""Log lines: JSON or text, the fields bound to a chat, and credentials scrubbed from every line."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import msgspec
import pytest

from streambridge.shared import logs
from streambridge.shared.chats import ChatResult
from streambridge.shared.events import Error
from streambridge.workers.runner import log_attempt, log_end


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [msgspec.json.decode(line) for line in out.getvalue().splitlines()]


def test_a_json_line_has_the_fields_bound_to_its_task_and_its_own(stream: io.StringIO) -> None:
    logs.configure(role="worker", format="json", stream=stream)

    async def chat() -> None:
        logs.bind(chat_id="c1", user="u1", trace_id="t" * 32)
        logs.bind(attempt=2)
        logging.getLogger("streambridge.worker").info("chat %s: done", "c1", extra={"event": "chat.complete"})

    asyncio.run(chat())
    logging.getLogger("streambridge.worker").warning("outside any chat")
    first, second = lines(stream)
    assert first["ts"].endswith("Z")
    assert "T" in first["ts"]
    assert {k: v for k, v in first.items() if k != "ts"} == {
        "level": "INFO",
        "logger": "streambridge.worker",
        "message": "chat c1: done",
        "role": "worker",
        "chat_id": "c1",
        "user": "u1",
        "trace_id": "t" * 32,
        "attempt": 2,
        "event": "chat.complete",
    }
    assert "chat_id" not in second


def test_a_traceback_stays_inside_its_json_line(stream: io.StringIO) -> None:
    logs.configure(role="api", format="json", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("streambridge.api").exception("failed")
    (line,) = lines(stream)
    assert "ValueError: boom" in str(line["exc"])


def test_text_lines_carry_the_fields_after_the_message(stream: io.StringIO) -> None:
    logs.configure(role="edge", format="text", stream=stream)
    logging.getLogger("streambridge.edge").info("stream opened", extra={"event": "stream.opened"})
    assert stream.getvalue().rstrip().endswith("INFO streambridge.edge: stream opened [event=stream.opened]")


def test_auto_is_json_when_stderr_is_not_a_terminal(stream: io.StringIO) -> None:
    logs.configure(role="api", format="auto", stream=stream)
    logging.getLogger("x").info("hello")
    assert lines(stream)[0]["message"] == "hello"
    assert logs.structured()


@pytest.mark.parametrize(
    ("said", "kept"),
    [
        ("GET /v1/chats/c/events?token=1700000000.cid.sig", "GET /v1/chats/c/events?token=[redacted]"),
        ("/x?a=1&api_key=sk-123456789", "/x?a=1&api_key=[redacted]"),
        ("https://llm/v1?api-key=AZKEY1234", "https://llm/v1?api-key=[redacted]"),
        ("/cb?access-token=at-987654321&x=1", "/cb?access-token=[redacted]&x=1"),
        ("/login?user=a&password=pw-1234567", "/login?user=a&password=[redacted]"),
        ("/x?auth=au-1234567", "/x?auth=[redacted]"),
        ("Authorization: Bearer sbv_0123456789abcdef_s3cr3t-t0ken", "Authorization: Bearer [redacted]"),
        ("key sbk_0123456789abcdef_Zm9vYmFyYmF6cXV4", "key sbk_0123456789abcdef_[redacted]"),
        ("redis://user:hunter22@redis:6379/0", "redis://user:[redacted]@redis:6379/0"),
        ("upstream said the-llm-api-key-value is wrong", "upstream said [redacted] is wrong"),
    ],
)
def test_credentials_are_scrubbed_from_every_line(stream: io.StringIO, said: str, kept: str) -> None:
    logs.configure(role="api", format="json", stream=stream, secrets=("the-llm-api-key-value", None, "short"))
    logging.getLogger("x").info(said)
    assert lines(stream)[0]["message"] == kept


def test_the_sdk_logs_no_request_bodies_unless_content_is_allowed(stream: io.StringIO) -> None:
    logs.configure(role="worker", level="DEBUG", format="json", stream=stream)
    assert not logging.getLogger("openai").isEnabledFor(logging.DEBUG)
    assert not logs.content_logged()
    logs.configure(role="worker", level="DEBUG", format="json", stream=stream, content=True)
    assert logging.getLogger("openai").isEnabledFor(logging.DEBUG)
    assert logs.content_logged()
    logs.configure(role="worker", format="json", stream=stream)


def test_an_upstream_error_is_logged_without_its_words_unless_content_is_allowed(stream: io.StringIO) -> None:
    said = "LLM answered 400: Invalid 'messages[0].content': 'my secret prompt' is too long"
    failed = ChatResult(status="failed", attempts=1, error=said, upstream_status=400, error_code="bad")
    logs.configure(role="worker", format="json", stream=stream)
    log_attempt(Error(message=said, retryable=False, attempt=1))
    log_end("c1", failed, 0.5)
    attempt, end = lines(stream)
    assert "my secret prompt" not in stream.getvalue()
    assert attempt["event"] == "attempt.failed"
    assert attempt["error"] == "LLM answered 400"
    assert end["event"] == "chat.failed"
    assert (end["error"], end["upstream_status"], end["error_code"]) == ("LLM answered 400", 400, "bad")

    logs.configure(role="worker", format="json", stream=stream, content=True)
    log_end("c1", ChatResult(status="complete", content="the answer", attempts=1), 0.5)
    assert lines(stream)[-1]["answer"] == "the answer"
    logs.configure(role="worker", format="json", stream=stream)
