"""One worker's appends, every chat's, sent together: one pipeline per round trip.

A worker streams many chats at once, and an LLM sends each token on its own. Sent one call per
chat, each token cost a Redis round trip of its own: taking a pooled connection, a write, a
read, a wake-up; at 50 chats a third of a worker's CPU (docs/benchmarks.md). Here each chat's
batch joins the pipeline that goes next: at once when none is in flight (no fixed delay), or
as soon as the one in flight returns, together with every batch that came meanwhile.

Each chat still has at most one batch in flight (its sink waits for the answer before it sends
the next), so a chat's events keep their order; the sink's sequence numbers make a batch Redis
already applied harmless if a reconnect sends it again. So a round trip whose connection broke
(a failover, a proxy's reset, ``CLIENT KILL``) is sent again, the same calls with the same
sequence numbers, for up to ``retry_for`` seconds (on a cluster, as long as a primary's failover
takes; the leases hold meanwhile: they have no TTL): a dropped socket costs a retry, not an attempt.

On a Redis Cluster each primary gets a pipeline of its own, over a plain client of that node
(``shared.redis.ClusterNodes``), and a lane of its own: the calls for a node go together, one
round trip in flight per node, so a node that died holds up its own chats alone. A node whose
connection drops, or that answers MOVED, ASK, CLUSTERDOWN or TRYAGAIN, has its calls sent again
(to whichever primary the slot map, read again, names) for up to ``retry_for`` seconds; the other
nodes' connections are never touched. A promoted replica, which has no scripts yet, gets the
NOSCRIPT calls again as EVAL.

On one Redis a round trip is sent from the caller's own turn of the loop and answered from the
connection's callback (``shared.pipe``), with no task in between: a token that arrives alone
costs the worker its read and this write, not a task created, stepped and woken per round trip
(docs/benchmarks.md). Anything out of the ordinary (no connection yet, a dropped one, NOSCRIPT, a
transient reply) hands the round trip to the lane's sender task, which retries as above.

A durable call (``call(..., durable=True)``: a chat's end, a claim) is answered only once a
replica has it too, or WAIT gave up: Redis replicates asynchronously, and a transition acknowledged
by a primary that dies before passing it on is lost on the replica promoted in its place, while
the control Redis's step that follows it stands.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from redis.exceptions import AskError, ClusterDownError, MovedError, NoScriptError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streambridge.shared.machine import Script, Store
from streambridge.shared.pipe import Pipe, pipe_for
from streambridge.shared.redis import StreamsCluster

log = logging.getLogger("streambridge.appender")

#: what a dropped connection, a cluster between a primary's death and its replica's promotion, or
#: a moved slot raises: the round trip is sent again
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, MovedError, AskError, OSError)
#: how long a durable call waits for a replica to have it (``WAIT 1 <ms>``)
WAIT_MS: Final = 500
#: a primary that no replica answers is logged at most this often (s)
UNREPLICATED_LOG_EVERY: Final = 60.0

#: the loop's time the round trip under way in this task (a lane's sender) is answered by, or fails
_GIVE_UP: Final[contextvars.ContextVar[float]] = contextvars.ContextVar("_GIVE_UP", default=0.0)

#: a call: its script, keys, arguments, whether it is durable, and its caller's answer
Waiting = tuple[Script, list[str], list[str | bytes], bool, asyncio.Future[Any]]


@dataclass(eq=False)
class _Lane:
    """The calls waiting for one node (for one Redis, the only lane), and what sends them: the round
    trip written from a caller's turn (``flight``), or the task that retries (``sender``)."""

    waiting: list[Waiting] = field(default_factory=list)
    sender: asyncio.Task[None] | None = None
    flight: asyncio.Future[list[Any]] | None = None
    flying: list[Waiting] = field(default_factory=list)  # the calls ``flight`` answers
    due: bool = False  # a round trip goes at the end of this turn of the loop

    def busy(self) -> bool:
        return self.due or self.flight is not None or (self.sender is not None and not self.sender.done())


class Appender:
    def __init__(self, redis: Store, *, retry_for: float = 0.75) -> None:
        self._redis = redis
        self._retry_for = retry_for
        # a cluster's nodes, each sent its own plain pipeline (a bare redis-py cluster client: its cluster pipeline)
        self._nodes = redis.nodes if isinstance(redis, StreamsCluster) else None
        self._lanes: dict[str, _Lane] = {}
        self._unreplicated: dict[str, float] = {}  # node → when WAIT's 0 was last logged
        # a Pipe per client (one Redis, or a node), or None where its connections are not sockets (fakeredis)
        self._pipes: dict[int, tuple[Store, Pipe | None]] = {}

    async def call(self, script: Script, keys: list[str], args: list[str | bytes], *, durable: bool = False) -> Any:
        """``script``'s answer, sent with whatever else is waiting to go to its node. ``durable``: on a
        cluster, answered once a replica has it too (or WAIT gave up); on one Redis, as any call."""
        return await self.submit(script, keys, args, durable=durable)

    def submit(
        self, script: Script, keys: list[str], args: list[str | bytes], *, durable: bool = False
    ) -> asyncio.Future[Any]:
        """As :meth:`call`, for a caller that takes the answer by callback: its future. Cancelling it
        leaves the call to go all the same (a sink's numbered batches must not skip one)."""
        lane = self._lanes.setdefault("" if self._nodes is None else self._nodes.owner_known(keys[0]), _Lane())
        answer = asyncio.get_running_loop().create_future()
        lane.waiting.append((script, keys, args, durable, answer))
        if not lane.busy():  # at the end of this turn: every call made in it goes in one round trip
            lane.due = True
            asyncio.get_running_loop().call_soon(self._go, lane)
        return answer

    async def close(self) -> None:
        """Stop sending (the worker is done): whoever still waits for an answer is cancelled."""
        senders = [lane.sender for lane in self._lanes.values() if lane.sender is not None]
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for lane in self._lanes.values():
            lane.flight = None  # its answer, when the closed connection fails it, is nobody's
            for *_, answer in [*lane.flying, *lane.waiting]:
                answer.cancel()
            lane.flying, lane.waiting = [], []
        pipes, self._pipes = self._pipes, {}  # a call after this connects again
        for _, pipe in pipes.values():
            if pipe is not None:
                await pipe.close()

    def _go(self, lane: _Lane) -> None:
        """Sends what waits in ``lane``: written now on one Redis's open connection, else by a task."""
        lane.due = False
        if lane.flight is not None or (lane.sender is not None and not lane.sender.done()) or not lane.waiting:
            return  # (closed and reopened meanwhile)
        batch, lane.waiting = lane.waiting, []
        try:
            pipe = self._pipe(self._redis) if self._nodes is None else None
            wire = pipe.ready() if pipe is not None else None
            if pipe is None or wire is None:
                raise ConnectionResetError("no open connection")  # the task connects, and answers any error
            now = asyncio.get_running_loop().time()
            deadline = now + min(self._retry_for, pipe.timeout if pipe.timeout is not None else self._retry_for)
            flight = wire.send(self._commands(batch, "EVALSHA"), deadline)
        except Exception:  # no connection, a closed one, or a call that cannot be packed: the task finds out which
            lane.sender = asyncio.create_task(self._send(lane, batch))
            return
        lane.flight, lane.flying = flight, batch
        flight.add_done_callback(partial(self._landed, lane, now + self._retry_for))

    def _landed(self, lane: _Lane, give_up: float, flight: asyncio.Future[list[Any]]) -> None:
        """A round trip written by :meth:`_go` is answered: each caller its answer, and the next one goes.
        One that failed goes to the task, within what is left of its window."""
        failed = None if flight.cancelled() else flight.exception()  # (retrieved, in any case)
        if lane.flight is not flight:  # closed meanwhile
            return
        batch, lane.flight, lane.flying = lane.flying, None, []
        cancelled = flight.cancelled()
        answers = [] if failed is not None or cancelled else flight.result()
        transient = next((a for a in answers if isinstance(a, TRANSIENT)), None)
        if failed is not None or transient is not None or cancelled:
            # the whole round trip, as the task would: its calls are fenced and numbered
            error = failed or transient or RedisConnectionError("the round trip was cancelled")
            lane.sender = asyncio.create_task(self._send(lane, batch, give_up, error=error))
            return
        unknown = [w for w, a in zip(batch, answers, strict=True) if isinstance(a, NoScriptError)]
        known = [(w, a) for w, a in zip(batch, answers, strict=True) if not isinstance(a, NoScriptError)]
        _answer([w for w, _ in known], [a for _, a in known])
        if unknown:  # NOSCRIPT (a restarted Redis): those go again as EVAL, in their window
            lane.sender = asyncio.create_task(self._send(lane, unknown, give_up, command="EVAL"))
        elif lane.waiting:
            self._go(lane)

    async def _send(
        self,
        lane: _Lane,
        first: list[Waiting] | None = None,
        give_up: float = 0.0,
        *,
        command: str = "EVALSHA",
        error: BaseException | None = None,
    ) -> None:
        """Sends ``first``, then ``lane``'s calls until none wait, retrying each round trip. ``first``
        is a round trip :meth:`_go` could not send, or one that :meth:`_landed` handed over: then in
        its window (``give_up``), as ``command``, and after its ``error``; the rest each in a window of
        its own."""
        while first or lane.waiting:
            batch = first or lane.waiting
            if first:
                first = None
            else:
                lane.waiting = []
            try:
                answers = await self._execute_again_if_dropped(batch, give_up, command, error)
            except Exception as exc:  # Redis unreachable: every caller of this round trip hears it
                answers = [exc] * len(batch)
            except asyncio.CancelledError:  # the worker's loop is closing: nobody waits forever
                for *_, answer in [*batch, *lane.waiting]:
                    answer.cancel()
                raise
            give_up, command, error = 0.0, "EVALSHA", None
            _answer(batch, answers)

    async def _execute_again_if_dropped(
        self, batch: list[Waiting], give_up: float = 0.0, command: str = "EVALSHA", error: BaseException | None = None
    ) -> list[Any]:
        """``give_up``: the window's end, and ``error``: how its first attempt failed, when :meth:`_go`
        made that attempt."""
        loop = asyncio.get_running_loop()
        give_up, delay = give_up or loop.time() + self._retry_for, 0.02
        while True:
            _GIVE_UP.set(give_up)  # this lane's task's own: lanes of a cluster's nodes run at once
            try:
                if error is not None:  # as if this attempt had made it
                    failed, error = error, None
                    raise failed
                if self._nodes is None and self._pipe(self._redis) is not None:
                    return await self._execute(batch, command)  # the Pipe keeps the deadline: no timer per round trip
                # bounded as a whole: the client's own retries and socket timeout would run on past it
                async with asyncio.timeout(max(0.0, give_up - loop.time())):
                    return await self._execute(batch, command)
            except TimeoutError:
                raise RedisTimeoutError(f"an append went unanswered for {self._retry_for:g} s") from None
            except TRANSIENT as exc:
                if loop.time() + delay > give_up:
                    if isinstance(exc, RedisTimeoutError):
                        message = f"an append went unanswered for {self._retry_for:g} s ({exc})"
                        raise RedisTimeoutError(message) from exc
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _execute(self, batch: list[Waiting], command: str = "EVALSHA") -> list[Any]:
        if self._nodes is None:
            return await self._pipeline(self._redis, batch, command=command)
        nodes = self._nodes
        groups: dict[str, list[int]] = {}
        for n, (_, keys, *_) in enumerate(batch):  # by the map as read now: a call may have moved
            groups.setdefault(await nodes.owner(keys[0]), []).append(n)
        sent = await asyncio.gather(
            *(self._pipeline(nodes.client(a), [batch[n] for n in ns], node=a) for a, ns in groups.items()),
            return_exceptions=True,
        )
        answers: list[Any] = [None] * len(batch)
        for (address, ns), node_answers in zip(groups.items(), sent, strict=True):
            if isinstance(node_answers, BaseException):
                if isinstance(node_answers, TRANSIENT):  # the map again, then the whole round trip (fenced)
                    await nodes.refresh(avoid=address)
                raise node_answers
            for n, answer in zip(ns, node_answers, strict=True):
                answers[n] = answer
        return answers

    async def _pipeline(
        self, redis: Store, batch: list[Waiting], *, command: str = "EVALSHA", node: str = ""
    ) -> list[Any]:
        """One pipeline of ``batch``'s calls; on a cluster ``node``'s, ended by WAIT if a call is durable."""
        wait = bool(node) and any(durable for *_, durable, _ in batch)
        commands = self._commands(batch, command)
        if wait:  # the same connection: WAIT covers these writes
            commands.append(["WAIT", 1, WAIT_MS])
        answers: list[Any]
        if (pipe := self._pipe(redis)) is not None:
            # each attempt within the client's socket timeout: a connection gone silent (a host
            # down, a NAT's dropped mapping) is given up in time for the next attempt on a new one
            deadline, now = _GIVE_UP.get(), asyncio.get_running_loop().time()
            if pipe.timeout is not None:
                deadline = min(deadline, now + pipe.timeout)
            answers = await pipe.execute(commands, deadline=deadline)
        else:
            async with redis.pipeline(transaction=False) as pipeline:
                for c in commands:  # execute_command: a cluster pipeline refuses ``evalsha()``, not the command
                    pipeline.execute_command(*c)
                answers = await pipeline.execute(raise_on_error=False)
        if wait:
            self._replicated(node, answers.pop())
        unknown = [n for n, a in enumerate(answers) if isinstance(a, NoScriptError)]
        if unknown and command == "EVALSHA":  # a restarted Redis, or a promoted replica: send the scripts
            again = await self._pipeline(redis, [batch[n] for n in unknown], command="EVAL", node=node)
            for n, answer in zip(unknown, again, strict=True):
                answers[n] = answer
        transient = next((a for a in answers if isinstance(a, TRANSIENT)), None)
        if transient is not None:  # a slot moved, or the cluster is failing over: the round trip again
            raise transient
        return answers

    @staticmethod
    def _commands(batch: list[Waiting], command: str) -> list[list[Any]]:
        return [
            [command, script.sha if command == "EVALSHA" else script.lua, len(keys), *keys, *args]
            for script, keys, args, *_ in batch
        ]

    def _pipe(self, redis: Store) -> Pipe | None:
        kept = self._pipes.get(id(redis))
        if kept is None or kept[0] is not redis:  # (an id is reused only once its client is gone)
            kept = self._pipes[id(redis)] = (redis, pipe_for(redis))
        return kept[1]

    def _replicated(self, node: str, replicas: Any) -> None:
        """Best effort: a primary with no replica reachable (its replica died, or it is a replica just
        promoted) still answers, once WAIT gave up; refusing would stop every chat on it until a
        replica is back. Logged, at most once a minute per node."""
        if isinstance(replicas, int) and replicas > 0:
            return
        now = asyncio.get_running_loop().time()
        if now - self._unreplicated.get(node, -UNREPLICATED_LOG_EVERY) >= UNREPLICATED_LOG_EVERY:
            self._unreplicated[node] = now
            log.warning("Redis %s: durable writes answered with no replica having them (WAIT: %r)", node, replicas)


def _answer(batch: list[Waiting], answers: list[Any]) -> None:
    for (*_, answer), result in zip(batch, answers, strict=True):
        if answer.done():  # its caller was cancelled
            continue
        if isinstance(result, BaseException):
            answer.set_exception(result)
        else:
            answer.set_result(result)
