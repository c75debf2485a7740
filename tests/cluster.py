"""A real Redis Cluster for the tests: 3 primaries and 3 replicas of the machine's redis-server.

Started on free ports in a directory of its own, with nothing persisted; a failover takes a few
seconds (``NODE_TIMEOUT``), and replicas sync at once (``--repl-diskless-sync-delay 0``: the
default makes them wait ~6 s). A cluster has db 0 only: tests keep apart by key prefixes.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from redis.crc import key_slot

from streambridge.embedded import free_port

#: ms without an answer before a node is taken for failed; its replica is promoted ~1-2 s after
NODE_TIMEOUT = 1000
HOST = "127.0.0.1"


class ClusterUnavailableError(Exception):
    """No redis-server ≥ 7 here (sharded Pub/Sub, ``cluster-port``): the cluster tests are skipped."""


@dataclass(eq=False)
class Node:
    port: int
    bus_port: int
    process: subprocess.Popen[bytes]
    id: str = ""
    client: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.client = redis.Redis(HOST, self.port, socket_timeout=5, socket_connect_timeout=1)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def __repr__(self) -> str:
        return f"Node({self.port})"


def redis_7_binaries() -> tuple[str, str]:
    """redis-server and redis-cli, or ``ClusterUnavailableError`` saying why not."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise ClusterUnavailableError("no redis-server or redis-cli on PATH (apt-get install redis-server)")
    version = subprocess.run([server, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"v=(\d+)\.", version)
    if found is None or int(found[1]) < 7:
        raise ClusterUnavailableError(f"a Redis Cluster test needs redis-server ≥ 7, not {version.strip()!r}")
    return server, cli


class RedisCluster:
    """A 6-node cluster, up and in sync when the constructor returns (~2 s)."""

    def __init__(self, primaries: int = 3) -> None:
        server, cli = redis_7_binaries()
        self._dir = tempfile.TemporaryDirectory(prefix="sb-test-cluster-")
        self.nodes: list[Node] = []
        try:
            for _ in range(primaries * 2):
                self.nodes.append(self._node(server))
            create = ["--cluster", "create", *(n.address for n in self.nodes), "--cluster-replicas", "1"]
            done = subprocess.run([cli, *create, "--cluster-yes"], capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}{done.stderr}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        self.seeds = [(HOST, n.port) for n in self.nodes]
        self.url = "redis-cluster://" + ",".join(n.address for n in self.nodes)

    def _node(self, server: str) -> Node:
        """A node answering on free ports: a port taken meanwhile (other tests run beside these) is
        given up for others."""
        for attempt in range(5):
            taken = {p for n in self.nodes for p in (n.port, n.bus_port)}
            port, bus = itertools.islice((p for p in iter(free_port, None) if p not in taken), 2)
            node = self._start(server, port, bus)
            try:
                _until(lambda node=node: _answers(node), f"{node} answers", 10)  # type: ignore[misc]
            except _NodeExited:
                if attempt == 4:
                    raise
                continue
            node.id = node.client.execute_command("CLUSTER", "MYID").decode()
            return node
        raise AssertionError("unreachable")

    def _start(self, server: str, port: int, bus: int) -> Node:
        args = [server, "--port", str(port), "--cluster-port", str(bus), "--bind", HOST, "--dir", self._dir.name]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        args += ["--cluster-node-timeout", str(NODE_TIMEOUT), "--save", "", "--appendonly", "no"]
        args += ["--repl-diskless-sync-delay", "0", "--logfile", f"{self._dir.name}/{port}.log"]
        return Node(port, bus, subprocess.Popen(args, stdout=subprocess.DEVNULL))

    # What the cluster looks like now, as an alive node sees it.

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.alive()]

    def _by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    def _view(self) -> list[list[str]]:
        """CLUSTER NODES of the first alive node, a line's fields each."""
        text = self.alive()[0].client.execute_command("CLUSTER", "NODES")
        text = text.decode() if isinstance(text, bytes) else text
        return [line.split() for line in text.splitlines() if line]

    def primaries(self) -> list[Node]:
        """The primaries serving slots, as an alive node sees them (a failed one is left out)."""
        by_id = self._by_id()
        return [by_id[f[0]] for f in self._view() if "master" in f[2] and "fail" not in f[2] and len(f) > 8]

    def replica_of(self, primary: Node) -> Node:
        """The primary's live replica, once the node asked sees it (a cluster just made, or just
        failed over, may not have told every node yet)."""
        by_id = self._by_id()
        found: list[Node] = []

        def one() -> bool:
            found[:] = [by_id[f[0]] for f in self._view() if f[3] == primary.id and "fail" not in f[2]]
            return len(found) == 1

        _until(one, f"one live replica of {primary}", 10)
        return found[0]

    def owner_of(self, key_or_slot: str | bytes | int) -> Node:
        slot = key_or_slot if isinstance(key_or_slot, int) else key_slot(_bytes(key_or_slot))
        by_id = self._by_id()
        for start, end, primary, *_ in self.alive()[0].client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return by_id[primary[2].decode()]
        raise LookupError(f"slot {slot} is served by no node")

    # Damage.

    def kill(self, node: Node) -> None:
        """A crash: SIGKILL, nothing saved, its sockets dropped at once. Its replicas are read first:
        the ones :meth:`wait_failover` waits for are those it has now (a loaded host's heartbeat past
        the node timeout can have failed a node over since the cluster was made)."""
        with contextlib.suppress(redis.RedisError, ClusterUnavailableError):
            replicas = {f[0] for f in self._view() if f[3] == node.id and "fail" not in f[2]}
            if replicas:
                self._replica_ids[node.id] = replicas
        node.process.kill()
        node.process.wait(10)
        node.client.close()

    def wait_failover(self, dead: Node, timeout: float = 20) -> Node:
        """Waits until ``dead``'s replica is a primary and every alive node says the cluster is ok;
        returns the promoted replica."""
        promoted: list[Node] = []

        def done() -> bool:
            was_replica = [n for n in self.alive() if n.id in self._replica_ids.get(dead.id, ())]
            promoted[:] = [n for n in was_replica if _role(n) == "master"]
            return bool(promoted) and all(_state_ok(n) for n in self.alive())

        _until(done, f"{dead}'s replica promoted", timeout, self._explain)
        return promoted[0]

    def migrate_slot(self, slot: int, dst: Node) -> None:
        """Moves ``slot`` to ``dst`` as a resharding does: IMPORTING / MIGRATING, every key
        MIGRATEd, then SETSLOT NODE on the destination, the source and every other node."""
        src = self.owner_of(slot)
        if src is dst:
            return
        dst.client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src.id)
        src.client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst.id)
        while batch := src.client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.client.execute_command("MIGRATE", HOST, dst.port, "", 0, 5000, "KEYS", *batch)
        for node in [dst, src, *(n for n in self.alive() if n not in (dst, src))]:
            with contextlib.suppress(redis.ResponseError):  # a replica learns it from its primary
                node.client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst.id)
        _until(lambda: all(self._owner_seen_by(n, slot) == dst.id for n in self.alive()), "slot moved", 10)

    def _owner_seen_by(self, node: Node, slot: int) -> str:
        for start, end, primary, *_ in node.client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return str(primary[2].decode())
        return ""

    def _explain(self) -> str:
        """What each alive node says, for a test that waited in vain."""
        lines = []
        for node in self.alive():
            with contextlib.suppress(redis.RedisError):
                state = "ok" if _state_ok(node) else "fail"
                lines.append(f"{node} ({node.id[:8]}): {_role(node)}, cluster {state}")
        with contextlib.suppress(redis.RedisError, IndexError):
            lines += [" ".join(f[:4]) for f in self._view()]
        return ":\n" + "\n".join(lines)

    def stop(self) -> None:
        for node in self.nodes:
            node.client.close()
            if node.alive():
                node.process.kill()
                node.process.wait(10)
        self._dir.cleanup()

    # Readiness.

    def wait_ok(self, timeout: float = 20) -> None:
        """Every node says ``cluster_state:ok`` and agrees on the slots, and every replica is in sync."""

        def ok() -> bool:
            alive = self.alive()
            if not all(_state_ok(n) for n in alive):
                return False
            if len({str(n.client.execute_command("CLUSTER", "SLOTS")) for n in alive}) != 1:
                return False
            return all(_in_sync(n) for n in alive if _role(n) == "slave")

        _until(ok, "cluster ok and replicas in sync", timeout, self._explain)
        self._replica_ids: dict[str, set[str]] = {}
        for fields in self._view():
            if "slave" in fields[2]:
                self._replica_ids.setdefault(fields[3], set()).add(fields[0])


def _bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


class _NodeExited(Exception):
    pass


def _answers(node: Node) -> bool:
    if not node.alive():
        raise _NodeExited(f"redis-server on {node.port} exited with {node.process.returncode}")
    try:
        return bool(node.client.ping())
    except redis.ConnectionError:
        return False


def _info(node: Node, section: str) -> dict[str, object]:
    return dict(node.client.info(section))


def _state_ok(node: Node) -> bool:
    text = node.client.execute_command("CLUSTER", "INFO")
    return b"cluster_state:ok" in (text if isinstance(text, bytes) else text.encode())


def _role(node: Node) -> str:
    return str(_info(node, "replication").get("role", ""))


def _in_sync(replica: Node) -> bool:
    info = _info(replica, "replication")
    return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == 0


def _until(check: Callable[[], bool], what: str, timeout: float, explain: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # a node restarting or just killed: ask again
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test cluster: no {what} within {timeout} s{explain()}")
        time.sleep(0.05)
