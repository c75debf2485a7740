"""The repo's own nginx config (``deploy/nginx.conf``, as compose runs it) in front of two edges and the API.

Debian's nginx runs the very file, with compose's addresses replaced by this machine's ports
(``tests/e2e/nginx.py``); the processes behind it are started through the CLI. Events must pass
as the edge writes them, a stream must resume on the other edge through the proxy, and every
route must reach the process that serves it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from streambridge.fake_llm import expected_text
from streambridge.shared.events import Complete, assemble_text, decode_event
from streambridge.shared.streams import id_key
from streambridge.sse import SSEMessage, SSEParser
from tests.e2e.conftest import create_chat, login, read_events
from tests.e2e.nginx import Stack, host_port, start_stack

pytestmark = pytest.mark.e2e

#: the first text comes 300 ms after the chat starts (all three streams are open by then), the rest
#: over 400 ms more: a proxy that holds events back until its buffer fills or the answer ends shows
SLOW_START = "fake?ttft_ms=300&words=40&delay_ms=10"
CHATS = 9
#: how much later than the edge's own route the first event may arrive through nginx (median)
UNBUFFERED_MS = 5.0


#: visitor logins one client address may make a minute, here (the other tests log in from 127.0.0.1)
LOGINS = 8


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with start_stack(STREAMBRIDGE_VISITOR_LOGINS_PER_MINUTE=str(LOGINS)) as started:
        yield started


def events_path(chat_id: str) -> str:
    return f"/v1/chats/{chat_id}/events"


async def first_content_at(session: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> float:
    """``perf_counter()`` when the stream's first ``content`` event has arrived whole."""
    parser = SSEParser()
    async with session.get(url, headers=auth) as response:
        assert response.status == 200, await response.text()
        async for chunk in response.content.iter_any():
            if any(message.event == "content" for message in parser.feed(chunk)):
                return time.perf_counter()
    raise AssertionError(f"{url} ended without content")


async def test_events_pass_through_nginx_as_soon_as_the_edge_writes_them(stack: Stack) -> None:
    lags = []
    edges = [host_port(edge.url) for edge in stack.edges]
    async with aiohttp.ClientSession() as session:
        auth = await login(session, stack.url)
        for n in range(CHATS):
            chat = await create_chat(session, stack.url, auth, message=f"unbuffered {n}", model=SLOW_START)
            path = events_path(chat["id"])
            # both edges directly, and nginx: compared with the edge nginx passed the stream to
            *direct, proxied = await asyncio.gather(
                *(first_content_at(session, edge.url + path, auth) for edge in stack.edges),
                first_content_at(session, stack.url + path, auth),
            )
            [[served]] = stack.nginx.upstreams_of(path)
            lags.append((proxied - direct[edges.index(served)]) * 1000)
    median = statistics.median(lags)
    print(f"first event through nginx minus direct, ms: median {median:.2f}, each {[round(x, 2) for x in lags]}")
    assert median <= UNBUFFERED_MS, f"events wait in nginx: {median:.1f} ms later than direct (median)"


def check_delivery(messages: list[SSEMessage], prompt: str, words: int) -> None:
    ids = [id_key(m.id or "") for m in messages]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    assert ids == sorted(ids), "ids must strictly increase"
    events = [decode_event(m.data) for m in messages]
    assert isinstance(events[-1], Complete)
    assert assemble_text(events) == expected_text(prompt, words)


async def test_a_dropped_stream_resumes_through_nginx_on_the_other_edge_exactly_once(stack: Stack) -> None:
    prompt, words = f"resume behind nginx {time.monotonic_ns()}", 60
    async with aiohttp.ClientSession() as session:
        auth = await login(session, stack.url)
        chat = await create_chat(session, stack.url, auth, message=prompt, model=f"fake?words={words}&delay_ms=20")
        assert chat["stream_url"].startswith(stack.url + events_path(chat["id"]))  # clients follow it through nginx
        first = await read_events(session, chat["stream_url"], limit=8)  # then the connection drops
        [[served]] = stack.nginx.upstreams_of(events_path(chat["id"]))
        dead = [host_port(e.url) for e in stack.edges].index(served)
        stack.edges[dead].kill()  # the edge that served it is gone: nginx must pass the resume to the other
        try:
            rest = await read_events(
                session, stack.url + events_path(chat["id"]), {**auth, "Last-Event-ID": first[-1].id or ""}
            )
            check_delivery(first + rest, prompt, words)
            assert not any(m.event == "complete" for m in first), "the chat ended before the drop"
            tried = stack.nginx.upstreams_of(events_path(chat["id"]), count=2)[1]
            assert tried[-1] == host_port(stack.edges[1 - dead].url)
        finally:
            stack.restart_edge(dead)


async def test_nginx_logs_no_stream_token(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        auth = await login(session, stack.url)
        chat = await create_chat(session, stack.url, auth, message="token in the query", model="fake?words=3")
        url, _, token = chat["stream_url"].partition("?token=")
        assert url.startswith(stack.url)
        assert token
        events = await read_events(session, chat["stream_url"])  # the token in the query, as a browser sends it
        assert events[-1].event == "complete"
    assert stack.nginx.upstreams_of(events_path(chat["id"])), "nginx logged the stream's request"
    logged = stack.nginx.access_log.read_text() + stack.nginx.error_log.read_text()  # its stdout and stderr
    assert token not in logged
    assert token.rpartition(".")[2] not in logged  # nor the token's signature alone


async def test_each_route_reaches_the_process_that_serves_it(stack: Stack) -> None:
    edges = {host_port(edge.url) for edge in stack.edges}
    api = host_port(stack.api.url)

    def served_by(path: str, count: int = 1) -> str:
        """The process that answered the latest request to ``path`` through nginx (its access log)."""
        found = stack.nginx.upstreams_of(path, count)
        assert len(found) >= count, f"nginx logged no request to {path}"
        return found[-1][-1]

    async with aiohttp.ClientSession() as session:
        async with session.get(stack.url + "/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
        assert served_by("/") in edges
        async with session.get(stack.url + "/streambridge.js") as response:
            assert response.status == 200
            assert response.content_type == "text/javascript"
        assert served_by("/streambridge.js") in edges
        auth = await login(session, stack.url)
        assert served_by("/v1/auth/visitor") == api
        # OpenAI's streaming routes are an edge's (the API alone answers 404)
        body = {"model": "fake?words=5", "messages": [{"role": "user", "content": "openai"}], "stream": True}
        async with session.post(stack.url + "/v1/chat/completions", json=body, headers=auth) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "text/event-stream"
            text = await response.text()
        assert text.rstrip().endswith("data: [DONE]")
        assert served_by("/v1/chat/completions") in edges
        request = {"model": "fake?words=5", "input": "responses behind nginx"}
        async with session.post(stack.url + "/v1/responses", json=request, headers=auth) as response:
            assert response.status == 200, await response.text()
            created = await response.json()
        assert created["object"] == "response"
        assert served_by("/v1/responses") in edges
        async with session.get(f"{stack.url}/v1/responses/{created['id']}", headers=auth) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["id"] == created["id"]
        assert served_by(f"/v1/responses/{created['id']}") in edges
        async with session.get(stack.url + "/metrics") as response:
            assert response.status == 404  # scraped inside the deployment, never public
            assert (await response.json())["error"]["code"] == "not_found"


async def test_stream_url_is_the_address_the_client_used_and_its_scheme_is_nginxs(stack: Stack) -> None:
    # STREAMBRIDGE_PUBLIC_EDGE_URL is unset (as in compose): any name and port reach the streams through
    # nginx; a client's own X-Forwarded-Proto is replaced by nginx's (TLS ends in nginx, or not at all)
    host = f"localhost:{stack.nginx.port}"
    async with aiohttp.ClientSession() as session:
        auth = await login(session, stack.url)
        headers = {**auth, "Host": host, "X-Forwarded-Proto": "https"}
        async with session.post(
            stack.url + "/v1/chats", json={"message": "host", "model": "fake?words=5"}, headers=headers
        ) as response:
            assert response.status == 202, await response.text()
            chat = await response.json()
        assert chat["stream_url"].startswith(f"http://{host}/v1/chats/{chat['id']}/events?token=")
        events = await read_events(session, chat["stream_url"])
        assert events[-1].event == "complete"


async def answer_before_the_body(port: int, head: str) -> tuple[int, bytes, dict[str, object]]:
    """Send a request's head alone (its Content-Length promises a body never sent); the answer's
    status, head and JSON body, which must come within 5 s, before any of the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(
            next(line.split(b":")[1] for line in answer.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        )
        body = await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()
    return int(answer.split()[1]), answer, json.loads(body)


async def test_a_large_body_is_refused_before_it_is_sent(stack: Stack) -> None:
    # an upload nginx may take (200 MiB) goes on to the API as it comes: without a token, its 401
    # comes at once, and nginx has spooled nothing to disk
    status, _, body = await answer_before_the_body(
        stack.nginx.port,
        "POST /v1/files HTTP/1.1\nHost: nginx\nContent-Type: multipart/form-data; boundary=x\n"
        f"Content-Length: {200 * 1024 * 1024}\n",
    )
    assert status == 401
    assert body["error"]["code"] == "unauthorized"  # type: ignore[index]
    # anywhere else, a body above 2 MiB is nginx's 413 from its Content-Length alone
    status, head, body = await answer_before_the_body(
        stack.nginx.port,
        f"POST /v1/chats HTTP/1.1\nHost: nginx\nContent-Type: application/json\nContent-Length: {3 * 1024 * 1024}\n",
    )
    assert status == 413
    assert b"Content-Type: application/json" in head
    assert body["error"]["code"] == "payload_too_large"  # type: ignore[index]


async def test_the_proxys_own_errors_are_json_like_streambridges(stack: Stack) -> None:
    # a body over /v1/files's client_max_body_size: refused from its Content-Length alone, before any is sent
    status, head, body = await answer_before_the_body(
        stack.nginx.port, "POST /v1/files HTTP/1.1\nHost: nginx\nContent-Length: 300000000\n"
    )
    assert status == 413
    assert b"Content-Type: application/json" in head
    assert body["error"]["code"] == "payload_too_large"  # type: ignore[index]
    # no edge answers at all
    for edge in stack.edges:
        edge.kill()
    try:
        async with aiohttp.ClientSession() as session, session.get(stack.url + "/") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "unavailable"
    finally:
        for index in range(len(stack.edges)):
            stack.restart_edge(index)
        await until_nginx_passes_to_the_edges_again(stack)


async def until_nginx_passes_to_the_edges_again(stack: Stack) -> None:
    """nginx keeps a failed edge out for its fail_timeout (10 s): the next test needs them back in."""
    async with asyncio.timeout(20), aiohttp.ClientSession() as session:
        while True:
            async with session.get(stack.url + "/") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.2)


async def login_from(stack: Stack, address: str, forged: str | None = None) -> int:
    """A visitor login's status, from a client at ``address`` (127.0.0.N: every one reaches nginx),
    sending ``forged`` as its own X-Forwarded-For."""
    headers = {"X-Forwarded-For": forged} if forged else {}
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(stack.url + "/v1/auth/visitor", headers=headers) as response,
    ):
        return response.status


async def test_the_per_address_limits_count_each_client_behind_nginx_not_nginx(stack: Stack) -> None:
    many = [await login_from(stack, f"127.0.0.{10 + n}") for n in range(2 * LOGINS)]
    assert many == [201] * (2 * LOGINS), "clients behind nginx share one address's limit"


async def test_a_client_cannot_choose_its_address_with_x_forwarded_for(stack: Stack) -> None:
    # the processes trust all of 127.0.0.0/8 here, the client's address too: nginx alone must drop it
    forged = [await login_from(stack, "127.0.0.2", forged=f"127.0.0.{100 + n}") for n in range(LOGINS + 1)]
    assert forged == [201] * LOGINS + [429], "a forged X-Forwarded-For escaped the per-address limit"


def batch_line(custom_id: str, prompt: str) -> str:
    body = {"model": "fake?words=5", "messages": [{"role": "user", "content": prompt}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"


async def test_the_openai_sdk_streams_and_runs_a_batch_through_nginx(stack: Stack) -> None:
    prompt = f"sdk behind nginx {time.monotonic_ns()}"
    async with aiohttp.ClientSession() as session:
        auth = await login(session, stack.url)
        sdk = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=auth["Authorization"].removeprefix("Bearer "))
        try:
            # a streamed completion: an edge's route
            stream = await sdk.chat.completions.create(
                model="fake?words=12", messages=[{"role": "user", "content": prompt}], stream=True
            )
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
            assert text == expected_text(prompt, 12)
            # a batch: the upload and the progress stream are the API's
            data = "".join(batch_line(f"r{n}", f"{prompt} {n}") for n in range(3)).encode()
            uploaded = await sdk.files.create(file=("prompts.jsonl", data), purpose="batch")
            batch = await sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            events = await read_events(session, f"{stack.url}/v1/batches/{batch.id}/events", auth)
            assert sorted(json.loads(m.data)["custom_id"] for m in events if m.event == "item") == ["r0", "r1", "r2"]
            assert json.loads(events[-1].data)["status"] == "completed"
        finally:
            await sdk.close()
