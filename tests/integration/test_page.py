"""``GET /`` and ``/streambridge.js``: served by every kind of process, under a strict policy, from the package."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from streambridge.api import page
from streambridge.api.app import make_app
from streambridge.shared.settings import Settings

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@pytest.mark.parametrize(
    ("serve_api", "serve_edge"), [(True, True), (True, False), (False, True)], ids=["up", "api", "edge"]
)
async def test_every_process_serves_the_page_and_the_client(
    settings: Settings, serve_api: bool, serve_edge: bool
) -> None:
    async with TestClient(TestServer(make_app(settings, serve_api=serve_api, serve_edge=serve_edge))) as client:
        for path, (relative, content_type, _) in page.FILES.items():
            response = await client.get(path)
            assert response.status == 200, path
            assert response.content_type == content_type
            assert await response.read() == (page.STATIC / relative).read_bytes()
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Content-Type-Options"] == "nosniff"


class InlineCode(HTMLParser):
    """What of a page would run or style it from the HTML itself, or load from elsewhere: each a line in ``found``."""

    URL_ATTRIBUTES = frozenset({"src", "href", "action", "formaction", "data", "poster", "srcset"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._in: str | None = None  # "script" or "style" while inside one

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self._in = "script"
            if not values.get("src"):
                self.found.append("a <script> without src")
        if tag == "style":
            self._in = "style"
            self.found.append("a <style> element")
        for name, value in attrs:
            text = (value or "").strip().lower()
            if name.startswith("on"):
                self.found.append(f"an event handler attribute {name}= on <{tag}>")
            if name == "style":
                self.found.append(f"a style attribute on <{tag}>")
            if name in self.URL_ATTRIBUTES and text.startswith(("javascript:", "data:", "http:", "https:", "//")):
                self.found.append(f"<{tag} {name}={value}>: code or a load from outside the deployment")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None and data.strip():
            self.found.append(f"an inline <{self._in}> body: {data.strip()[:40]!r}")


def inline_code(html: str) -> list[str]:
    audit = InlineCode()
    audit.feed(html)
    audit.close()
    return audit.found


def directives(policy: str) -> dict[str, list[str]]:
    parsed = (part.split() for part in policy.split(";") if part.strip())
    return {words[0]: words[1:] for words in parsed}


@pytest.mark.parametrize(
    "html",
    [
        "<script>alert(1)</script>",
        '<script type="module">import "/x.js"</script>',
        '<script type="module" src="/page/chat.js">alert(1)</script>',
        '<button onclick="go()">go</button>',
        '<body onload="go()">',
        '<img src=x onerror="go()">',
        '<p style="color: red">',
        "<style>p { color: red }</style>",
        '<a href="javascript:go()">go</a>',
        '<script src="https://cdn.example/x.js"></script>',
    ],
)
def test_the_audit_finds_inline_code(html: str) -> None:
    page_html = (page.STATIC / "page" / "index.html").read_text()
    assert inline_code(page_html.replace("</body>", html + "</body>"))


async def test_the_page_runs_under_a_strict_policy_with_no_inline_code(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/")
    assert response.headers["Content-Security-Policy"] == PAGE_POLICY
    policy = directives(response.headers["Content-Security-Policy"])
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"]  # no 'unsafe-inline', nonce or hash: inline scripts cannot run
    assert policy["style-src"] == ["'self'"]
    assert response.headers["X-Frame-Options"] == "DENY"
    html = await response.text()
    assert inline_code(html) == []  # scripts and styles are files, no on*= handlers, nothing from outside
    assert "http://" not in html  # nothing from outside the deployment
    assert "https://" not in html


async def test_the_public_edge_may_be_connected_to(settings: Settings) -> None:
    edge = msgspec.structs.replace(settings, public_edge_url="https://edge.example:8443/base")
    async with TestClient(TestServer(make_app(edge))) as client:
        policy = (await client.get("/")).headers["Content-Security-Policy"]
    assert "connect-src 'self' https://edge.example:8443;" in policy


async def test_other_answers_load_nothing(client: TestClient) -> None:  # type: ignore[type-arg]
    for path in ("/healthz", "/v1/chats/nope", "/nowhere"):
        response = await client.get(path)
        assert response.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"


async def test_an_unchanged_file_is_not_sent_again(client: TestClient) -> None:  # type: ignore[type-arg]
    first = await client.get("/streambridge.js")
    again = await client.get("/streambridge.js", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304
    assert await again.read() == b""
    head = await client.head("/")
    assert head.status == 200


async def test_only_get_and_head(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.post("/streambridge.js")
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "method_not_allowed"


def test_the_npm_package_points_at_its_files() -> None:
    manifest = json.loads((page.STATIC / "client" / "package.json").read_text())
    assert manifest["type"] == "module"
    exported = manifest["exports"]["."]
    for relative in (manifest["main"], manifest["types"], exported["default"], exported["types"]):
        assert (page.STATIC / "client" / relative).is_file()
    assert set(manifest["files"]) == {"streambridge.js", "streambridge.d.ts"}
