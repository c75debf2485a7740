"""Log lines: JSON or text, the fields bound to a chat, and credentials scrubbed from every line."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

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


def written(out: io.StringIO) -> str:
    logs.flush()  # a thread writes the lines
    return out.getvalue()


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [msgspec.json.decode(line) for line in written(out).splitlines()]


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
    assert written(stream).rstrip().endswith("INFO streambridge.edge: stream opened [event=stream.opened]")


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
    assert "my secret prompt" not in written(stream)
    assert attempt["event"] == "attempt.failed"
    assert attempt["error"] == "LLM answered 400"
    assert end["event"] == "chat.failed"
    assert (end["error"], end["upstream_status"], end["error_code"]) == ("LLM answered 400", 400, "bad")

    logs.configure(role="worker", format="json", stream=stream, content=True)
    log_end("c1", ChatResult(status="complete", content="the answer", attempts=1), 0.5)
    assert lines(stream)[-1]["answer"] == "the answer"
    logs.configure(role="worker", format="json", stream=stream)


TOKEN = "sbv_0123456789abcdef_s3cr3t-t0ken"
QUOTED_SECRET = 'pa"ss\\word-with-escapes'


@pytest.mark.parametrize(
    ("message", "extra", "secret"),
    [
        (f"first line\nBearer {TOKEN.upper()}", {}, TOKEN.upper()),  # after a newline
        (f"a\tBearer {TOKEN}", {}, TOKEN),  # after a tab
        (f"line\n{TOKEN}", {}, "s3cr3t-t0ken"),
        (f"a\t{TOKEN}", {}, "s3cr3t-t0ken"),
        (f"the secret is {QUOTED_SECRET}", {}, QUOTED_SECRET),  # a '"' and a '\' in a configured secret
        ("a field", {"header": f"Bearer {TOKEN}"}, TOKEN),
        ("a field", {"url": "/e?x=1\n&token=tk-1234567890"}, "tk-1234567890"),
        ("bytes", {"body": f"Authorization: Bearer {TOKEN}".encode()}, TOKEN),  # not base64 of the token
        ("nested", {"request": {"headers": [f"Bearer {TOKEN}"]}}, TOKEN),
        ("an object", {"thing": ValueError(f"redis://u:hunter22pw@h/0 {TOKEN}")}, "hunter22pw"),
    ],
)
def test_credentials_are_scrubbed_wherever_they_sit_in_a_record(
    stream: io.StringIO, message: str, extra: dict[str, object], secret: str
) -> None:
    logs.configure(role="api", format="json", stream=stream, secrets=(QUOTED_SECRET,))
    logging.getLogger("x").info(message, extra=extra)
    text = written(stream)
    lines(stream)  # still one JSON line
    assert secret not in text
    assert secret not in msgspec.json.decode(text)["message"] + str(msgspec.json.decode(text))
    assert msgspec.json.encode(secret).decode()[1:-1] not in text  # nor JSON-escaped
    for extra_value in extra.values():
        if isinstance(extra_value, bytes):
            assert base64.b64encode(extra_value).decode()[:12] not in text


def test_a_token_in_a_traceback_is_scrubbed(stream: io.StringIO) -> None:
    logs.configure(role="api", format="json", stream=stream)
    try:
        raise ValueError(f"refused:\n\tBearer {TOKEN.upper()}\n{TOKEN}\n/e?token=tk-1234567890")
    except ValueError:
        logging.getLogger("x").exception("failed")
    text = written(stream)
    assert "s3cr3t-t0ken" not in text.lower()
    assert "tk-1234567890" not in text
    assert "ValueError: refused" in str(lines(stream)[0]["exc"])


def test_text_lines_escape_control_characters_so_none_is_forged(stream: io.StringIO) -> None:
    logs.configure(role="edge", format="text", stream=stream)
    forged = "/v1/\n2026-12-03 10:00:00,000 INFO streambridge.api: forged\r\x1b[2J"
    logging.getLogger("streambridge.edge").info("GET %s 404", forged, extra={"path": forged})
    try:
        raise ValueError(forged)
    except ValueError:
        logging.getLogger("streambridge.edge").exception("failed")
    text = written(stream)
    first, second, *traceback = text.splitlines()
    assert "\\n2026-12-03 10:00:00,000 INFO streambridge.api: forged\\r\\x1b[2J 404" in first
    assert second.endswith("ERROR streambridge.edge: failed")
    assert all(row.startswith("    ") for row in traceback), traceback  # a traceback's lines are indented
    assert not any(row.startswith("2026-12-03 10:00:00") for row in text.splitlines())
    assert "\x1b" not in text
    assert "\r" not in text


def test_a_warning_is_a_json_record(stream: io.StringIO) -> None:
    logging.captureWarnings(False)  # pytest restores showwarning after each test, not logging's own record of it
    logs.configure(role="worker", format="json", stream=stream)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.warn("something is deprecated", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    (line,) = lines(stream)
    assert "something is deprecated" in str(line["message"])


def test_every_line_logged_is_written_by_exit(tmp_path: Path) -> None:
    """A thread writes the lines: one logged just before the process exits is written still."""
    script = (
        "import logging, sys\n"
        "from streambridge.shared import logs\n"
        "logs.configure(role='api', format='json')\n"
        "for n in range(2000): logging.getLogger('x').info('line %d', n)\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert [msgspec.json.decode(line)["message"] for line in done.stderr.splitlines()] == [
        f"line {n}" for n in range(2000)
    ]


def test_openai_log_debug_lets_no_sdk_debug_line_through(tmp_path: Path) -> None:
    """``OPENAI_LOG=debug`` makes the SDK set its logger to DEBUG when it is imported (after the
    log is configured): its DEBUG lines stay out all the same, unless content may be logged."""
    script = (
        "import logging, sys\n"
        "from streambridge.shared import logs\n"
        "logs.configure(role='worker', level='DEBUG', format='json', content=sys.argv[1] == 'content')\n"
        "import openai\n"
        "logging.getLogger('openai._base_client').debug('Request options: %s', 'PROMPT-BODY')\n"
        "logging.getLogger('httpx').debug('HTTP Request: POST https://llm/v1?x=PROMPT-URL')\n"
        "logging.getLogger('httpcore.http11').debug('send_request_body PROMPT-BODY')\n"
        "logging.getLogger('openai').info('an info line stays')\n"
        "logging.getLogger('streambridge').debug('our own debug stays')\n"
    )
    env = {**os.environ, "OPENAI_LOG": "debug"}
    held = subprocess.run([sys.executable, "-c", script, "no"], env=env, capture_output=True, text=True, timeout=60)
    assert held.returncode == 0, held.stderr
    assert "PROMPT" not in held.stderr
    assert "an info line stays" in held.stderr
    assert "our own debug stays" in held.stderr
    shown = subprocess.run(
        [sys.executable, "-c", script, "content"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "PROMPT-BODY" in shown.stderr
