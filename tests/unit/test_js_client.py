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


def test_the_types_take_what_a_caller_writes() -> None:
    """``tsc --noEmit --strict`` over tests/unit/js/types/usage.ts, with TypeScript fetched by npx.

    Skipped where npx is missing or cannot fetch TypeScript (no npm registry); nothing is committed
    of it (no node_modules in the repo)."""
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("no npx here")
    tsc = [npx, "-y", "-p", "typescript@5", "tsc"]
    try:
        probe = subprocess.run([*tsc, "--version"], capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("npx could not fetch TypeScript in time")
    if probe.returncode != 0 or not probe.stdout.startswith("Version 5"):
        pytest.skip(f"npx could not fetch TypeScript: {probe.stderr.strip()[-300:]}")
    flags = ["--noEmit", "--strict", "--target", "es2022", "--module", "esnext", "--moduleResolution", "bundler"]
    done = subprocess.run(
        [*tsc, *flags, "--lib", "es2022,dom,dom.iterable", str(HERE / "types" / "usage.ts")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
