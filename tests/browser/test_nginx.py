"""The chat page and ``streambridge.js`` in Chromium through nginx running the repo's ``deploy/nginx.conf``.

The same deployment as compose's (two edges and the API behind nginx, ``stream_url`` through it),
on this machine: see ``tests/e2e/nginx.py``. Skipped without nginx or chromium.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from streambridge.fake_llm import expected_text
from tests.browser.conftest import Shots, unique
from tests.e2e.nginx import Stack, start_stack

pytestmark = pytest.mark.e2e

MODEL = "fake?words=30&delay_ms=5"
SLOW = "fake?words=60&delay_ms=30"  # long enough to reload mid-answer

# Runs in the page served through nginx: the client imported from the path nginx sends to an edge,
# one chat over each transport (fetch with Last-Event-ID, EventSource with the stream_url).
USE_THE_CLIENT = """
async ([prompt, model]) => {
  const { createClient, memoryStore } = await import("/streambridge.js");
  const got = {};
  for (const transport of ["fetch", "eventsource"]) {
    const client = createClient({ store: memoryStore(), transport });
    let pieces = "";
    const chat = await client.createChat({
      message: `${prompt} ${transport}`, model, onContent: (piece) => (pieces += piece),
    });
    const result = await chat.done;
    got[transport] = { status: result.status, text: result.text, pieces, streamUrl: chat.streamUrl };
  }
  return got;
}
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with start_stack() as started:
        yield started


def open_page(page: Page, stack: Stack) -> None:
    page.goto(stack.url + "/")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")


def ask(page: Page, prompt: str, model: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#options summary")
    page.fill("#model", model)
    page.click("#send")


def answer(page: Page) -> str:
    return page.locator("#answer").text_content() or ""


def test_the_page_streams_an_answer_through_nginx(page: Page, stack: Stack, shots: Shots) -> None:
    prompt = unique("behind nginx")
    open_page(page, stack)
    ask(page, prompt, MODEL)
    expect(page.locator("body")).to_have_attribute("data-state", "complete")
    shots(page, "complete")
    assert answer(page) == expected_text(prompt, 30)
    assert page.errors == []  # type: ignore[attr-defined]
    assert page.evaluate("window.__violations") == []  # the CSP allows the streams' origin: nginx's


def test_a_reload_mid_answer_resumes_through_nginx_and_ends_exact(page: Page, stack: Stack, shots: Shots) -> None:
    prompt = unique("reload behind nginx")
    open_page(page, stack)
    ask(page, prompt, SLOW)
    expect(page.locator("#answer")).to_have_text(re.compile(r"^[\s\S]{30,}"))
    shots(page, "before-reload")
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-resumed", "true")
    expect(page.locator("body")).to_have_attribute("data-state", "complete")
    shots(page, "resumed-complete")
    assert answer(page) == expected_text(prompt, 60)


def test_the_client_module_streams_over_both_transports_through_nginx(page: Page, stack: Stack) -> None:
    prompt = unique("client behind nginx")
    open_page(page, stack)
    got: dict[str, Any] = page.evaluate(USE_THE_CLIENT, [prompt, MODEL])
    for transport in ("fetch", "eventsource"):
        want = expected_text(f"{prompt} {transport}", 30)
        assert got[transport]["status"] == "complete"
        assert got[transport]["text"] == got[transport]["pieces"] == want
        assert got[transport]["streamUrl"].startswith(stack.url + "/v1/chats/")
    assert page.errors == []  # type: ignore[attr-defined]
