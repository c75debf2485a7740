"""Runs batch items in a worker's spare capacity: interactive chats always come first.

Every worker runs a ``BatchFeeder`` beside its chats, in its batch lane (``workers/lane.py``: a
child process at a lower CPU priority, so items never hold up the chats' event loop). It claims
items (``shared.batches.CLAIM``) only into slots that interactive chats leave free, minus
``batch_reserved_slots`` that stay free for a chat arriving: as chats come, the feeder claims
nothing more and its running items drain, and a chat never waits behind a batch for a slot. An
upstream's 429 halves the feeder's own limit (growing back by one per success, AIMD), so the batch
backs off and the interactive chats' share of the upstream does not. One batch cannot take every
slot of the deployment either: ``batch_max_running_items`` bounds its running items across workers.

An item needs no token stream: it is one non-streamed request through the openai SDK, and the
upstream's answer, as it came, is the ``body`` of its output line (OpenAI's ``BatchRequestOutput``).
It keeps a chat's guarantees: retries with backoff (``max_attempts``, ``Retry-After`` honoured), a
lease renewed while it runs (a dead worker's items run again elsewhere, ``TICK``), and exactly one
result line, whichever worker finishes it first (``DONE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
import openai

from streambridge.shared import batches, keys, machine, metrics
from streambridge.shared.batches import BatchKeys, OutputError, OutputLine, Response, Usage, decode_item
from streambridge.shared.jobs import back_off
from streambridge.shared.settings import Settings
from streambridge.workers.appender import Appender
from streambridge.workers.llm import classify

try:  # the SDK's HTTP stack, as workers/llm.py finds it
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http  # type: ignore[no-redef,import-not-found,unused-ignore]
from streambridge.workers.pipeline import Failure, backoff

log = logging.getLogger("streambridge.worker")

#: how long a feeder waits before looking for work again: its items running (a finished one wakes
#: it sooner), or no batch running anywhere (a new batch starts within that)
IDLE_WAIT: Final = 0.1
NO_BATCH_WAIT: Final = 0.5
#: an upstream's 429s halve the feeder's limit at most this often (one overload, one cut)
CUT_EVERY: Final = 1.0
#: on a stop, how long results already in hand may take to be stored before their items are handed back
FINISH_WAIT: Final = 2.0


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class _Completion(msgspec.Struct):
    usage: _Usage | None = None


_completion_decoder: Final = msgspec.json.Decoder(_Completion)
_body_decoder: Final = msgspec.json.Decoder(dict[str, Any])


class Outcome(msgspec.Struct):
    ok: bool
    line: bytes
    usage: Usage


class BatchFeeder:
    """Claims, runs and finishes one worker's batch items; ``busy`` counts its interactive chats."""

    def __init__(
        self,
        redis: Any,
        llm: openai.AsyncOpenAI,
        settings: Settings,
        *,
        busy: Callable[[], int] = lambda: 0,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.redis, self.llm, self.settings = redis, llm, settings
        self.busy, self.stopping = busy, stopping
        self.running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.limit = float(settings.batch_worker_concurrency)
        self._keys: dict[str, BatchKeys] = {}
        self._freed = asyncio.Event()
        self._cut_at = 0.0
        self._turn = 0
        self._tasks: list[asyncio.Task[None]] = []
        #: items whose result is in hand and being stored: a stop lets them finish (``FINISH_WAIT``)
        self._finishing: set[tuple[str, int]] = set()
        # the items' results, every item's in one pipeline per round trip (DONE is safe to re-send);
        # apart from the chats' appends, which never wait behind a batch's
        self.appender = Appender(redis, retry_for=settings.lease_ttl / 2)

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_ttl * 1000)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._forever("claiming batch items", self.feed), name="batch-feed"),
            asyncio.create_task(self.every(self.settings.lease_ttl / 3, self.renew), name="batch-renew"),
            asyncio.create_task(self.every(self.settings.lease_ttl / 2, self.tick), name="batch-tick"),
        ]

    async def close(self) -> None:
        """Stop claiming, hand the running items back (another worker runs them again)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # an answer already in hand is stored, not thrown away and asked for again elsewhere
        storing = [task for key, task in self.running.items() if key in self._finishing]
        if storing:
            await asyncio.wait(storing, timeout=FINISH_WAIT)
        await self._stop_items(list(self.running))
        await self.appender.close()

    def room(self) -> int:
        """Items this worker may start now: what the interactive chats leave, less the reserve."""
        if self.stopping():
            return 0
        s = self.settings
        spare = s.worker_concurrency - s.batch_reserved_slots - self.busy()
        return max(0, min(int(self.limit), spare) - len(self.running))

    async def feed(self) -> None:
        """Claims items while there is room, across active batches in turn; waits when there is none."""
        started = 0
        room = self.room()
        active: list[str] = []
        if room > 0:
            active = [m.decode() for m in await self.redis.zrange(keys.active_batches(), 0, -1)]
            self._turn += 1
            for n in range(len(active)):
                if room <= 0:
                    break
                claimed = await self._claim(active[(self._turn + n) % len(active)], room)
                started += claimed
                room -= claimed
        if not started:
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_WAIT if active or self.running else NO_BATCH_WAIT):
                    await self._freed.wait()

    async def _claim(self, batch_id: str, room: int) -> int:
        k = await self._batch(batch_id)
        if k is None:
            return 0
        s = self.settings
        claim = batches.claim(
            k,
            room,
            lease_ms=self.lease_ms,
            max_running=s.batch_max_running_items,
            user_max_running=s.batch_user_max_running_items,
        )
        answer = await machine.call(self.redis, claim)
        for index, item in zip(answer[::2], answer[1::2], strict=True):
            task = asyncio.create_task(self._run(k, int(index), item))
            self.running[(batch_id, int(index))] = task
        return len(answer) // 2

    async def _batch(self, batch_id: str) -> BatchKeys | None:
        if batch_id not in self._keys:
            k = await batches.batch_keys(self.redis, batch_id)
            if k is None:
                return None
            self._keys[batch_id] = k
        return self._keys[batch_id]

    async def _run(self, k: BatchKeys, index: int, raw: bytes) -> None:
        try:
            item = decode_item(raw) if raw else None
            custom_id = item.custom_id if item is not None else ""
            outcome = (
                await self._attempts(k, item) if item is not None else _failed("", "input_missing", "no such line")
            )
            self._finishing.add((k.batch_id, index))
            await self._finish(k, index, custom_id, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: item %d failed to run; its lease will lapse and it runs again", k.batch_id, index)
        finally:
            self._finishing.discard((k.batch_id, index))
            self.running.pop((k.batch_id, index), None)
            self._freed.set()

    async def _attempts(self, k: BatchKeys, item: batches.Item) -> Outcome:
        s = self.settings
        body = _body_decoder.decode(item.body)
        body.setdefault("model", s.llm_model)
        attempt = 0
        limited = 0  # 429s in a row: they back off, but are not attempts
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(s.batch_item_timeout):
                    response = await self.llm.post("/chat/completions", cast_to=_http.Response, body=body)
                    data = await response.aread()
                return self._succeeded(item.custom_id, response.headers.get("x-request-id"), data)
            except msgspec.DecodeError as exc:
                return _failed(item.custom_id, "invalid_response", f"the LLM's answer is not JSON: {exc}")
            except Exception as exc:
                failure = _classify(exc, s.batch_item_timeout)
                if isinstance(exc, openai.RateLimitError):
                    # A rate limit says "slower", not "broken": the batch backs off (fewer items at
                    # once here, each waiting as long as Retry-After asks) and the 429 uses up no
                    # attempt. What bounds the waiting is the batch's completion window.
                    self._slow_down()
                    attempt -= 1
                    limited += 1
                    delay = backoff(limited, s.retry_base_delay, failure.retry_after)
                    if await self._past_expiry(k, delay):
                        return _failed(item.custom_id, exc, failure.message)
                    await asyncio.sleep(delay)
                    continue
                limited = 0
                if not failure.retryable or attempt >= s.max_attempts:
                    return _failed(item.custom_id, exc, failure.message)
                await asyncio.sleep(backoff(attempt, s.retry_base_delay, failure.retry_after))

    async def _past_expiry(self, k: BatchKeys, delay: float) -> bool:
        """Whether waiting ``delay`` s would outlast the batch's completion window."""
        expires_at = await self.redis.hget(keys.batch(k.batch_id), "expires_at")
        return expires_at is None or time.time() + delay >= int(expires_at)

    def _succeeded(self, custom_id: str, request_id: str | None, data: bytes) -> Outcome:
        self.limit = min(float(self.settings.batch_worker_concurrency), self.limit + 1 / self.limit)
        usage = _completion_decoder.decode(data).usage or _Usage()
        response = Response(200, request_id or _request_id(), msgspec.Raw(data))
        line = msgspec.json.encode(OutputLine(_line_id(), custom_id, response, None))
        return Outcome(
            True, line, Usage(usage.prompt_tokens or 0, usage.completion_tokens or 0, usage.total_tokens or 0)
        )

    def _slow_down(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._cut_at >= CUT_EVERY:
            self._cut_at = now
            self.limit = max(1.0, self.limit / 2)
            log.info("batch items: the upstream is rate limiting; at most %d at once here for now", int(self.limit))

    async def _finish(self, k: BatchKeys, index: int, custom_id: str, outcome: Outcome) -> None:
        done = batches.done(
            k,
            index,
            ok=outcome.ok,
            line=outcome.line,
            custom_id=custom_id,
            usage=outcome.usage,
            ttl=self.settings.file_ttl,
        )
        delay = 0.0
        while True:  # the result is in hand: wait out a Redis outage rather than run the item again
            try:
                await self.appender.call(done.script, done.keys, done.args)
                (metrics.BATCH_COMPLETED if outcome.ok else metrics.BATCH_FAILED).inc()
                return
            except Exception as exc:
                if self.stopping():
                    raise
                delay = await back_off(f"storing batch {k.batch_id}'s item {index}", exc, delay)

    async def renew(self) -> None:
        """Renews the running items' leases; stops the items of a batch that no longer runs."""
        by_batch: dict[str, list[int]] = {}
        for batch_id, index in list(self.running):
            by_batch.setdefault(batch_id, []).append(index)
        for batch_id, indexes in by_batch.items():
            k = self._keys[batch_id]
            status = await machine.call(self.redis, batches.renew(k, indexes, lease_ms=self.lease_ms))
            if status != b"in_progress":
                log.info("batch %s: %s; stopping its %d running item(s)", batch_id, status.decode(), len(indexes))
                await self._stop_items([(batch_id, i) for i in indexes])

    async def _stop_items(self, items: list[tuple[str, int]]) -> None:
        tasks = [t for t in (self.running.get(i) for i in items) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        by_batch: dict[str, list[int]] = {}
        for batch_id, index in items:
            by_batch.setdefault(batch_id, []).append(index)
        for batch_id, indexes in by_batch.items():
            try:
                async with asyncio.timeout(2):
                    await machine.call(
                        self.redis, batches.release(self._keys[batch_id], indexes, ttl=self.settings.file_ttl)
                    )
            except Exception as exc:  # their leases lapse, and TICK puts them back
                log.warning("batch %s: cannot hand back %d item(s) (%s)", batch_id, len(indexes), exc)

    async def tick(self) -> None:
        """Every active batch's TICK: dead workers' items back in line, expiry, cancel's end."""
        for member in await self.redis.zrange(keys.active_batches(), 0, -1):
            batch_id = member.decode()
            k = await self._batch(batch_id)
            if k is None:
                await self.redis.zrem(keys.active_batches(), batch_id)
                continue
            tick = batches.tick(k, ttl=self.settings.file_ttl)
            lapsed = await machine.call(self.redis, tick)
            while lapsed == -1:  # an expiry a chunk a call: other clients get Redis in between
                lapsed = await machine.call(self.redis, tick)
            if lapsed:
                log.warning("batch %s: %d item(s) lost their worker; running them again", batch_id, lapsed)

    async def run_until_idle(self) -> None:
        """Feeds, renews and ticks until no batch is active and nothing runs (tests, ``burst``)."""
        while True:
            await self.tick()
            await self.feed()
            await self.renew()
            if not self.running and not await self.redis.zcard(keys.active_batches()):
                return

    async def _forever(self, doing: str, step: Callable[[], Any]) -> None:
        delay = 0.0
        while True:
            try:
                await step()
                delay = 0.0
            except Exception as exc:
                delay = await back_off(doing, exc, delay)

    async def every(self, interval: float, step: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except Exception as exc:
                log.warning("batch items: %s", exc)


def _classify(exc: BaseException, timeout: float) -> Failure:
    if isinstance(exc, TimeoutError):
        return Failure(f"no answer from the LLM within {timeout:g} s", True)
    return classify(exc)


def _failed(custom_id: str, exc: BaseException | str, message: str) -> Outcome:
    """The error line: the upstream's own answer when it sent one (a 400, a last 500), else an error."""
    if isinstance(exc, openai.APIStatusError):
        try:
            data = exc.response.content or msgspec.json.encode(exc.body)
        except Exception:  # a body never read: what the SDK parsed of it
            data = msgspec.json.encode(exc.body)
        request_id = exc.response.headers.get("x-request-id") or _request_id()
        out = OutputLine(_line_id(), custom_id, Response(exc.status_code, request_id, _json_body(data)), None)
    else:
        code = exc if isinstance(exc, str) else "upstream_error"
        out = OutputLine(_line_id(), custom_id, None, OutputError(code, message))
    return Outcome(False, msgspec.json.encode(out), Usage())


def _json_body(data: bytes) -> msgspec.Raw:
    """The upstream's body as JSON: a proxy's HTML 502 or a truncated body becomes a JSON string,
    because a Raw is written into the error file as is and one bad line breaks every reader of it."""
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError:
        return msgspec.Raw(msgspec.json.encode(data.decode("utf-8", errors="replace")))
    return msgspec.Raw(data)


def _line_id() -> str:
    return f"batch_req_{secrets.token_hex(16)}"


def _request_id() -> str:
    return f"req_{secrets.token_hex(16)}"
