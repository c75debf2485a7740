"""``shared.metrics``: the loop's own histogram writes what prometheus-client's would; metrics off
make every call a no-op; an attempt's failure becomes one of a few causes."""

from __future__ import annotations

import subprocess
import sys

import httpx2
import openai
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from streambridge.shared import metrics
from streambridge.workers.llm import failure_cause
from streambridge.workers.pipeline import IncompleteStream, UpstreamTimeout

REQUEST = httpx2.Request("POST", "http://x/v1/chat/completions")


def test_the_loop_histogram_exposes_what_prometheus_clients_histogram_does() -> None:
    registry = CollectorRegistry()
    theirs = Histogram("lag_seconds", "help", buckets=metrics.LAG_BUCKETS, registry=registry)
    mine = CollectorRegistry()
    ours = metrics.LoopHistogram("lag_seconds", "help", metrics.LAG_BUCKETS, registry=mine)
    for value in (0.0001, 0.0005, 0.001, 0.0042, 0.0075, 0.3, 1.0, 7.5):
        theirs.observe(value)
        ours.observe(value)
    assert generate_latest(mine) == generate_latest(registry)


def test_metrics_off_turns_every_metric_into_a_no_op_and_metrics_into_a_404() -> None:
    # in a process of its own: turning them off is for good, and this one's tests count
    script = """
import asyncio
from streambridge.shared import metrics
metrics.disable()
assert not metrics.enabled
metrics.CHATS_CREATED.inc()
metrics.REFUSALS.labels("rate_limited").inc()
metrics.CHATS_FINISHED.labels("complete").inc()
metrics.DELIVERY_LAG.observe(0.001)
metrics.OPEN_STREAMS.dec()
metrics.RUNNING_CHATS.set_function(lambda: 1)
assert asyncio.run(metrics.metrics_response(None)).status == 404
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def status_error(status: int) -> openai.APIStatusError:
    response = httpx2.Response(status, json={"error": {"message": "no"}}, request=REQUEST)
    return openai.APIStatusError("no", response=response, body=None)


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (UpstreamTimeout("no first token"), "timeout"),
        (openai.APITimeoutError(REQUEST), "timeout"),
        (openai.APIConnectionError(request=REQUEST), "connection"),
        (status_error(429), "rate_limited"),
        (status_error(503), "server_error"),
        (status_error(400), "client_error"),
        (IncompleteStream("cut"), "broken_stream"),
        (httpx2.RemoteProtocolError("peer closed"), "broken_stream"),
        (ValueError("odd"), "other"),
    ],
)
def test_an_attempts_failure_has_one_of_a_few_causes(exc: BaseException, cause: str) -> None:
    assert failure_cause(exc) == cause
    assert cause in metrics.CAUSES


class _RedisClockAt:
    """A Redis whose TIME says the real time, whatever this host's (patched) clock says."""

    def __init__(self, real_time: object) -> None:
        self._real = real_time

    async def time(self) -> tuple[int, int]:
        now = self._real()  # type: ignore[operator]
        return int(now), int(now % 1 * 1_000_000)


async def test_delivery_lag_is_corrected_by_the_offset_to_redis_clock_and_negatives_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from streambridge.api.hub import StreamHub, Topic
    from streambridge.shared import keys

    real = time.time
    import fakeredis

    hub = StreamHub(_RedisClockAt(real), fakeredis.FakeAsyncRedis())  # type: ignore[arg-type]  # never started
    hub.topics["c1"] = Topic()
    lag, negative = metrics.DELIVERY_LAG, metrics.DELIVERY_LAG_NEGATIVE

    def publish(appended_ms: int) -> None:
        hub._publish(keys.notify("c1").encode(), b"%d-0\ndelta\n{}" % appended_ms)

    monkeypatch.setattr(time, "time", lambda: real() + 100.0)  # this host's clock: 100 s fast
    await hub.clock.read()
    assert hub.clock.offset == pytest.approx(-100.0, abs=0.05)
    assert metrics.REDIS_CLOCK_OFFSET._value.get() == pytest.approx(-100.0, abs=0.05)  # type: ignore[attr-defined]
    count, total = sum(lag._counts), lag._sum
    publish(int(real() * 1000) - 20)  # appended 20 ms ago, by Redis's clock
    assert sum(lag._counts) == count + 1
    assert 0.015 <= lag._sum - total < 0.5, "the lag is by Redis's clock, not 100 s"
    before = negative._value.get()
    publish(int(real() * 1000) + 60_000)  # "appended" a minute from now: the host's clock stepped back
    assert negative._value.get() == before + 1
    assert sum(lag._counts) == count + 1, "a negative lag is counted, not observed as 0"
