"""streambridge.js's resume rules and SSE parser without a browser: ``node --test`` on tests/unit/js."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from streambridge.api.page import STATIC

HERE = Path(__file__).parent / "js"
NO_NODE = pytest.mark.skipif(shutil.which("node") is None, reason="no node here (the browser tests cover the client)")


@NO_NODE
def test_the_modules_parse() -> None:
    for path in (STATIC / "client" / "streambridge.js", STATIC / "page" / "chat.js"):
        subprocess.run(["node", "--check", str(path)], check=True, timeout=60)


@NO_NODE
def test_the_javascript_client_under_node() -> None:
    done = subprocess.run(
        ["node", "--test", str(HERE / "client.test.mjs")], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
