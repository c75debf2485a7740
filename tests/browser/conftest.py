"""A real browser (Debian's chromium, driven by Playwright) against real processes started through the CLI.

The deployment: redis-server, the simulated LLM, the API, two edges and a worker, each its own
process, behind a reverse proxy (``proxy.py``) that gives the page one origin, as a deployment's
proxy does, and can cut the network. Chromium is found by its path (``SB_TEST_CHROMIUM``,
default ``/usr/bin/chromium``); nothing is downloaded. Screenshots of each step are kept under
the directory printed at the start (``SB_TEST_BROWSER_ARTIFACTS`` to choose it).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.browser.proxy import Proxy
from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, fake_llm, start_together, stop_all

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("SB_TEST_CHROMIUM", "/usr/bin/chromium")
if shutil.which(CHROMIUM) is None:
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

#: a browser's waits: generous for a shared 2-core machine; they end as soon as the condition holds
WAIT_MS = 30_000
playwright_api.expect.set_options(timeout=WAIT_MS)


@dataclass
class Deployment:
    url: str  # the proxy: the page's origin
    redis_url: str
    proxy: Proxy
    api: Process
    edges: list[Process]
    workers: list[Process]
    env: dict[str, str]
    logs: Path
    started: list[Process] = field(default_factory=list)

    def replace_worker(self) -> Process:
        """A second worker, idle until the first dies; it takes the first's place in ``workers``."""
        worker = Process(["worker"], self.env, self.logs, ready="worker started")
        self.started.append(worker)
        self.workers.append(worker)
        return worker

    def replace_edge(self, index: int) -> None:
        """A fresh edge in place of a dead one, so later tests have two again."""
        edge = Process(["edge", "--port", "0"], self.env, self.logs)
        self.started.append(edge)
        self.edges[index] = edge
        self.proxy.edges = [e.url for e in self.edges]


_artifacts: list[Path] = []


@pytest.fixture(scope="session")
def artifacts(request: pytest.FixtureRequest) -> Path:
    chosen = os.environ.get("SB_TEST_BROWSER_ARTIFACTS")
    path = Path(chosen) if chosen else Path(tempfile.mkdtemp(prefix="sb-browser-"))
    path.mkdir(parents=True, exist_ok=True)
    _artifacts.append(path)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nbrowser tests: screenshots in {path}")
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for path in _artifacts:
        terminalreporter.write_line(f"browser tests: screenshots in {path}")


@pytest.fixture(scope="package")  # one for the browser tests, stopped before the other suites run
def deployment() -> Iterator[Deployment]:
    redis = OwnRedis()
    logs = Path(tempfile.mkdtemp(prefix="sb-browser-logs-"))
    proxy = Proxy()
    started: list[Process] = []
    try:
        llm, llm_url = fake_llm(logs, "--ttft-ms", "20", "--delay-ms", "5")
        started.append(llm)
        env = clean_env(
            STREAMBRIDGE_REDIS_URL=redis.url(0),
            STREAMBRIDGE_LLM_BASE_URL=llm_url,
            STREAMBRIDGE_PUBLIC_EDGE_URL=proxy.url,  # stream_url through the proxy, as in a deployment
            STREAMBRIDGE_LEASE_TTL="1.5",  # a SIGKILLed worker's chat runs again within seconds
        )
        edges = [Process(["edge", "--port", "0"], env, logs, wait=False) for _ in range(2)]
        started += edges
        api = Process(["api", "--port", "0"], env, logs, wait=False)
        started.append(api)
        workers = [Process(["worker"], env, logs, ready="worker started", wait=False)]
        started += workers
        start_together(*started)
        proxy.api, proxy.edges = api.url, [e.url for e in edges]
        system = Deployment(proxy.url, redis.url(0), proxy, api, edges, workers, env, logs, started)
        yield system
    finally:
        proxy.stop()
        stop_all(reversed(started))
        redis.stop()


@pytest.fixture(scope="package")
def browser() -> Iterator[playwright_api.Browser]:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


class Shots:
    """Screenshots of one test's steps, numbered in order: ``<artifacts>/<test>/NN-step.png``."""

    def __init__(self, root: Path, test: str) -> None:
        self.dir = root / re.sub(r"[^\w.-]", "_", test)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, page: playwright_api.Page, step: str) -> None:
        self.count += 1
        page.screenshot(path=str(self.dir / f"{self.count:02d}-{step}.png"), full_page=True)


@pytest.fixture
def shots(artifacts: Path, request: pytest.FixtureRequest) -> Shots:
    return Shots(artifacts, request.node.name)


# Runs in every page before its own scripts (injected by the browser, so the page's policy allows
# it): records what a test must see never happen — a script of the answer's running, a blocked load.
WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__violations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


@pytest.fixture
def context(browser: playwright_api.Browser) -> Iterator[playwright_api.BrowserContext]:
    ctx = browser.new_context(viewport={"width": 900, "height": 700})
    ctx.set_default_timeout(WAIT_MS)
    ctx.add_init_script(WATCH)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: playwright_api.BrowserContext) -> playwright_api.Page:
    page = context.new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.errors.append(str(error)))  # type: ignore[attr-defined]
    page.on("dialog", lambda dialog: (page.errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))  # type: ignore[attr-defined]
    return page


def unique(prompt: str) -> str:
    """Prompts differ per run: the simulated LLM counts failures per prompt."""
    return f"{prompt} {time.monotonic_ns()}"
