"""Debian's nginx with the repo's own ``deploy/nginx.conf``, in front of processes started through the CLI.

The config is the file compose.yaml mounts, with only the deployment's addresses replaced: the
``listen`` port and the ``server`` lines of the upstreams (compose's service names become this
machine's ports). nginx runs in the foreground as the test's own child, with its prefix, pid file
and logs in a temporary directory; as root its workers run as nginx's default unprivileged user.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streambridge.embedded import free_port
from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, fake_llm, start_together, stop_all

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
# compose's addresses in deploy/nginx.conf, each on a line of its own
LISTEN = "listen 8080;"
UPSTREAMS = {
    "api": "server api:8000 resolve;",
    "edge-a": "server edge-a:8001 resolve;",
    "edge-b": "server edge-b:8001 resolve;",
}
#: a line of the config's access log: the request's path and the upstreams nginx tried, comma-separated
ACCESS = re.compile(r'"[A-Z]+ (?P<path>\S+) HTTP/[\d.]+" .* upstream=(?P<upstream>.*?) upstream_status=')


def nginx_binary() -> str | None:
    """``SB_TEST_NGINX``, else ``nginx`` on PATH, else Debian's /usr/sbin/nginx (not on a user's PATH).

    (Not ``STREAMBRIDGE_…``: every streambridge command refuses an unknown setting of that prefix.)"""
    chosen = os.environ.get("SB_TEST_NGINX")
    if chosen:
        return shutil.which(chosen)
    return shutil.which("nginx") or shutil.which("/usr/sbin/nginx")


def render(conf: str, port: int, api: str, edges: list[str]) -> str:
    """``conf`` with its listen port and upstream servers replaced by ``port`` and these ``host:port``s."""
    replacements = {
        LISTEN: f"listen 127.0.0.1:{port};",
        UPSTREAMS["api"]: f"server {api};",
        UPSTREAMS["edge-a"]: f"server {edges[0]};",
        UPSTREAMS["edge-b"]: f"server {edges[1]};",
    }
    for old, new in replacements.items():
        count = len(re.findall(rf"^\s*{re.escape(old)}\s*$", conf, flags=re.MULTILINE))
        assert count == 1, f"deploy/nginx.conf should have {old!r} on a line of its own once, not {count} times"
        conf = conf.replace(old, new)
    return conf


def host_port(url: str) -> str:
    return url.removeprefix("http://")


class Nginx:
    """``nginx -p DIR -c DIR/nginx.conf -g 'daemon off; pid …;'`` listening on ``port``."""

    def __init__(self, binary: str, port: int, api: str, edges: list[str]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.dir = Path(tempfile.mkdtemp(prefix="sb-nginx-"))
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(render(NGINX_CONF.read_text(encoding="utf-8"), port, api, edges), encoding="utf-8")
        self.access_log = self.dir / "access.log"  # its stdout: the config logs access to /dev/stdout
        self.error_log = self.dir / "error.log"
        self._out = self.access_log.open("w")
        self._err = self.error_log.open("w")
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.dir), "-c", str(self.conf), "-g", f"daemon off; pid {self.dir / 'nginx.pid'};"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.error_log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not listen on {self.port}:\n{self.error_log.read_text()}") from None
                time.sleep(0.05)

    def upstreams_of(self, path: str, count: int = 1, timeout: float = 5.0) -> list[list[str]]:
        """For each finished request to ``path``, in order, the upstreams nginx tried (its access log).

        Waits for ``count`` of them: nginx writes a request's line after its last byte is sent."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                match["upstream"].split(", ")
                for line in self.access_log.read_text().splitlines()
                if (match := ACCESS.search(line)) and match["path"].split("?")[0] == path
            ]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self._err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Stack:
    """redis-server, the simulated LLM, the API, two edges and a worker, behind nginx; and each one's own URL."""

    nginx: Nginx
    api: Process
    edges: list[Process]
    redis_url: str
    env: dict[str, str]
    logs: Path
    started: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nginx.url

    def restart_edge(self, index: int) -> None:
        """A fresh edge on the port of a dead one, where nginx's upstream expects it."""
        port = self.edges[index].url.rsplit(":", 1)[1]
        edge = Process(["edge", "--port", port], self.env, self.logs)
        self.started.append(edge)
        self.edges[index] = edge


@contextlib.contextmanager
def start_stack(**settings: str) -> Iterator[Stack]:
    """The stack, for a test module's fixture, with these extra ``STREAMBRIDGE_*`` settings; skipped without nginx."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("no nginx (apt-get install nginx, or SB_TEST_NGINX=/path/to/nginx)")
    redis = OwnRedis()
    logs = Path(tempfile.mkdtemp(prefix="sb-nginx-logs-"))
    port = free_port()
    started: list[Process] = []
    nginx: Nginx | None = None
    try:
        llm, llm_url = fake_llm(logs, "--ttft-ms", "20", "--delay-ms", "5")
        started.append(llm)
        env = clean_env(
            STREAMBRIDGE_REDIS_URL=redis.url(0),
            STREAMBRIDGE_LLM_BASE_URL=llm_url,
            # STREAMBRIDGE_PUBLIC_EDGE_URL unset, as in compose: stream_url is built from the Host nginx
            # passes, so it goes through nginx whatever name or port the client used.
            # Trusted: nginx, and, wider than compose's one address on purpose, every client address
            # the tests use (127.0.0.N): nginx alone must keep a client from choosing its address.
            STREAMBRIDGE_TRUSTED_PROXIES="127.0.0.0/8",
            **settings,
        )
        edges = [Process(["edge", "--port", "0"], env, logs, wait=False) for _ in range(2)]
        started += edges
        api = Process(["api", "--port", "0"], env, logs, wait=False)
        started.append(api)
        started.append(Process(["worker"], env, logs, ready="worker started", wait=False))
        start_together(*started)
        nginx = Nginx(binary, port, host_port(api.url), [host_port(e.url) for e in edges])
        yield Stack(nginx, api, edges, redis.url(0), env, logs, started)
    finally:
        if nginx is not None:
            nginx.stop()
        stop_all(reversed(started))
        redis.stop()
        shutil.rmtree(logs, ignore_errors=True)
