"""``streambridge.js`` used directly from a page (``client_page/``), in Chromium, against real processes."""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import pytest
import redis
from playwright.sync_api import Page, expect

from streambridge.fake_llm import expected_text
from streambridge.shared import keys
from tests.browser.conftest import Deployment, Shots, unique

pytestmark = pytest.mark.e2e

MODEL = "fake?words=30&delay_ms=5"


def open_test_page(page: Page, deployment: Deployment) -> None:
    page.goto(deployment.url + "/_test/index.html")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def call(page: Page, function: str, *args: Any) -> Any:
    return page.evaluate(f"(args) => window.{function}(...args)", list(args))


def test_callbacks_get_every_piece_once_over_fetch(page: Page, deployment: Deployment, shots: Shots) -> None:
    prompt = unique("callbacks")
    open_test_page(page, deployment)
    seen = call(page, "streamWithCallbacks", prompt, MODEL)
    shots(page, "callbacks-done")
    want = expected_text(prompt, 30)
    assert seen["content"] == want  # the pieces, joined
    assert seen["text"] == want  # the running text onContent is handed
    assert seen["result"] == {"status": "complete", "text": want, "length": len(want)}
    assert seen["status"][0] == "started"
    assert seen["connection"][:2] == ["connecting", "open"]
    assert seen["connection"][-1] == "closed"


def test_async_iteration_yields_every_event_in_order_over_eventsource(page: Page, deployment: Deployment) -> None:
    prompt = unique("iteration")
    open_test_page(page, deployment)
    got = call(page, "streamWithIteration", prompt, MODEL)
    want = expected_text(prompt, 30)
    assert got["text"] == want
    assert got["result"] == {"status": "complete", "text": want}
    assert got["ordered"]
    assert got["types"][0] == "started"
    assert got["types"][-1] == "complete"
    assert "content" in got["types"]


def test_an_abort_signal_stops_following_and_the_chat_can_be_followed_again(page: Page, deployment: Deployment) -> None:
    prompt = unique("abort")
    open_test_page(page, deployment)
    got = call(page, "abortAndFollow", prompt, "fake?words=40&delay_ms=20")
    want = expected_text(prompt, 40)
    assert got["aborted"]
    assert want.startswith(got["before"])
    assert got["whole"] == want


def test_errors_carry_the_servers_code(page: Page, deployment: Deployment) -> None:
    open_test_page(page, deployment)
    assert call(page, "followUnknownChat") == {"isError": True, "status": 404, "code": "not_found"}


def test_an_expired_history_is_a_clear_error_holding_the_final_result(page: Page, deployment: Deployment) -> None:
    prompt = unique("expired")
    open_test_page(page, deployment)
    chat = call(page, "chatToEnd", prompt, MODEL)
    with redis.Redis.from_url(deployment.redis_url) as client:
        assert client.delete(keys.events(chat["id"])) == 1  # as the stream's expiry would
    got = call(page, "followExpired", chat["id"], chat["token"])
    assert got["code"] == "stream_expired"
    assert got["status"] == 410
    assert "expired" in got["message"]
    assert (got["state"], got["content"]) == ("complete", expected_text(prompt, 30))


def events_requests(deployment: Deployment, chat_id: str) -> list[str]:
    return [r for r in deployment.proxy.requests if r.startswith(f"GET /v1/chats/{chat_id}/events")]


def test_a_reconnect_over_eventsource_sends_the_last_event_id_in_the_url(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # EventSource cannot set Last-Event-ID: the position must ride in ?last_event_id=, seen here at the proxy.
    prompt = unique("eventsource resume")
    open_test_page(page, deployment)
    chat_id = call(page, "startOverEventSource", prompt, "fake?words=60&delay_ms=30", 45_000)
    page.wait_for_function("() => window.runningText().length >= 30")
    deployment.proxy.cut()
    try:
        page.wait_for_function("() => window.runningStates().includes('reconnecting')")
        shots(page, "cut")
    finally:
        deployment.proxy.restore()
    got = call(page, "finishRunning")
    assert got["text"] == expected_text(prompt, 60)  # exact: nothing repeated, nothing lost
    assert got["reconnects"] >= 1
    sent = events_requests(deployment, chat_id)
    assert "last_event_id=" not in sent[0]  # the first connection starts at the beginning
    resumed = [r for r in sent[1:] if re.search(r"[?&]last_event_id=\d+-\d+(&|$)", r)]
    assert resumed, f"no reconnect carried its position: {sent}"


def test_a_chat_quiet_in_the_queue_past_the_read_timeout_keeps_its_eventsource_stream(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # The edge's `: ping` comments never reach EventSource's listeners: silence past the read
    # timeout (1 s here) makes the client ask the API, which says the chat still waits, so the
    # stream stays open: no reconnect, one events request.
    prompt = unique("quiet in the queue")
    live = [w for w in deployment.workers if w.proc.poll() is None]
    for worker in live:
        os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        open_test_page(page, deployment)
        chat_id = call(page, "startOverEventSource", prompt, "fake?words=5", 1000)
        page.wait_for_timeout(4500)  # four read timeouts in the queue
        shots(page, "quiet")
        asked = [r for r in deployment.proxy.requests if r == f"GET /v1/chats/{chat_id}"]
        assert len(asked) >= 2, "each silence asked the API whether the chat went on"
        assert call(page, "runningStates") == ["connecting", "open"]
    finally:
        for worker in live:
            os.kill(worker.proc.pid, signal.SIGCONT)
    got = call(page, "finishRunning")
    assert got["text"] == expected_text(prompt, 5)
    assert got["reconnects"] == 0
    assert got["states"] == ["connecting", "open", "closed"]
    assert len(events_requests(deployment, chat_id)) == 1
