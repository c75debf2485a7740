"""Appends events to a chat's Redis Stream: fenced, idempotent, coalesced.

Each batch is one Lua call (``shared.machine.APPEND``) that, atomically:
- checks the attempt's lease token (a worker that lost its lease appends nothing more);
- skips a batch whose sequence number was already applied (a retry after a dropped
  connection must not append the same events twice), and refuses one whose predecessor is
  missing (Redis lost writes in a crash: the attempt must not go on with a hole in its text);
- XADDs each event, then PUBLISHes the whole batch on the chat's channel in one message (an
  edge then reads one message and writes to each client once per batch, not per event);
- with an attempt's ``started`` event, records the attempt on the chat, so a re-run after a
  crash numbers its attempt after it (and the attempt's request goes out one round trip sooner
  than with a write of its own before it).

Events handed over while a batch is in flight go out together in the next one, so a
fast provider costs one round trip per batch, not per token, and an idle one no delay. And
every chat of a worker sends its batches through the worker's ``Appender``: one pipeline per
round trip, however many chats stream at once. A batch goes from ``append`` itself and its answer
is taken by a callback, which sends the next: no task per batch (docs/benchmarks.md).

With ``coalesce`` (seconds, > 0) a batch that would go out alone waits instead for the next tick
of a clock every sink of the loop shares (the loop's time at multiples of ``coalesce``): tokens
that each arrive alone, a slow stream's or many chats', then go out together, one round trip a
tick for all of a worker's chats rather than one each, for at most ``coalesce`` s of added lag.
A tick is one timer for every sink; a sink waiting for it holds no task until it fires. ``drain``
(and so ``finish``) sends at once: an attempt's end waits for no tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, get_args

import msgspec

from streambridge.shared import machine
from streambridge.shared.chats import ChatResult
from streambridge.shared.errors import StreambridgeError
from streambridge.shared.events import Event, Started, encode_event, event_type
from streambridge.workers.appender import Appender

# Each event type's name (its tag), as the bytes the APPEND call sends.
_TYPES: Final[dict[type, bytes]] = {t: str(t.__struct_config__.tag).encode() for t in get_args(Event)}

#: seconds a batch that would go alone waits for other chats' (``StreamSink(coalesce=)``), until the
#: the default of ``coalesce`` (``STREAMBRIDGE_APPEND_COALESCE_MS`` / 1000): 0 sends at once
COALESCE: Final = 0.0

#: beyond this many unsent events, ``append`` waits for the batch in flight
MAX_PENDING: Final = 1000


class LeaseLost(StreambridgeError):
    """Another attempt owns the chat now; this one must stop writing."""


class StreamGap(StreambridgeError):
    """An earlier batch of this attempt is not in Redis (lost in a crash); the attempt must restart."""


class _Tick:
    """Callbacks to run together at one instant: one timer for them all."""

    __slots__ = ("callbacks", "due", "fired", "loop", "period")

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float, due: float) -> None:
        self.loop, self.period, self.due = loop, period, due
        self.callbacks: list[Callable[[], None]] = []
        self.fired = False  # a timer may fire a little early by the loop's clock: a late comer takes the next
        loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self.fired = True
        for callback in self.callbacks:
            callback()


_tick: _Tick | None = None


def at_next_tick(period: float, callback: Callable[[], None]) -> None:
    """Calls ``callback`` at the running loop's next multiple of ``period`` seconds."""
    global _tick
    loop = asyncio.get_running_loop()
    due = (loop.time() // period + 1) * period
    tick = _tick
    if tick is None or tick.fired or tick.due != due or tick.loop is not loop or tick.period != period:
        tick = _tick = _Tick(loop, period, due)
    tick.callbacks.append(callback)


class StreamSink:
    def __init__(
        self,
        redis: machine.Store,
        chat_id: str,
        token: str,
        *,
        maxlen: int,
        appender: Appender | None = None,
        publish: str = machine.PUBLISH,
        coalesce: float = COALESCE,
    ) -> None:
        self._redis = redis
        self._own_appender = appender is None  # its connection is this sink's to close
        self._appender = appender or Appender(redis)
        self._chat_id = chat_id
        self._publish = publish  # the command that announces entries: SPUBLISH on a cluster
        self._keys = machine.append_keys(chat_id)
        self._token = token
        self._maxlen = str(maxlen)
        self._pending: list[Event] = []
        self._started = ""  # the attempt a pending ``started`` event opens, recorded with its batch
        self._seq = 0
        self._flight: asyncio.Future[int] | None = None  # the answer to the batch in flight
        self._due = False  # a batch goes at the end of this turn of the loop
        self._failure: BaseException | None = None  # what the last batch raised: append and drain raise it
        self._coalesce = coalesce
        self._ticking = False  # a flush waits for the next tick
        self._closed = False

    async def append(self, event: Event) -> None:
        self._pending.append(event)
        if isinstance(event, Started):
            self._started = str(event.attempt)
        if self._flight is None:
            self._raise_failure()
            if len(self._pending) >= MAX_PENDING:
                self._send()  # now: a producer that never yields must not pile up more
            elif self._coalesce <= 0:
                self._send_soon()
            elif not self._ticking:
                self._ticking = True
                at_next_tick(self._coalesce, self._start_flush)
        elif len(self._pending) >= MAX_PENDING:
            await asyncio.wait((self._flight,))  # it lands, and the next batch takes these
            self._raise_failure()

    def _start_flush(self) -> None:
        self._ticking = False
        # one in flight takes the pending events when it lands; a failed one's error is append's to raise
        if self._flight is None and self._failure is None:
            self._send_soon()

    async def drain(self) -> None:
        """Wait until every event handed over is in Redis; raise what an append raised."""
        if self._ticking:
            self._raise_failure()
            self._start_flush()  # now, not at the tick: whoever drains waits for it
        while self._flight is not None or self._due:
            if self._flight is None:
                await asyncio.sleep(0)  # the batch goes
            else:
                await asyncio.wait((self._flight,))
        self._raise_failure()

    async def finish(self, terminal: Event, result: ChatResult, *, result_ttl: int, stream_ttl: int) -> None:
        """Append the terminal event and store the result, atomically; then the lease is gone."""
        await self.drain()
        self._seq += 1
        args: list[str | bytes] = [self._token, str(self._seq), self._maxlen, event_type(terminal)]
        args += [encode_event(terminal), result.status, msgspec.json.encode(result), str(result_ttl)]
        args += [str(stream_ttl), self._publish]
        self._check(await self._appender.call(machine.FINISH, self._keys, args, durable=True))

    async def close(self) -> None:
        self._closed = True
        flight, self._flight = self._flight, None
        if flight is not None or self._pending:  # a drain waiting for them hears it
            self._failure = self._failure or StreambridgeError("the sink closed before its events were in Redis")
        if flight is not None:
            flight.cancel()  # its call still goes (numbered batches skip none); its answer is nobody's
        if self._own_appender:
            await self._appender.close()

    def _send_soon(self) -> None:
        """At the end of this turn of the loop: events handed over in the same turn (a read that
        held many chunks) go in one batch."""
        if not self._due:
            self._due = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        """The pending events as one APPEND; :meth:`_landed` takes its answer."""
        self._due = False
        if self._closed or not self._pending or self._flight is not None or self._failure is not None:
            return
        try:
            args: list[str | bytes] = [self._token, str(self._seq + 1), self._maxlen, self._started, self._publish]
            for event in self._pending:
                args.append(_TYPES[type(event)])
                args.append(encode_event(event))
            self._flight = self._appender.submit(machine.APPEND, self._keys, args)
        except Exception as exc:  # (an event that cannot be encoded): append and drain raise it, not the loop
            self._failure = exc
            return
        self._seq += 1
        self._pending, self._started = [], ""
        self._flight.add_done_callback(self._landed)

    def _landed(self, flight: asyncio.Future[int]) -> None:
        if flight is not self._flight:  # closed meanwhile
            if not flight.cancelled():
                flight.exception()  # retrieved: nobody else will
            return
        self._flight = None
        if flight.cancelled():  # the worker's appender closed under a running chat
            self._failure = StreambridgeError("the worker stopped appending")
            return
        try:
            self._check(flight.result())
        except Exception as exc:
            self._failure = exc
            return
        self._send()

    def _check(self, applied: int) -> None:
        if applied == -1:
            raise LeaseLost("the chat's lease belongs to another attempt")
        if applied == -2:
            raise StreamGap("Redis lost an earlier batch of this attempt's events")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
