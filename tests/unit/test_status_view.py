"""``streambridge status``'s drawing of a snapshot, the records' wire shape, and the per-minute window."""

from __future__ import annotations

import asyncio
import signal
import time
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from aiohttp import web
from rich.console import Console

from streambridge.api.presence import ServerDescriber
from streambridge.shared import presence
from streambridge.shared.errors import StreambridgeError
from streambridge.shared.presence import ServerRecord, WorkerRecord, decode_record, encode_record
from streambridge.shared.status import BatchProgress, Snapshot
from streambridge.status_view import age, render, unreachable
from streambridge.workers.presence import LastMinute, WorkerDescriber

NOW = 1_800_000_000.0


def worker(n: int, **fields: Any) -> WorkerRecord:
    defaults: dict[str, Any] = {
        "host": "h1",
        "pid": 100 + n,
        "started_at": NOW - 125,
        "uptime_s": 125.0,
        "concurrency": 50,
    }
    return WorkerRecord(id=f"worker-h1-{100 + n}-aaaa", **{**defaults, **fields})


def server(name: str, serves: list[str], open_streams: int = 0) -> ServerRecord:
    return ServerRecord(
        id=f"{name}-h2-7-bbbb",
        host="h2",
        pid=7,
        started_at=NOW - 3700,
        uptime_s=3700.0,
        port=8001,
        serves=serves,
        open_streams=open_streams,
    )


def snapshot(**fields: Any) -> Snapshot:
    empty: dict[str, Any] = {
        "at": NOW,
        "queued": 0,
        "running": 0,
        "batch_waiting": 0,
        "batch_running": 0,
        "chats_per_minute": 0,
        "workers": [],
        "servers": [],
        "batches": [],
    }
    return Snapshot(**{**empty, **fields})


def drawn(s: Snapshot, width: int = 160) -> str:
    console = Console(record=True, width=width, force_terminal=False, color_system=None)
    console.print(render(s))
    return console.export_text()


def test_the_summary_line_shows_both_queues_and_the_chats_live_workers_started_per_minute() -> None:
    text = drawn(snapshot(queued=1234, running=56, batch_waiting=7890, batch_running=12, chats_per_minute=345))
    first = text.splitlines()[0]
    assert "queue 1,234 waiting · 56 running" in first
    assert "orphaned" not in first
    assert "batch items 7,890 waiting · 12 running" in first
    assert "≥" not in first
    assert "started/min (live workers) 345" in first


def test_chats_and_batch_items_whose_worker_was_lost_show_as_orphaned() -> None:
    text = drawn(snapshot(running=2, orphaned=3, batch_waiting=10, batch_orphaned=4))
    first = text.splitlines()[0]
    assert "queue 0 waiting · 2 running · 3 orphaned (worker lost)" in first
    assert "batch items 10 waiting · 0 running (4 of them orphaned)" in first


def test_batch_sums_past_the_batches_read_are_marked_as_at_least() -> None:
    text = drawn(snapshot(batch_waiting=7890, batch_running=12, batches_not_shown=3))
    assert "batch items ≥7,890 waiting · ≥12 running" in text.splitlines()[0]


def test_up_is_the_process_own_uptime_whatever_its_hosts_clock_says() -> None:
    ahead = worker(1, started_at=NOW + 3600, uptime_s=125.0)  # its host's clock is an hour ahead
    behind = server("edge", ["edge"])
    behind.started_at, behind.uptime_s = NOW - 7200, 65.0  # an hour behind
    text = drawn(snapshot(workers=[ahead], servers=[behind]))
    assert "2m05s" in next(line for line in text.splitlines() if "worker-h1-101-aaaa" in line)
    assert "1m05s" in next(line for line in text.splitlines() if "edge-h2-7-bbbb" in line)


def test_a_describer_counts_uptime_by_the_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the host's clock jumps an hour
    fake: Any = SimpleNamespace(max_jobs=8, allow_pick_jobs=True, chats_started=0, ctx={})
    record = WorkerDescriber(fake)()
    assert record.started_at > real() + 3000  # kept for information, by the host's clock
    age = time.monotonic() - presence._STARTED  # this test process's age, not an hour more or less
    assert abs(record.uptime_s - age) < 1
    text = drawn(snapshot(at=real(), workers=[record]))
    assert "1h" not in next(line for line in text.splitlines() if record.id[:10] in line)


def test_a_state_this_version_does_not_know_is_shown_as_it_is() -> None:
    wire = b'{"kind":"worker","id":"w","host":"h","pid":1,"started_at":0,"state":"draining"}'
    record = decode_record(wire)
    assert isinstance(record, WorkerRecord)
    assert record.state == "draining"
    assert "w (draining)" in drawn(snapshot(workers=[record]))


def test_a_server_shows_stopping_once_its_stop_signal_came() -> None:
    loop = asyncio.new_event_loop()
    try:
        stop: asyncio.Future[Any] = loop.create_future()
        describe = ServerDescriber(web.Application(), 8001, api=False, edge=True, stop=stop)
        assert describe().state == "running"
        stop.set_result(signal.SIGTERM)
        assert describe().state == "stopping"
    finally:
        loop.close()


def test_the_unreachable_view_keeps_the_last_snapshot_and_its_age() -> None:
    seen = snapshot(workers=[worker(1)])
    console = Console(record=True, width=160, force_terminal=False, color_system=None)
    console.print(unreachable(StreambridgeError("status: cannot read"), (seen, time.monotonic() - 75)))
    text = console.export_text()
    assert "status: cannot read; trying again" in text
    assert "last seen 1m15s ago:" in text
    assert "worker-h1-101-aaaa" in text


def test_an_empty_deployment_says_nothing_is_alive_rather_than_drawing_empty_tables() -> None:
    text = drawn(snapshot())
    assert "no worker alive: queued chats wait" in text
    assert "no API or edge alive" in text
    assert "no batch running" in text


def test_each_worker_shows_what_it_runs() -> None:
    busy = worker(
        1,
        chats=5,
        chat_ids=["0123456789abcdef0123", "c2", "c3", "c4", "c5"],
        batch_items={"batch_x": 3},
        chats_last_minute=42,
    )
    text = drawn(snapshot(workers=[busy, worker(2, state="stopping")]))
    assert "workers (2)" in text
    row = next(line for line in text.splitlines() if "worker-h1-101-aaaa" in line)
    assert "5/50" in row
    assert "2m05s" in row  # up for
    assert "42" in row
    assert "0123456789a…, c2, c3, +2 more, batch_x×3" in row  # chat ids cut; the rest counted
    assert "worker-h1-102-aaaa (stopping)" in text


def test_servers_show_what_they_serve_and_the_open_streams_of_edges() -> None:
    s = snapshot(servers=[server("api", ["api"]), server("edge", ["edge"], 17), server("api+edge", ["api", "edge"], 3)])
    text = drawn(s)
    assert "api and edges (3, 20 open streams)" in text
    rows = {line.split()[1]: line for line in text.splitlines() if "-h2-7-bbbb" in line}
    assert rows["api-h2-7-bbbb"].rstrip(" │").endswith("-")  # an API holds no streams
    assert rows["edge-h2-7-bbbb"].rstrip(" │").endswith("17")
    assert "api + edge" in rows["api+edge-h2-7-bbbb"]
    assert "1h01m" in rows["edge-h2-7-bbbb"]


def test_a_running_batch_shows_its_progress() -> None:
    batch = BatchProgress(
        id="batch_abc",
        owner="acme",
        status="in_progress",
        total=1000,
        completed=400,
        failed=100,
        running=50,
        waiting=450,
        created_at=int(NOW) - 60,
        expires_at=int(NOW) + 7200,
    )
    text = drawn(snapshot(batches=[batch], batches_not_shown=4))
    assert "batches (1, 4 more not shown" in text
    assert "finished" in text
    row = next(line for line in text.splitlines() if "batch_abc" in line)
    for cell in ("acme", "in_progress", "500/1,000", "100", "50", "450", "2h00m"):
        assert cell in row
    assert "━" in row  # the bar


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(-3, "0s"), (0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (90061, "1d01h")],
)
def test_ages_read_in_two_units_at_most(seconds: float, shown: str) -> None:
    assert age(seconds) == shown


def test_records_cross_processes_as_tagged_json() -> None:
    record = worker(1, chats=1, chat_ids=["c1"], batch_items={"b": 2})
    wire = encode_record(record)
    assert msgspec.json.decode(wire)["kind"] == "worker"
    assert decode_record(wire) == record
    assert decode_record(encode_record(server("edge", ["edge"], 3))) == server("edge", ["edge"], 3)


def test_a_record_from_a_newer_process_with_more_fields_still_reads() -> None:
    wire = b'{"kind":"server","id":"e","host":"h","pid":1,"started_at":0,"serves":["edge"],"open_streams":2,"new":1}'
    record = decode_record(wire)
    assert isinstance(record, ServerRecord)
    assert record.open_streams == 2


def test_last_minute_counts_what_the_total_grew_by_in_the_last_sixty_seconds() -> None:
    clock = [0.0]
    window = LastMinute(clock=lambda: clock[0])
    assert window.count(0) == 0
    for second in range(1, 61):
        clock[0] = float(second)
        assert window.count(second * 2) == second * 2  # all within the minute so far
    clock[0] = 90.0
    assert window.count(200) == 200 - 60  # growth since the sample taken at 30 s
    clock[0] = 200.0
    assert window.count(200) == 0  # nothing for over a minute


def test_a_worker_describes_its_chats_batch_items_and_state() -> None:
    runner = SimpleNamespace(active={"c1": None, "c2": None})
    feeder = SimpleNamespace(running={("b1", 0): None, ("b1", 4): None, ("b2", 1): None})
    fake: Any = SimpleNamespace(max_jobs=8, allow_pick_jobs=True, chats_started=0, ctx={})
    describe = WorkerDescriber(fake)
    assert describe().chats == 0  # before its startup filled ctx in

    fake.ctx.update(runner=runner, batches=feeder)
    fake.chats_started, fake.allow_pick_jobs = 7, False
    record = describe()
    assert (record.concurrency, record.chats, record.chat_ids) == (8, 2, ["c1", "c2"])
    assert record.batch_items == {"b1": 2, "b2": 1}
    assert record.state == "stopping"
    assert record.chats_last_minute == 7
    assert record.id.startswith("worker-")
    assert record.id == describe().id


def test_a_workers_record_names_the_batches_its_lane_runs() -> None:
    import multiprocessing

    from streambridge.workers.lane import RUNNING_BY_BATCH, BatchLane, _tell_running

    lane = BatchLane.__new__(BatchLane)  # its shared memory only: no process
    lane._by_batch = multiprocessing.get_context("spawn").Array("c", RUNNING_BY_BATCH)  # type: ignore[assignment]
    lane._process = SimpleNamespace(pid=1, exitcode=None)  # type: ignore[assignment]  # a lane that runs
    _tell_running({("b1", 0): 1, ("b1", 1): 1, ("b2", 4): 1}, lane._by_batch, b"")  # as the lane does
    fake: Any = SimpleNamespace(max_jobs=8, allow_pick_jobs=True, chats_started=0, ctx={}, lane=lane)
    assert WorkerDescriber(fake)().batch_items == {"b1": 2, "b2": 1}
    many = {(f"batch_{n:04d}_{'x' * 40}", 0): 1 for n in range(200)}  # more than the memory holds
    _tell_running(many, lane._by_batch, b"")
    assert 0 < len(WorkerDescriber(fake)().batch_items) < 200
    lane._process = SimpleNamespace(pid=1, exitcode=-9)  # type: ignore[assignment]  # killed: what it told is stale
    assert WorkerDescriber(fake)().batch_items == {}
