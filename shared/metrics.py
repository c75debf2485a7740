"""Every Prometheus metric of streambridge, in one place, as ``keys`` holds every Redis key.

Every process serves all of them on ``GET /metrics`` (one registry, defined at import), at 0
where it does not move them: the API and edge on their own port (``up``: API, edge and worker on
one), a worker on a port of its own (``STREAMBRIDGE_WORKER_METRICS_PORT``). Per-instance queries
filter by job (the dashboard does). Names follow Prometheus's conventions: the ``streambridge_``
prefix, base units (seconds), ``_total`` on counters.

Kept cheap where it runs often: a metric with a fixed set of labels is bound here, once, to each
label value (a child), so a call site costs one ``inc`` or ``observe``. Nothing is counted per token
or per byte: a chat's tokens are added once, when it ends; the edge's delivery lag is observed once
per notification (a batch of entries), not per reader. ``STREAMBRIDGE_METRICS=false`` swaps every
metric for a no-op (:func:`disable`), so the cost can be measured (``bench/metrics_cost.py``).

Call sites use them through the module (``metrics.CHATS_CREATED.inc()``), never ``from … import``:
that is what lets :func:`disable` swap them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from redis.asyncio import Redis
from redis.exceptions import RedisError

from streambridge.shared import keys

log = logging.getLogger("streambridge")

#: whether this process counts anything (``STREAMBRIDGE_METRICS``)
enabled = True
#: Prometheus's text format, which every Prometheus reads (``generate_latest`` writes it; the client's
#: own ``CONTENT_TYPE_LATEST`` names version 1.0.0 in recent releases, which older servers do not know)
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: how long a scrape waits for Redis (queue depths) before it answers without them
SCRAPE_REDIS_TIMEOUT: Final = 0.5
#: batches whose items the batch queue depth counts, at most (the oldest active ones)
DEPTH_BATCHES: Final = 100

# No ``_created`` series beside each counter and histogram: they would double what a scrape reads.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Buckets fit docs/benchmarks.md: pickup p50 ~1 ms and p99 ~5 ms under steady load, 25–60 ms in a
# burst; TTFT 50–75 ms steady, up to ~215 ms in a burst (and seconds for a real model); delivery lag
# p50 1–4 ms, p99 3–40 ms.
PICKUP_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TTFT_BUCKETS: Final = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)
DURATION_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 900)
TOKEN_RATE_BUCKETS: Final = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
LAG_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)

# -- the API --------------------------------------------------------------------------------------
CHATS_CREATED = Counter("streambridge_chats_created_total", "Chats accepted (POST /v1/chats and the OpenAI routes)")
QUEUE_DEPTH = Gauge(
    "streambridge_queue_depth",
    "Waiting work, read from Redis at scrape time: chats waiting for a worker (interactive), "
    "lines of active batches not done yet (batch). NaN when Redis did not answer in time.",
    ["queue"],
)
# (no children bound here: a process that never reads the depths, an edge, exports none)
REFUSALS = Counter(
    "streambridge_rate_limited_total",
    "Requests refused by a limit (429, and 503 overloaded), by the error code answered",
    ["code"],
)
STREAMS_EXPIRED = Counter(
    "streambridge_streams_expired_total",
    "Streams that could not go on: a 410 when opening one (at=open), or a stream ended because "
    "its client fell behind what the stream keeps (at=stream; its resume gets the 410)",
    ["at"],
)
EXPIRED_AT_OPEN = STREAMS_EXPIRED.labels("open")
EXPIRED_IN_STREAM = STREAMS_EXPIRED.labels("stream")
REDIS_ERRORS = Counter(
    "streambridge_redis_errors_total",
    "Redis errors: requests answered 503 (request), streams ended (stream), a worker's Redis calls "
    "that failed and were retried (worker), scrapes without a queue depth (scrape)",
    ["where"],
)
REDIS_ERRORS_REQUEST = REDIS_ERRORS.labels("request")
REDIS_ERRORS_STREAM = REDIS_ERRORS.labels("stream")
REDIS_ERRORS_WORKER = REDIS_ERRORS.labels("worker")
REDIS_ERRORS_SCRAPE = REDIS_ERRORS.labels("scrape")

# -- the edge ------------------------------------------------------------------------------------
OPEN_STREAMS = Gauge("streambridge_open_streams", "SSE streams open on this edge")


class LoopHistogram:
    """A histogram for the event loop's own thread, at a fifth of prometheus-client's cost per
    observation (which takes a lock per bucket it moves): plain counts, folded into cumulative
    buckets only when scraped. For the edge's delivery lag, observed once per notification.

    Observed and collected on the loop's thread only (the aiohttp handler of ``/metrics`` runs there).
    """

    _type = "histogram"

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry | None = REGISTRY
    ) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self._sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative, buckets = 0, []
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric([], buckets, self._sum)
        return [family]


DELIVERY_LAG = LoopHistogram(
    "streambridge_delivery_lag_seconds",
    "Append → write: from a live entry's append (its stream id's time, Redis's clock) to the edge's "
    "handling of its notification, when it is written at once to the native stream's waiting readers "
    "(readers behind, and the OpenAI routes' streams, are written later, by their own tasks). "
    "Measured by this host's clock corrected by its offset to Redis's; once per notification",
    LAG_BUCKETS,
)
DELIVERY_LAG_NEGATIVE = Counter(
    "streambridge_delivery_lag_negative_total",
    "Notifications whose lag came out negative (this host's clock moved against Redis's since the "
    "offset was last read): counted here, not observed",
)
REDIS_CLOCK_OFFSET = Gauge(
    "streambridge_redis_clock_offset_seconds",
    "Redis's clock minus this edge's, read with TIME every 30 s (midpoint of the round trip)",
)
RESYNCS = Counter(
    "streambridge_resyncs_total",
    "Readers sent back to re-read a chat's stream: too far behind the live feed (overflow), or the "
    "feed's subscription (re)confirmed (feed)",
    ["reason"],
)
RESYNC_OVERFLOW = RESYNCS.labels("overflow")
RESYNC_FEED = RESYNCS.labels("feed")

# -- the worker ----------------------------------------------------------------------------------
CHATS_FINISHED = Counter("streambridge_chats_finished_total", "Chats ended, by final status", ["status"])
PICKUP = Histogram(
    "streambridge_pickup_seconds",
    "Queued → started, for a chat's first start (Redis's clock)",
    buckets=PICKUP_BUCKETS,
)
TTFT = Histogram(
    "streambridge_time_to_first_token_seconds",
    "Accepted → first content appended, on a chat's first run (its retried attempts included); a chat "
    "resumed after its worker was lost is not observed again",
    buckets=TTFT_BUCKETS,
)
CHAT_DURATION = Histogram(
    "streambridge_chat_duration_seconds",
    "Accepted → ended, by final status",
    ["status"],
    buckets=DURATION_BUCKETS,
)
COMPLETION_TOKENS = Counter(
    "streambridge_completion_tokens_total",
    "Tokens of completed chats' answers (the upstream's usage; its content chunks where it sends none)",
)
TOKEN_RATE = Histogram(
    "streambridge_tokens_per_second",
    "A completed chat's streaming rate: its answer tokens after the first, per second from its completing "
    "attempt's first content to its end (time to first token left out); completions without content "
    "(tool calls only) or of one token are not observed",
    buckets=TOKEN_RATE_BUCKETS,
)
ATTEMPT_FAILURES = Counter(
    "streambridge_attempt_failures_total",
    "Attempts that failed, by cause (timeout, connection, rate_limited, server_error, client_error, "
    "broken_stream, other)",
    ["cause"],
)
RETRIES = Counter("streambridge_retries_total", "Attempts retried after a failure, by the failure's cause", ["cause"])
RECOVERIES = Counter(
    "streambridge_recoveries_total",
    "Chats re-queued because their worker died (reaped), resumed by a later attempt after one was "
    "interrupted (resumed), handed back by a stopping worker or after a gap in Redis (handed_back)",
    ["kind"],
)
REAPED = RECOVERIES.labels("reaped")
RESUMED = RECOVERIES.labels("resumed")
HANDED_BACK = RECOVERIES.labels("handed_back")
RUNNING_CHATS = Gauge("streambridge_running_chats", "Chats running on this worker")
RUNNING_BATCH_ITEMS = Gauge(
    "streambridge_running_batch_items", "Batch items running on this worker (in its batch lane, as of 0.2 s ago)"
)
BATCH_ITEMS = Counter("streambridge_batch_items_total", "Batch items finished, by outcome", ["outcome"])
BATCH_COMPLETED = BATCH_ITEMS.labels("completed")
BATCH_FAILED = BATCH_ITEMS.labels("failed")

FINAL_STATUSES: Final = ("complete", "failed", "cancelled")
CAUSES: Final = ("timeout", "connection", "rate_limited", "server_error", "client_error", "broken_stream", "other")
# Every label value is exported from the start (at 0), so rates and dashboards see series before
# their first event.
for _status in FINAL_STATUSES:
    CHATS_FINISHED.labels(_status)
    CHAT_DURATION.labels(_status)
# a chat cancelled while queued ends in the API (no worker runs it), which counts it with these
CHATS_FINISHED_CANCELLED = CHATS_FINISHED.labels("cancelled")
CHAT_DURATION_CANCELLED = CHAT_DURATION.labels("cancelled")
for _cause in CAUSES:
    ATTEMPT_FAILURES.labels(_cause)
    RETRIES.labels(_cause)


class _Off:
    """What every metric becomes when metrics are off: each call does nothing."""

    def labels(self, *args: Any, **kwargs: Any) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def set_function(self, f: Any) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


def disable() -> None:
    """Turns every metric of this process into a no-op (``STREAMBRIDGE_METRICS=false``), for good."""
    global enabled
    enabled = False
    off = _Off()
    module = globals()
    for name, value in list(module.items()):
        if isinstance(value, MetricWrapperBase | LoopHistogram):
            module[name] = off


def exposition() -> tuple[bytes, str]:
    """This process's metrics in Prometheus's text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE


async def refresh_queue_depth(redis: Redis) -> None:
    """Reads the deployment's queue depths into :data:`QUEUE_DEPTH` (NaN if Redis is slow or gone).

    Every process that serves them reads the same values: aggregate them with ``max``, not ``sum``.
    """
    try:
        async with asyncio.timeout(SCRAPE_REDIS_TIMEOUT):
            interactive, batch = await _queue_depths(redis)
    except (RedisError, OSError, TimeoutError):  # not a bug of ours: that raises, and is logged as one
        REDIS_ERRORS_SCRAPE.inc()
        interactive = batch = float("nan")
    QUEUE_DEPTH.labels("interactive").set(interactive)
    QUEUE_DEPTH.labels("batch").set(batch)


async def _queue_depths(redis: Redis) -> tuple[float, float]:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.queue())
        pipe.zrange(keys.active_batches(), 0, DEPTH_BATCHES - 1)
        interactive, batch_ids = await pipe.execute()
    batch = 0
    if batch_ids:
        async with redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hmget(keys.batch(batch_id.decode()), ["total", "completed", "failed"])
            for total, completed, failed in await pipe.execute():
                batch += max(0, int(total or 0) - int(completed or 0) - int(failed or 0))
    return float(interactive), float(batch)


#: how long a readiness check waits for Redis's PING
READY_PING_TIMEOUT: Final = 1.0


#: called before each scrape: what a child process counted is added here (``workers/lane.py``)
BEFORE_SCRAPE: list[Callable[[], None]] = []


async def metrics_response(redis: Redis | None) -> web.Response:
    """``GET /metrics``: with ``redis``, the queue depths are read first (see :func:`refresh_queue_depth`)."""
    if not enabled:
        body = _error("metrics_disabled", "metrics are off in this process (STREAMBRIDGE_METRICS=false)")
        return web.Response(status=404, body=body, content_type="application/json")
    for sync in BEFORE_SCRAPE:
        sync()
    if redis is not None:
        await refresh_queue_depth(redis)
    body, content_type = exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def readiness_response(
    redis: Redis | None, not_ready: str | None, more: dict[str, str] | None = None
) -> web.Response:
    """``GET /readyz``: 200 when the process serves (``not_ready`` is None), Redis answers a PING
    within :data:`READY_PING_TIMEOUT` and every check of ``more`` says ``ok``; else 503 with the error
    body and what each check found."""
    checks = {"process": not_ready or "ok", "redis": "not checked", **(more or {})}
    if redis is not None:
        try:
            async with asyncio.timeout(READY_PING_TIMEOUT):
                await redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            # the exception's type, not its text: that names Redis's host and port, which a probe's
            # answer need not tell whoever can reach /readyz (the log has it)
            checks["redis"] = f"unreachable: {type(exc).__name__}"
            log.warning("readiness: Redis unreachable: %s: %s", type(exc).__name__, exc)
    if all(v == "ok" for v in checks.values()):
        return web.json_response({"status": "ready", "checks": checks})
    failed = [f"Redis is {found}" if name == "redis" else found for name, found in checks.items() if found != "ok"]
    problem = not_ready or "; ".join(failed)
    body = {"error": {"code": "not_ready", "message": problem, "type": "server_error", "param": None}}
    return web.json_response({**body, "status": "not_ready", "checks": checks}, status=503)


def _error(code: str, message: str) -> bytes:
    error = {"code": code, "message": message, "type": "not_found_error", "param": None}
    return json.dumps({"error": error}).encode()
