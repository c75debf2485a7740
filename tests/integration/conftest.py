"""The API and edge in-process (aiohttp's test client), a real Redis, the simulated LLM on a real
port and arq burst workers: each piece real, without process management."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from streambridge.api.app import make_app
from streambridge.embedded import free_port, redis_server_binary
from streambridge.fake_llm import FakeLLMConfig
from streambridge.fake_llm import make_app as make_fake_llm
from streambridge.shared.events import Event, decode_event
from streambridge.shared.settings import Settings
from streambridge.sse import SSEMessage, SSEParser
from streambridge.workers.appender import Appender
from streambridge.workers.worker import make_worker

FAST_LLM = FakeLLMConfig(ttft_ms=0, delay_ms=0, words=12)


@pytest.fixture
async def closing_appenders(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Every Appender a test makes is closed with it, as a worker closes its own: its connection's
    socket, left open past the test's loop, would warn."""
    made: list[Appender] = []
    init = Appender.__init__

    def tracked(self: Appender, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(Appender, "__init__", tracked)
    yield
    for appender in made:
        await appender.close()


@pytest.fixture
async def llm_url() -> AsyncIterator[str]:
    server = TestServer(make_fake_llm(FAST_LLM, record=True))
    await server.start_server()
    yield str(server.make_url("/v1"))
    await server.close()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    # The suites here run many chats as one visitor from one address: the limits are tested on their own.
    return Settings(
        redis_url=redis_url,
        heartbeat_interval=0.2,
        retry_base_delay=0.01,
        max_body_bytes=64 * 1024,
        visitor_chats_per_minute=100_000,
        visitor_vendor_fields="*",
        visitor_max_running_chats=100_000,
        visitor_max_open_streams=100_000,
        max_open_streams_per_ip=100_000,
        visitor_logins_per_minute=100_000,
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    async with TestClient(TestServer(make_app(settings))) as client:
        yield client


RunWorker = Callable[[], Awaitable[None]]


@pytest.fixture
def run_worker(settings: Settings, llm_url: str) -> RunWorker:
    """Runs a burst worker until the queue is empty, as arq's own tests do: no sleeps."""

    async def run() -> None:
        worker = make_worker(settings, llm_url, burst=True, poll_delay=0)
        try:
            await worker.main()
        finally:
            await worker.close()

    return run


@pytest.fixture
async def token(client: TestClient) -> str:  # type: ignore[type-arg]
    response = await client.post("/v1/auth/visitor")
    assert response.status == 201
    return str((await response.json())["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def read_sse(response: ClientResponse) -> list[SSEMessage]:
    parser = SSEParser()
    messages: list[SSEMessage] = []
    async for chunk in response.content.iter_any():
        messages += parser.feed(chunk)
    return messages


def events_of(messages: list[SSEMessage]) -> list[Event]:
    return [decode_event(m.data) for m in messages]


def json_of(raw: bytes) -> dict[str, object]:
    value = msgspec.json.decode(raw)
    assert isinstance(value, dict)
    return value


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server that speaks TLS alone, on a certificate of its own; its port."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject],
        check=True,
        capture_output=True,
    )
    port = free_port()
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
    server = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no", "--save", "", *tls],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while server.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port
    server.terminate()
    server.wait(10)
