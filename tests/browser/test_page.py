"""The chat page at ``/``, in Chromium, against real processes: the answer ends exact whatever happens on the way."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, expect

from streambridge.fake_llm import expected_text
from tests.browser.conftest import WAIT_MS, Deployment, Shots, unique


def freeze(pid: int, sig: signal.Signals) -> None:
    """SIGSTOP (or SIGCONT) a worker and its batch lane: the lane is a child process that runs
    batch items on its own, so a frozen worker alone still finishes a batch."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
    for process in [pid, *children]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, sig)


pytestmark = pytest.mark.e2e

# Long enough to be cut, reloaded or cancelled mid-answer (~4 s); short enough for a quick suite.
SLOW = "fake?words=60&delay_ms=30"
HOSTILE = (
    "<script>window.__pwned = 'script'</script> "
    "<img src=x onerror=\"window.__pwned = 'img'\"> "
    "<a href=\"javascript:window.__pwned = 'link'\">click me</a> "
    "<iframe src=\"javascript:parent.__pwned = 'frame'\"></iframe> **bold** & &amp; done"
)


def open_page(page: Page, deployment: Deployment) -> None:
    page.goto(deployment.url + "/")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")


def ask(page: Page, prompt: str, model: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#options summary")
    page.fill("#model", model)
    page.click("#send")


def wait_for_some_text(page: Page, chars: int = 30) -> None:
    expect(page.locator("#answer")).to_have_text(re.compile(rf"^[\s\S]{{{chars},}}"))


def answer(page: Page) -> str:
    return page.locator("#answer").text_content() or ""


def entry(event_id: str) -> tuple[int, int]:
    """A stream entry id ("ms-seq") as numbers, to compare positions."""
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def saved_chat(page: Page) -> dict[str, Any]:
    """The page's stored chat, once it holds a position (it is written at most every 250 ms)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        raw = page.evaluate("sessionStorage.getItem('streambridge:chat')")
        saved: dict[str, Any] = json.loads(raw) if raw else {}
        if saved.get("lastEventId") or time.monotonic() > deadline:
            assert saved.get("lastEventId"), f"the page stored no position: {raw}"
            return saved
        page.wait_for_timeout(50)  # polled: the page's policy forbids the eval wait_for_function needs


def test_the_page_streams_the_whole_answer_exactly(page: Page, deployment: Deployment, shots: Shots) -> None:
    prompt = unique("hello from the page")
    open_page(page, deployment)
    shots(page, "idle")
    ask(page, prompt, "fake?words=40&delay_ms=15")
    wait_for_some_text(page, 10)
    shots(page, "streaming")
    expect(page.locator("body")).to_have_attribute("data-state", "complete")
    shots(page, "complete")
    assert answer(page) == expected_text(prompt, 40)
    expect(page.locator("#status")).to_contain_text("done:")
    assert page.errors == []  # type: ignore[attr-defined]
    assert page.evaluate("window.__violations") == []


def test_a_network_cut_mid_answer_resumes_and_ends_exact(page: Page, deployment: Deployment, shots: Shots) -> None:
    prompt = unique("a flaky network")
    open_page(page, deployment)
    ask(page, prompt, SLOW)
    wait_for_some_text(page)
    deployment.proxy.cut()  # every connection dropped, new ones refused …
    page.context.set_offline(True)  # … and the browser knows it is offline
    # reconnecting, and at once offline: the browser says so (the client still tries every 10 s)
    expect(page.locator("body")).to_have_attribute("data-connection", "offline")
    expect(page.locator("#connection")).to_contain_text("offline")
    shots(page, "cut")
    assert expected_text(prompt, 60).startswith(answer(page))
    page.context.set_offline(False)
    deployment.proxy.restore()
    expect(page.locator("body")).to_have_attribute("data-state", "complete")
    shots(page, "restored-complete")
    assert answer(page) == expected_text(prompt, 60)


def test_an_edge_sigkilled_mid_answer_is_passed_over_and_the_answer_ends_exact(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    prompt = unique("an edge dies")
    open_page(page, deployment)
    ask(page, prompt, SLOW)
    wait_for_some_text(page)
    shots(page, "before-kill")
    deployment.edges[0].kill()  # the proxy's first choice: this page's stream runs through it
    try:
        expect(page.locator("body")).to_have_attribute("data-state", "complete")
        shots(page, "complete-on-the-other-edge")
        assert answer(page) == expected_text(prompt, 60)
    finally:
        deployment.replace_edge(0)


def test_a_worker_lost_mid_answer_shows_and_the_answer_ends_exact(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    prompt = unique("a worker dies")
    doomed = deployment.workers[0]
    spare = deployment.replace_worker()  # started now (slow on a busy machine), frozen until the crash …
    freeze(spare.proc.pid, signal.SIGSTOP)  # … so that the doomed one takes the chat
    try:
        open_page(page, deployment)
        ask(page, prompt, SLOW)
        wait_for_some_text(page)
    finally:
        freeze(spare.proc.pid, signal.SIGCONT)
    doomed.kill()
    deployment.workers.remove(doomed)
    page.click("#history-box summary")
    expect(page.locator("#history")).to_contain_text("worker lost")
    expect(page.locator("body")).to_have_attribute("data-state", "complete")
    shots(page, "complete-after-worker-lost")
    expect(page.locator("#history")).to_contain_text("running: attempt 2")
    assert answer(page) == expected_text(prompt, 60)  # attempt 2's text, the first's superseded


def test_a_reload_mid_answer_resumes_the_same_chat_and_ends_exact(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    prompt = unique("reload me")
    open_page(page, deployment)
    ask(page, prompt, "fake?words=60&delay_ms=80")  # ~10 s: surely still streaming at the reload
    wait_for_some_text(page)
    saved = saved_chat(page)
    shots(page, "before-reload")
    before = len(deployment.proxy.last_event_ids)
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-resumed", "true")
    shots(page, "resumed")
    expect(page.locator("#question")).to_have_text(prompt)  # the same chat, not a new one
    expect(page.locator("body")).to_have_attribute("data-chat", saved["id"])
    expect(page.locator("body")).to_have_attribute("data-state", "complete")
    shots(page, "complete")
    assert answer(page) == expected_text(prompt, 60)
    assert page.evaluate("sessionStorage.getItem('streambridge:chat')") is None  # ended: nothing left to resume
    # the page asked for the events after the position it had saved, not from the start
    path = f"GET /v1/chats/{saved['id']}/events"
    after = [(r, h) for r, h in deployment.proxy.last_event_ids[before:] if r.startswith(path)]
    assert after, deployment.proxy.requests[before:]
    request, header = after[0]
    position = header or parse_qs(urlsplit(request.split(" ", 1)[1]).query).get("last_event_id", [None])[0]
    assert position is not None, after
    assert entry(position) >= entry(saved["lastEventId"]), (position, saved["lastEventId"])


def test_cancel_stops_the_chat(page: Page, deployment: Deployment, shots: Shots) -> None:
    prompt = unique("cancel me")
    open_page(page, deployment)
    ask(page, prompt, "fake?words=400&delay_ms=30")
    wait_for_some_text(page)
    page.click("#cancel")
    expect(page.locator("body")).to_have_attribute("data-state", "cancelled")
    shots(page, "cancelled")
    expect(page.locator("#status")).to_have_text("cancelled")
    whole = expected_text(prompt, 400)
    assert whole.startswith(answer(page))
    assert len(answer(page)) < len(whole)
    expect(page.locator("#send")).to_be_enabled()


def test_a_failed_chat_shows_its_error(page: Page, deployment: Deployment, shots: Shots) -> None:
    open_page(page, deployment)
    ask(page, unique("this one fails"), "fake?fail=500")
    expect(page.locator("body")).to_have_attribute("data-state", "failed")
    shots(page, "failed")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("The chat failed")


def test_markup_in_an_answer_is_shown_as_text_and_never_runs(page: Page, deployment: Deployment, shots: Shots) -> None:
    open_page(page, deployment)
    ask(page, HOSTILE, "fake?echo=1&delay_ms=5")  # the simulated LLM answers with the prompt itself
    expect(page.locator("body")).to_have_attribute("data-state", "complete")
    shots(page, "hostile-answer")
    assert answer(page) == HOSTILE
    assert page.locator("#answer *").count() == 0  # not one element made from it
    assert page.locator("#question *").count() == 0
    page.get_by_text("click me").first.click()  # were it a link, this would run it
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("window.__violations") == []  # nothing even tried to load
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_queued_chat_shows_its_place_in_the_queue_and_moves_up(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # No worker free: the workers are frozen (SIGSTOP), so chats wait; one queued through the API
    # first (another user's, as far as the page knows) is ahead of the page's.
    live = [w for w in deployment.workers if w.proc.poll() is None]
    for worker in live:
        freeze(worker.proc.pid, signal.SIGSTOP)
    try:
        token = page.request.post(deployment.url + "/v1/auth/visitor").json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        ahead = page.request.post(deployment.url + "/v1/chats", data={"message": "ahead"}, headers=auth).json()["id"]
        place = page.request.get(f"{deployment.url}/v1/chats/{ahead}", headers=auth).json()["queue_position"]
        open_page(page, deployment)
        ask(page, unique("wait in line"), "fake?words=5")
        body = page.locator("body")
        expect(body).to_have_attribute("data-queue-position", str(place + 1))
        expect(page.locator("#status")).to_have_text(f"queued — position {place + 1}")
        shots(page, "queued")
        page.request.post(f"{deployment.url}/v1/chats/{ahead}/cancel", headers=auth)
        expect(body).to_have_attribute("data-queue-position", str(place))  # the next poll sees it move up
        expect(page.locator("#status")).to_have_text(f"queued — position {place}")
        shots(page, "moved-up")
    finally:
        for worker in live:
            freeze(worker.proc.pid, signal.SIGCONT)
    expect(body).to_have_attribute("data-state", "complete")
    expect(body).not_to_have_attribute("data-queue-position", re.compile(".*"))
    shots(page, "complete")
    page.click("#history-box summary")
    expect(page.locator("#history")).to_contain_text(f"queued — position {place + 1}")
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_file_of_prompts_runs_as_a_batch_with_live_progress_and_its_results_download(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # Plain text, one prompt a line (a blank line skipped, as the CLI does): the page makes the
    # batch lines, custom_id `line-N` by line number.
    prompts = [unique(f"batch prompt {n}") for n in range(4)]
    lines = [prompts[0], prompts[1], "", prompts[2], prompts[3]]
    text = "\n".join(lines) + "\n"
    open_page(page, deployment)
    page.click("#options summary")
    page.fill("#model", "fake?words=8&delay_ms=5")  # the Options model names the batch's model too
    page.set_input_files(
        "#batch-file", files=[{"name": "prompts.txt", "mimeType": "text/plain", "buffer": text.encode()}]
    )
    shots(page, "chosen")
    page.click("#batch-start")
    section = page.locator("#batches")
    expect(section).to_have_attribute("data-state", "completed")
    expect(section).to_have_attribute("data-downloads", "ready")
    shots(page, "completed")
    expect(page.locator("#batch-counts")).to_have_text("4 / 4 done — 4 completed, 0 failed")
    assert page.locator("#batch-progress").evaluate("p => [p.value, p.max]") == [4, 4]
    expect(page.locator("#batch-status")).to_have_text(re.compile(r"^batch_\S+: completed$"))
    expect(page.locator("#batch-errors")).to_be_hidden()  # nothing failed: no error file
    with page.expect_download() as info:
        page.click("#batch-results")
    results = [json.loads(line) for line in info.value.path().read_text().splitlines()]
    assert len(results) == 4
    got = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in results}
    wanted = {f"line-{n}": expected_text(lines[n - 1], 8) for n in (1, 2, 4, 5)}
    assert got == wanted  # one line per prompt, each the simulated LLM's text for it
    assert page.errors == []  # type: ignore[attr-defined]
    assert page.evaluate("window.__violations") == []


def test_a_batch_followed_through_a_network_cut_resumes_its_progress_and_completes(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # The workers frozen (SIGSTOP): the batch waits in_progress while the network is cut, so the
    # cut surely falls before its end; the page reconnects after its last event (Last-Event-ID).
    prompts = [unique(f"batch through a cut {n}") for n in range(3)]
    live = [w for w in deployment.workers if w.proc.poll() is None]
    for worker in live:
        freeze(worker.proc.pid, signal.SIGSTOP)
    section = page.locator("#batches")
    try:
        open_page(page, deployment)
        page.click("#options summary")
        page.fill("#model", "fake?words=5")
        text = "\n".join(prompts).encode()
        page.set_input_files("#batch-file", files=[{"name": "cut.txt", "mimeType": "text/plain", "buffer": text}])
        page.click("#batch-start")
        expect(page.locator("#batch-status")).to_have_text(re.compile(r": in_progress$"))
        deployment.proxy.cut()
        expect(section).to_have_attribute("data-reconnects", re.compile(r"^\d+$"))
        expect(section).to_have_attribute("data-last-delay", re.compile(r"^\d+$"))  # the jittered backoff
        shots(page, "cut")
        deployment.proxy.restore()
    finally:
        deployment.proxy.restore()
        for worker in live:
            freeze(worker.proc.pid, signal.SIGCONT)
    expect(section).to_have_attribute("data-state", "completed")
    shots(page, "completed-after-the-cut")
    expect(page.locator("#batch-counts")).to_have_text("3 / 3 done — 3 completed, 0 failed")
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_batch_followed_through_a_reload_is_followed_again_after_its_last_event(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # The workers frozen: the batch is surely in_progress at the reload, with events seen before it.
    prompts = [unique(f"batch through a reload {n}") for n in range(3)]
    live = [w for w in deployment.workers if w.proc.poll() is None]
    for worker in live:
        freeze(worker.proc.pid, signal.SIGSTOP)
    section = page.locator("#batches")
    try:
        open_page(page, deployment)
        page.click("#options summary")
        page.fill("#model", "fake?words=5")
        text = "\n".join(prompts).encode()
        page.set_input_files("#batch-file", files=[{"name": "reload.txt", "mimeType": "text/plain", "buffer": text}])
        page.click("#batch-start")
        expect(page.locator("#batch-status")).to_have_text(re.compile(r": in_progress$"))
        batch_id = section.get_attribute("data-batch")
        # the status can show before the events stream's first event has arrived (a loaded host)
        page.wait_for_function("() => JSON.parse(sessionStorage.getItem('streambridge:batch'))?.lastEventId")
        saved = page.evaluate("JSON.parse(sessionStorage.getItem('streambridge:batch'))")
        assert saved["id"] == batch_id
        assert saved["lastEventId"], saved
        page.reload()
        expect(section).to_have_attribute("data-resumed", "true")
        expect(section).to_have_attribute("data-batch", batch_id or "")
        expect(section).to_have_attribute("data-state", "running")
        shots(page, "batch-followed-again-after-reload")
    finally:
        for worker in live:
            freeze(worker.proc.pid, signal.SIGCONT)
    expect(section).to_have_attribute("data-state", "completed")
    expect(page.locator("#batch-counts")).to_have_text("3 / 3 done — 3 completed, 0 failed")
    shots(page, "batch-completed-after-reload")
    streams = [(r, h) for r, h in deployment.proxy.last_event_ids if r.startswith(f"GET /v1/batches/{batch_id}/events")]
    assert streams[0][1] is None
    assert streams[-1][1] is not None, streams
    assert entry(streams[-1][1]) >= entry(saved["lastEventId"]), streams  # after the last event seen
    assert page.evaluate("sessionStorage.getItem('streambridge:batch')") is None  # ended: nothing left
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_batch_cancelled_from_the_page_ends_cancelled(page: Page, deployment: Deployment, shots: Shots) -> None:
    # The workers frozen: no item runs before the cancel, so the batch surely ends cancelled.
    live = [w for w in deployment.workers if w.proc.poll() is None]
    for worker in live:
        freeze(worker.proc.pid, signal.SIGSTOP)
    try:
        open_page(page, deployment)
        text = "\n".join(unique(f"never run {n}") for n in range(3)).encode()
        page.set_input_files("#batch-file", files=[{"name": "stop.txt", "mimeType": "text/plain", "buffer": text}])
        page.click("#batch-start")
        expect(page.locator("#batch-status")).to_have_text(re.compile(r": in_progress$"))
        page.click("#batch-cancel")
        expect(page.locator("#batch-status")).to_have_text(re.compile(r": cancell(ing|ed)$"))
    finally:
        for worker in live:
            freeze(worker.proc.pid, signal.SIGCONT)
    expect(page.locator("#batches")).to_have_attribute("data-state", "cancelled")
    shots(page, "cancelled")
    expect(page.locator("#batch-start")).to_be_enabled()
    expect(page.locator("#batch-cancel")).to_be_disabled()
    assert page.errors == []  # type: ignore[attr-defined]


UNAUTHORIZED = json.dumps({"error": {"code": "unauthorized", "message": "expired", "type": None, "param": None}})


def batch_line(custom_id: str, prompt: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def choose_batch_file(page: Page, name: str, text: str) -> None:
    chosen = {"name": name, "mimeType": "application/jsonl", "buffer": text.encode()}
    page.set_input_files("#batch-file", files=[chosen])


def downloaded(page: Page, link: str) -> list[dict[str, Any]]:
    with page.expect_download() as info:
        page.click(link)
    return [json.loads(line) for line in info.value.path().read_text().splitlines()]


def test_a_jsonl_batch_with_a_refused_line_offers_its_results_and_its_error_file(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # OpenAI batch JSONL, sent as given; one line the simulated LLM refuses (an unknown option: a 400).
    good = {f"ok-{n}": unique(f"jsonl prompt {n}") for n in range(2)}
    lines = [batch_line(cid, prompt, "fake?words=6") for cid, prompt in good.items()]
    lines.insert(1, batch_line("refused", "x", "fake?no_such_option=1"))
    open_page(page, deployment)
    choose_batch_file(page, "requests.jsonl", "\n".join(lines) + "\n")
    page.click("#batch-start")
    section = page.locator("#batches")
    expect(section).to_have_attribute("data-state", "completed")
    expect(section).to_have_attribute("data-downloads", "ready")
    shots(page, "completed-with-a-failure")
    expect(page.locator("#batch-counts")).to_have_text("3 / 3 done — 2 completed, 1 failed")
    expect(page.locator("#batch-errors")).to_be_visible()
    batch_id = section.get_attribute("data-batch")
    assert page.locator("#batch-errors").get_attribute("download") == f"{batch_id}-errors.jsonl"
    results = downloaded(page, "#batch-results")
    got = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in results}
    assert got == {cid: expected_text(prompt, 6) for cid, prompt in good.items()}
    errors = downloaded(page, "#batch-errors")
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("refused", 400)]
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_401_about_a_running_batch_ends_its_view_without_swapping_the_pages_visitor(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # The batch belongs to the visitor that made it: a new visitor could never see it (404), and
    # making one would lose the page's own chats too. The first events request answers 401 here.
    refused: list[str] = []

    def expire_once(route: Any) -> None:
        if refused:
            route.continue_()
            return
        refused.append(route.request.url)
        route.fulfill(status=401, content_type="application/json", body=UNAUTHORIZED)

    page.route(re.compile(r"/v1/batches/[^/]+/events$"), expire_once)
    open_page(page, deployment)
    choose_batch_file(page, "one.txt", unique("expired owner") + "\n")
    page.click("#batch-start")
    section = page.locator("#batches")
    expect(section).to_have_attribute("data-state", "error")
    shots(page, "session-expired")
    assert refused
    expect(page.locator("#batch-error")).to_contain_text("session has expired")
    token = page.evaluate("sessionStorage.getItem('streambridge:token')")
    assert token
    asked = deployment.url + "/v1/batches/" + (section.get_attribute("data-batch") or "")
    owner = page.request.get(asked, headers={"Authorization": f"Bearer {token}"})
    assert owner.status == 200, "the page's visitor is still the batch's owner"


def test_a_401_while_starting_a_batch_makes_one_new_visitor_who_runs_it(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # The page's policy, as for a chat: a kept visitor token that no longer works is replaced once.
    open_page(page, deployment)
    page.evaluate("fetch('/v1/auth/visitor', {method: 'POST'})")  # warm the API
    uploads: list[str] = []

    def expire_first_upload(route: Any) -> None:
        uploads.append(route.request.headers.get("authorization", ""))
        if len(uploads) == 1:
            route.fulfill(status=401, content_type="application/json", body=UNAUTHORIZED)
        else:
            route.continue_()

    page.route(re.compile(r"/v1/files$"), expire_first_upload)
    choose_batch_file(page, "one.txt", unique("new visitor") + "\n")
    page.click("#batch-start")
    section = page.locator("#batches")
    expect(section).to_have_attribute("data-state", "completed")
    shots(page, "completed-under-a-new-visitor")
    assert len(uploads) == 2
    assert uploads[0] != uploads[1]  # the upload went again, as the new visitor


def test_an_older_batchs_links_never_show_in_a_newer_batchs_view(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # Batch A ends; its files are still being fetched (held here) when batch B is started. When
    # A's files arrive, they belong to a view that is gone: B's view must not show them.
    held: list[Any] = []

    def hold_the_first(route: Any) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route(re.compile(r"/v1/files/[^/]+/content$"), hold_the_first)
    open_page(page, deployment)
    page.click("#options summary")
    page.fill("#model", "fake?words=4")
    section = page.locator("#batches")
    choose_batch_file(page, "a.txt", unique("batch a") + "\n")
    page.click("#batch-start")
    expect(section).to_have_attribute("data-downloads", "pending")
    first = section.get_attribute("data-batch")
    while not held:
        page.wait_for_timeout(50)
    live = [w for w in deployment.workers if w.proc.poll() is None]
    for worker in live:  # B stays running while A's answer arrives
        freeze(worker.proc.pid, signal.SIGSTOP)
    try:
        choose_batch_file(page, "b.txt", unique("batch b") + "\n")
        page.click("#batch-start")
        expect(page.locator("#batch-status")).to_have_text(re.compile(r": in_progress$"))
        second = section.get_attribute("data-batch")
        assert second != first
        with page.expect_response(held[0].request.url):
            held[0].continue_()  # A's results arrive now …
        expect(section).to_have_attribute("data-dropped", first or "")  # … and the page dropped them
        shots(page, "b-running-after-a-answered")
        expect(page.locator("#batch-results")).to_be_hidden()
        expect(page.locator("#batch-errors")).to_be_hidden()
        expect(section).to_have_attribute("data-state", "running")
    finally:
        for worker in live:
            freeze(worker.proc.pid, signal.SIGCONT)
    expect(section).to_have_attribute("data-state", "completed")
    expect(section).to_have_attribute("data-downloads", "ready")
    shots(page, "b-completed")
    assert page.locator("#batch-results").get_attribute("download") == f"{second}-results.jsonl"
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_chat_waiting_in_the_queue_past_the_read_timeout_never_shows_reconnecting(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # The page follows its chat over EventSource, which never shows the edge's `: ping` comments:
    # a wait in the queue past the client's 45 s read timeout must not be taken for a dead stream.
    live = [w for w in deployment.workers if w.proc.poll() is None]
    for worker in live:
        freeze(worker.proc.pid, signal.SIGSTOP)
    body = page.locator("body")
    page.clock.install()  # the page's timers: 48 s pass in an instant, its network stays real
    try:
        open_page(page, deployment)
        prompt = unique("a long wait in line")
        ask(page, prompt, "fake?words=5")
        expect(body).to_have_attribute("data-queue-position", re.compile(r"^\d+$"))
        for _ in range(48):  # a second at a time, so what each timer starts (a request) can answer
            page.clock.fast_forward(1_000)
            page.wait_for_timeout(20)
        shots(page, "still-queued-after-48s")
        assert body.get_attribute("data-connection") == "open"
    finally:
        for worker in live:
            freeze(worker.proc.pid, signal.SIGCONT)
    expect(body).to_have_attribute("data-state", "complete")
    shots(page, "complete")
    assert answer(page) == expected_text(prompt, 5)
    page.click("#history-box summary")
    expect(page.locator("#history")).not_to_contain_text("reconnecting")
    chat_id = body.get_attribute("data-chat")
    streams = [r for r in deployment.proxy.requests if r.startswith(f"GET /v1/chats/{chat_id}/events")]
    assert len(streams) == 1, streams


def sse(entry: str, kind: str, **data: Any) -> str:
    return f"id: {entry}\nevent: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


def test_a_superseded_attempts_text_leaves_the_page_when_the_next_has_none(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # Attempt 1 streams text and its worker is lost; attempt 2 answers with a tool call only. The
    # page must not go on showing attempt 1's half answer (the chat's answer is attempt 2's: empty).
    chat_id = "0123456789abcdef0123456789abcdef"
    events = (
        sse("1-0", "started", attempt=1, model="m")
        + sse("2-0", "content", content="half an answ", index=1, attempt=1)
        + sse("3-0", "status", message="worker lost; attempt 2 of 3", attempt=2)
        + sse("4-0", "started", attempt=2, model="m")
        + sse("5-0", "tool_call", index=0, id="call_1", name="lookup", arguments="{}", attempt=2)
        + sse("6-0", "complete", attempt=2, total_chunks=1, content_length=0, elapsed_ms=5, finish_reason="tool_calls")
    )
    created = {"id": chat_id, "status": "queued", "stream_url": f"/v1/chats/{chat_id}/events?token=s", "created_at": 1}
    page.route(
        re.compile(r"/v1/chats$"),
        lambda route: route.fulfill(status=202, content_type="application/json", body=json.dumps(created)),
    )
    page.route(
        re.compile(rf"/v1/chats/{chat_id}/events"),
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=events),
    )
    open_page(page, deployment)
    ask(page, unique("superseded"), "fake?words=5")
    expect(page.locator("body")).to_have_attribute("data-state", "complete")
    shots(page, "attempt-2-tool-call-only")
    assert answer(page) == ""
    expect(page.locator("#tool-calls")).to_have_text("tool call lookup({})")


def test_a_chat_given_up_on_after_minutes_offers_resume_and_resumes_exact(
    page: Page, deployment: Deployment, shots: Shots
) -> None:
    # The network gone for longer than the client's budget (5 minutes of failures in a row, on the
    # page's clock): the page says so and offers Resume, which picks the chat up where it stopped.
    page.clock.install()
    prompt = unique("given up, then resumed")
    open_page(page, deployment)
    ask(page, prompt, SLOW)
    wait_for_some_text(page)
    body = page.locator("body")
    deployment.proxy.cut()
    try:
        expect(body).to_have_attribute("data-connection", "reconnecting")
        page.clock.fast_forward("06:00")
        for _ in range(40):  # each fast-forward fires the backoff's timer: one more failed try
            if body.get_attribute("data-resumable") == "true":
                break
            page.clock.fast_forward(20_000)
            page.wait_for_timeout(100)
        expect(body).to_have_attribute("data-resumable", "true")
        expect(page.locator("#resume")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("gave up")
        shots(page, "given-up-resume-offered")
    finally:
        deployment.proxy.restore()
    page.click("#resume")
    expect(body).to_have_attribute("data-state", "complete")
    shots(page, "resumed-complete")
    assert answer(page) == expected_text(prompt, 60)
    expect(page.locator("#resume")).to_be_hidden()
