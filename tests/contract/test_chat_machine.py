"""The chat's state machine (``shared.machine``), run on fakeredis, on a real redis-server, and with
the chats' own keys on a real 6-node Redis Cluster (``tests/cluster.py``) beside a control Redis.

Every transition, the races between them, the crashes between a transition's two halves, and every
script sent twice (a reply lost on a dropped connection): the state afterwards is what one run leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import fakeredis
import pytest
from redis.asyncio import Redis

from streambridge.shared import keys, machine
from streambridge.shared.jobs import JOB_EXPIRES_MS, job_record
from streambridge.shared.redis import connect_streams
from streambridge.workers import lease as lease_module
from streambridge.workers import reaper
from streambridge.workers.lease import Lease, recover
from streambridge.workers.reaper import reap

CHAT = "c" * 32
OWNER = "visitor_1"
CRED = "0123456789abcdef"
WORKER = "w1"
#: a heartbeat that lapses within the test (ms)
SHORT_MS = 150
LIMITS = machine.Admission(max_queue=100, chats_per_minute=100, max_running=100, deadline_ms=60_000, result_ttl=600)
#: a deployment whose queue is full: every admission is refused
FULL: Final = machine.Admission(max_queue=0, chats_per_minute=100, max_running=100, deadline_ms=60_000, result_ttl=600)


@dataclass
class Stores:
    control: Redis
    streams: Any  # the control client itself, or a cluster's

    @property
    def publish(self) -> str:
        return machine.publish_command(self.streams)


@pytest.fixture(params=["fakeredis", "redis-server", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    if request.param == "fakeredis":
        control: Redis = fakeredis.FakeAsyncRedis()
    else:
        control = Redis.from_url(request.getfixturevalue("redis_url"))
    streams: Any = control
    if request.param == "cluster":
        streams = connect_streams(request.getfixturevalue("redis_cluster").url, max_connections=8)
    await control.set(keys.credential(CRED), b"{}")
    yield Stores(control, streams)
    await control.flushdb()
    if streams is not control:
        for key in await state_keys(streams):
            await streams.delete(key)
        await streams.aclose()
    await control.aclose()


async def state_keys(streams: Any) -> list[bytes]:
    return sorted(
        {k for chat in (CHAT, "a" * 32, "b" * 32, "d" * 32, "e" * 32) for k in await _chat_keys(streams, chat)}
    )


async def _chat_keys(streams: Any, chat_id: str) -> list[bytes]:
    found = []
    for key in (keys.chat(chat_id), keys.events(chat_id), keys.lease(chat_id)):
        if await streams.exists(key):
            found.append(key.encode())
    return found


def _text(answer: Any) -> Any:
    if isinstance(answer, list):
        return [a.decode() if isinstance(a, bytes) else a for a in answer]
    return answer.decode() if isinstance(answer, bytes) else answer


async def run(client: Any, c: machine.Call) -> Any:
    return _text(await machine.call(client, c))


async def admit(
    s: Stores,
    chat_id: str = CHAT,
    *,
    request: bytes = b'{"messages":[]}',
    key: str | None = None,
    limits: machine.Admission = LIMITS,
    replay: bool = True,
) -> list[str]:
    """Both halves, as ``api.limits.admit_chat`` sends them (the hash, then the job)."""
    created = machine.create(chat_id, OWNER, created_at="2026-12-02T00:00:00.000Z", request=request, result_ttl=600)
    await run(s.streams, created)
    answer: list[str] = await run(
        s.control,
        machine.admit(
            chat_id,
            OWNER,
            CRED,
            request=request,
            job=job_record(chat_id),
            job_expires_ms=JOB_EXPIRES_MS,
            limits=limits,
            idempotency_key=key,
            replay=replay,
        ),
    )
    if answer[0] != "ok":
        await s.streams.delete(keys.chat(chat_id))
    return answer


def lease(s: Stores, token: str = "t1", chat_id: str = CHAT, worker: str = WORKER) -> Lease:
    return Lease(s.control, s.streams, worker, chat_id, token)


async def start(
    s: Stores, token: str = "t1", chat_id: str = CHAT, worker: str = WORKER, *, beat: bool = True
) -> tuple[str, Lease]:
    """A start by ``worker``, as its worker does (list, claim, take); with ``beat``, a worker that
    has no heartbeat yet gets one first (a worker beats before it takes chats)."""
    if beat and await s.control.zscore(keys.workers(), worker) is None:
        await run(s.control, machine.heartbeat(worker, 60_000, first=True))
    le = lease(s, token, chat_id, worker)
    return await le.claim(), le


async def lapse(s: Stores, worker: str = WORKER) -> None:
    """The worker's heartbeat lapses now: its last beat was SHORT_MS long. (Beaten that short before
    a start, it could lapse before the start on a loaded host, and the start be refused.)"""
    await run(s.control, machine.heartbeat(worker, SHORT_MS))
    await asyncio.sleep(SHORT_MS / 1000 + 0.05)


def cancelling(s: Stores, chat_id: str = CHAT) -> machine.Call:
    return machine.cancel(chat_id, result=b'{"status":"cancelled"}', stream_ttl=60, publish=s.publish)


async def status(s: Stores, chat_id: str = CHAT) -> str | None:
    value = await s.streams.hget(keys.chat(chat_id), "status")
    return value.decode() if value is not None else None


async def redis_ms(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds * 1000 + micros // 1000)


async def listed(s: Stores, worker: str = WORKER) -> dict[bytes, bytes]:
    return await s.control.hgetall(keys.worker_chats(worker))  # type: ignore[no-any-return,misc]


async def state(s: Stores) -> dict[str, object]:
    """Every key and its value on both Redis; scores that come from the clock are shown only as present."""
    dump: dict[str, object] = {}
    for client, names in ((s.control, await s.control.keys("*")), (s.streams, await state_keys(s.streams))):
        for raw in sorted(names):
            key = raw.decode()
            kind = (await client.type(raw)).decode()
            if kind == "hash":
                dump[key] = await client.hgetall(raw)
            elif kind == "zset":
                dump[key] = sorted(m for m, _ in await client.zrange(raw, 0, -1, withscores=True))
            elif kind == "list":
                dump[key] = await client.lrange(raw, 0, -1)
            elif kind == "stream":
                dump[key] = [f for _, f in await client.xrange(raw)]
            else:
                dump[key] = await client.get(raw) if not key.startswith("arq:job:") else "job record"
    return dump


async def test_admission_records_a_queued_chat_its_job_and_its_wake_token(store: Stores) -> None:
    assert await admit(store) == ["ok"]
    assert await status(store) == "queued"
    assert await store.control.zrange(keys.queue(), 0, -1) == [CHAT.encode()]
    assert await store.control.exists(keys.job(CHAT))
    assert await store.control.lrange(keys.wake(), 0, -1) == [CHAT.encode()]  # type: ignore[misc]
    assert await store.control.zrange(keys.active(OWNER), 0, -1) == [CHAT.encode()]
    assert await store.control.get(keys.rate(OWNER)) == b"1"


async def test_admission_sent_twice_makes_one_chat_and_counts_it_once(store: Stores) -> None:
    await admit(store)
    once = await state(store)
    assert await admit(store) == ["ok"]
    assert await state(store) == once


async def test_admission_replayed_after_the_chat_started_leaves_it_running(store: Stores) -> None:
    await admit(store)
    assert (await start(store))[0] == "claimed"
    assert await admit(store) == ["ok"]
    assert await status(store) == "running"
    assert await store.control.zcard(keys.queue()) == 0


async def test_admission_replayed_by_a_user_at_the_running_limit_is_not_refused(store: Stores) -> None:
    one = machine.Admission(max_queue=100, chats_per_minute=1, max_running=1, deadline_ms=60_000, result_ttl=600)
    assert await admit(store, limits=one) == ["ok"]
    assert await admit(store, limits=one) == ["ok"]  # not 429 for the chat it already made


async def test_an_idempotency_key_returns_the_first_chat_and_refuses_a_different_request(store: Stores) -> None:
    assert await admit(store, key="k-1") == ["ok"]
    assert await admit(store, "d" * 32, key="k-1") == ["replay", CHAT]
    assert not await store.streams.exists(keys.chat("d" * 32)), "the repeat's own record is taken back"
    assert await store.control.zcard(keys.queue()) == 1
    assert await admit(store, "e" * 32, request=b'{"other":1}', key="k-1") == ["reused"]
    assert await admit(store, "e" * 32, key="k-2") == ["ok"]
    assert 0 < await store.control.ttl(keys.idempotency(OWNER, "k-1")) <= 86_400


async def test_a_start_lists_the_chat_claims_the_lease_and_takes_the_job_off_the_queue(store: Stores) -> None:
    await admit(store)
    outcome, le = await start(store)
    assert outcome == "claimed"
    assert le.owner == OWNER
    assert le.chat[b"status"] == b"running"
    assert int(le.chat[b"created_ms"]) <= le.started_ms
    assert await store.control.zcard(keys.queue()) == 0
    assert not await store.control.exists(keys.job(CHAT))
    assert await store.streams.hget(keys.lease(CHAT), "token") == b"t1"
    assert await store.streams.ttl(keys.lease(CHAT)) == -1, "a lease lives as long as its worker's heartbeat"
    assert await listed(store) == {CHAT.encode(): b"t1"}


async def test_a_start_records_its_pickup_in_microseconds_from_admission(store: Stores) -> None:
    await admit(store)
    await asyncio.sleep(0.0025)
    await start(store)
    chat = await store.streams.hgetall(keys.chat(CHAT))
    pickup_us = int(chat[b"pickup_us"])
    # at least the wait; and finer than the millisecond figure, which rounds it
    assert 2500 <= pickup_us < 1_000_000
    assert int(chat[b"queued_us"]) // 1000 in range(int(chat[b"created_ms"]) - 1, int(chat[b"created_ms"]) + 2)


async def test_a_queued_chat_whose_old_lease_holds_waits_on_the_queue_until_it_goes(store: Stores) -> None:
    # a state only a crash leaves (an AOF recovery): queued, and an earlier attempt's lease alive
    await admit(store)
    await store.streams.hset(keys.lease(CHAT), mapping={"token": "old", "seq": 3})
    assert (await start(store))[0] == "busy"
    assert await store.control.zcard(keys.queue()) == 1, "the job stays queued: nothing else would start it"
    assert await listed(store) == {}, "a chat not started here is not this worker's"
    await store.streams.delete(keys.lease(CHAT))
    assert (await start(store))[0] == "claimed"


async def test_a_refused_admission_leaves_its_idempotency_key_free(store: Stores) -> None:
    assert await admit(store, key="k", limits=FULL) == ["queue"]
    assert not await store.control.exists(keys.idempotency(OWNER, "k"))
    assert not await store.streams.exists(keys.chat(CHAT)), "a refused chat leaves no record"
    assert await admit(store, "d" * 32, request=b"{}", key="k") == ["ok"]


async def test_a_claim_sent_twice_is_the_same_claim(store: Stores) -> None:
    await admit(store)
    first = await run(store.streams, machine.claim(CHAT, "t1"))
    again = await run(store.streams, machine.claim(CHAT, "t1"))
    assert first[0] == again[0] == "claimed"
    assert first[2:] == again[2:]


async def test_a_duplicate_wake_starts_the_chat_once(store: Stores) -> None:
    await admit(store)
    assert (await start(store))[0] == "claimed"
    assert (await start(store, "t2", worker="w2"))[0] == "busy"
    assert await store.streams.hget(keys.lease(CHAT), "token") == b"t1"
    assert await listed(store, "w2") == {}


async def test_a_cancel_before_the_start_wins_and_the_chat_never_runs(store: Stores) -> None:
    await admit(store)
    cancelled, age_ms = await run(store.streams, cancelling(store))
    assert cancelled == "cancelled"
    assert 0 <= age_ms < 5_000, "a queued chat's cancel says its age"
    # the API's second half (its job, its owner's count) has not run yet: a worker finds the job
    assert (await start(store))[0] == "cancelled"
    assert await status(store) == "cancelled"
    assert await store.control.zcard(keys.queue()) == 0, "the worker drops the stale job"
    assert not await store.control.exists(keys.job(CHAT))
    assert await listed(store) == {}
    assert [f[b"type"] for _, f in await store.streams.xrange(keys.events(CHAT))] == [b"cancelled"]


async def test_a_start_before_the_cancel_wins_and_the_cancel_is_flagged_for_its_worker(store: Stores) -> None:
    await admit(store)
    _, le = await start(store)
    assert await run(store.streams, cancelling(store)) == "running"
    assert await status(store) == "running", "its worker ends it, after appending `cancelled`"
    assert await le.cancel_flagged(), "the flag is the backstop for a cancel message the worker missed"


async def test_cancel_sent_twice_appends_one_cancelled_event(store: Stores) -> None:
    await admit(store)
    await run(store.streams, cancelling(store))
    assert await run(store.streams, cancelling(store)) == "cancelled"
    assert await store.streams.xlen(keys.events(CHAT)) == 1


async def test_a_live_workers_chats_are_not_reaped(store: Stores) -> None:
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, 60_000, first=True))
    await start(store)
    await reap(store.control, store.streams)
    assert await status(store) == "running"
    assert await listed(store) == {CHAT.encode(): b"t1"}


async def test_a_dead_workers_chat_is_reaped_once_back_to_the_front_of_the_queue(store: Stores) -> None:
    for chat_id in ("a" * 32, CHAT, "b" * 32):  # a millisecond apart: queue order is by the ms
        await admit(store, chat_id)
        await asyncio.sleep(0.002)
    await run(store.control, machine.heartbeat(WORKER, 60_000, first=True))
    await start(store)
    await lapse(store)  # its heartbeat lapses
    assert await run(store.control, machine.dead()) == [WORKER]
    await reap(store.control, store.streams)
    await reap(store.control, store.streams)  # a second reaper: one recovery
    assert await status(store) == "queued"
    assert await store.streams.hget(keys.chat(CHAT), "recoveries") == b"1"
    assert await listed(store) == {}
    assert await store.control.zscore(keys.workers(), WORKER) is None, "a dead worker with no chats is forgotten"
    # Accepted before "b", after "a": it waits behind "a" only, and is the next to wake.
    assert [m.decode() for m in await store.control.zrange(keys.queue(), 0, -1)] == ["a" * 32, CHAT, "b" * 32]
    assert (await store.control.lrange(keys.wake(), 0, 0))[0] == CHAT.encode()  # type: ignore[misc]
    outcome, le = await start(store, "t2", worker="w2")
    assert outcome == "claimed"
    assert le.chat[b"recoveries"] == b"1"
    append = machine.Call(machine.APPEND, machine.append_keys(CHAT), ["t1", "1", "1000", "", store.publish, "x", b"{}"])
    assert await run(store.streams, append) == -1, "the dead attempt stays fenced out"


async def test_a_worker_that_died_between_listing_and_claiming_leaves_its_chat_queued(store: Stores) -> None:
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, 60_000, first=True))
    await store.control.hset(keys.worker_chats(WORKER), CHAT, "t1")  # listed; the claim never sent
    await lapse(store)
    await reap(store.control, store.streams)
    assert await status(store) == "queued"
    assert await store.control.zcard(keys.queue()) == 1
    assert await listed(store) == {}
    assert (await start(store, "t2", worker="w2"))[0] == "claimed"


async def test_a_worker_that_died_between_claiming_and_taking_the_job_is_recovered(store: Stores) -> None:
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, 60_000, first=True))
    await store.control.hset(keys.worker_chats(WORKER), CHAT, "t1")
    await run(store.streams, machine.claim(CHAT, "t1"))  # the job is still on the queue
    assert (await start(store, "t2", worker="w2"))[0] == "busy"
    await lapse(store)
    await reap(store.control, store.streams)
    assert await status(store) == "queued"
    assert await store.control.zcard(keys.queue()) == 1, "one job, not two"
    assert (await start(store, "t2", worker="w2"))[0] == "claimed"


async def test_a_reaper_that_died_between_its_two_halves_is_finished_by_the_next(store: Stores) -> None:
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, 60_000, first=True))
    await start(store)
    # the first reaper queued the job again, and died before the chat's status changed
    enqueue = machine.enqueue(CHAT, job=job_record(CHAT), job_expires_ms=JOB_EXPIRES_MS, created_ms=1)
    assert await run(store.control, enqueue) == 1
    assert (await start(store, "t2", worker="w2"))[0] == "busy", "the dead attempt still holds it"
    await lapse(store)
    await reap(store.control, store.streams)
    assert await status(store) == "queued"
    assert await store.control.zcard(keys.queue()) == 1
    assert (await start(store, "t2", worker="w2"))[0] == "claimed"


async def test_a_handed_back_chat_is_queued_again_at_once(store: Stores) -> None:
    await admit(store)
    _, le = await start(store)
    assert await le.release() == 1
    assert await le.release() == 0  # sent twice: nothing more
    assert await status(store) == "queued"
    assert await listed(store) == {}
    assert await store.control.zcard(keys.queue()) == 1
    assert (await start(store, "t2"))[0] == "claimed"


async def test_a_chat_that_ended_meanwhile_is_not_queued_again(store: Stores) -> None:
    await admit(store)
    await start(store)
    await finish(store, "t1")
    await store.control.hset(keys.worker_chats(WORKER), CHAT, "t1")  # its list not yet cleaned
    assert await recover(store.control, store.streams, WORKER, CHAT, "t1") == 0
    assert await status(store) == "complete"
    assert await store.control.zcard(keys.queue()) == 0
    assert await listed(store) == {}


async def finish(s: Stores, token: str) -> int:
    call = machine.Call(
        machine.FINISH,
        machine.append_keys(CHAT),
        [token, "1", "1000", "complete", b'{"type":"complete"}', "complete", b"{}", "600", "60", s.publish],
    )
    return int(await run(s.streams, call))


async def test_finish_ends_the_chat_once_and_frees_its_owner(store: Stores) -> None:
    await admit(store)
    _, le = await start(store)
    assert await finish(store, "t1") == 1
    await le.finished()
    once = await state(store)
    assert await finish(store, "t1") == 0
    await le.finished()
    assert await state(store) == once
    assert await status(store) == "complete"
    assert await listed(store) == {}
    assert await store.control.zcard(keys.active(OWNER)) == 0
    assert not await store.streams.exists(keys.lease(CHAT))
    assert await run(store.streams, cancelling(store)) == "complete", "a finished chat cannot be cancelled"
    assert await recover(store.control, store.streams, WORKER, CHAT, "t1") == 0


async def test_every_script_sent_twice_leaves_what_one_run_leaves(store: Stores) -> None:
    """A chat's whole life, each call sent twice in a row, as redis-py does when a reply is lost."""
    created = machine.create(CHAT, OWNER, created_at="2026-12-02T00:00:00.000Z", request=b"{}", result_ttl=600)
    admission = machine.admit(
        CHAT, OWNER, CRED, request=b"{}", job=job_record(CHAT), job_expires_ms=JOB_EXPIRES_MS, limits=LIMITS
    )
    c, s = store.control, store.streams
    life = [
        (s, created),
        (c, admission),
        (c, machine.heartbeat(WORKER, 60_000, first=True)),
        (s, machine.claim(CHAT, "t1")),
        (
            s,
            machine.Call(
                machine.APPEND, machine.append_keys(CHAT), ["t1", "1", "1000", "1", store.publish, "x", b"{}"]
            ),
        ),
        (c, machine.enqueue(CHAT, job=job_record(CHAT), job_expires_ms=JOB_EXPIRES_MS, created_ms=1)),
        (s, machine.requeue(CHAT, "t1")),
        (c, machine.dead()),
        (c, machine.forget(WORKER)),
        (s, machine.claim(CHAT, "t2")),
        (s, cancelling(store)),
    ]
    for client, call in life:
        first = await run(client, call)
        after_one = await state(store)
        again = await run(client, call)
        assert await state(store) == after_one, call.script.name
        if call.script.name in ("ADMIT", "DEAD", "CANCEL"):
            assert again == first, call.script.name
        if call.script.name == "CLAIM":
            assert again[2:] == first[2:]


async def test_times_come_from_redis_clock_whatever_the_hosts_clock_says(
    store: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: 4_000_000_000.0)  # a host clock decades off
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, 60_000, first=True))
    now = await redis_ms(store.control)
    lapses = await store.control.zscore(keys.workers(), WORKER) or 0
    deadline = await store.control.zscore(keys.active(OWNER), CHAT) or 0
    assert now < lapses <= now + 60_000
    assert now < deadline <= now + LIMITS.deadline_ms
    assert await run(store.control, machine.dead()) == []


async def test_a_heartbeat_says_when_it_had_lapsed(store: Stores) -> None:
    assert await run(store.control, machine.heartbeat(WORKER, SHORT_MS, first=True)) == 0
    await asyncio.sleep(SHORT_MS / 1000 + 0.05)
    assert await run(store.control, machine.heartbeat(WORKER, 60_000)) == 1
    assert await run(store.control, machine.heartbeat(WORKER, 60_000)) == 0


async def test_a_refused_request_under_a_recording_key_forgets_the_earlier_chat(store: Stores) -> None:
    """The SDK's retry of a refused request must not be answered with an earlier, identical one."""
    assert await admit(store, key="same-body", replay=False) == ["ok"]
    assert await admit(store, "d" * 32, key="same-body", limits=FULL, replay=False) == ["queue"]
    assert not await store.control.exists(keys.idempotency(OWNER, "same-body"))


async def test_a_hand_back_leaves_a_later_attempt_of_the_same_worker_listed(
    store: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-back queues the chat at the wake list's front, where the same worker may take it
    again before the hand-back's last step: that step must not take the new attempt off the list."""
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, 60_000, first=True))
    _, first = await start(store, "t1")
    real_call = machine.call
    restarted = False

    async def call(client: Any, c: machine.Call) -> Any:
        nonlocal restarted
        answer = await real_call(client, c)
        if c.script is machine.REQUEUE and not restarted:
            restarted = True
            assert (await start(store, "t2"))[0] == "claimed"  # this worker, woken for it again
        return answer

    monkeypatch.setattr(lease_module.machine, "call", call)
    await first.release()
    monkeypatch.setattr(lease_module.machine, "call", real_call)
    assert await listed(store) == {CHAT.encode(): b"t2"}
    await reaper.retire(store.control, WORKER)  # and if the worker dies now, its chat is found
    await reap(store.control, store.streams)
    assert await status(store) == "queued"


async def test_a_worker_taken_for_dead_and_forgotten_lists_nothing_until_it_beats_again(store: Stores) -> None:
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, SHORT_MS, first=True))
    await asyncio.sleep(SHORT_MS / 1000 + 0.05)
    await reap(store.control, store.streams)  # it stalled: a reaper found nothing and forgot it
    assert await store.control.zscore(keys.workers(), WORKER) is None
    outcome, _ = await start(store, beat=False)
    assert outcome == "unlisted", "a chat it started would be on a list no reaper reads"
    assert await status(store) == "queued"
    await run(store.control, machine.heartbeat(WORKER, 60_000))
    assert (await start(store))[0] == "claimed"


async def test_two_reapers_of_one_dead_worker_take_turns(store: Stores) -> None:
    """Interleaved, the second could queue the chat again after another worker started it: a stale
    job every scan would find busy until the chat ended."""
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, 60_000, first=True))
    await start(store)
    await lapse(store)
    await store.control.set(keys.reaping(WORKER), "1", px=5000)  # another reaper is at it
    await reap(store.control, store.streams)
    assert await status(store) == "running", "it waits for the reaper at work"
    await store.control.delete(keys.reaping(WORKER))
    await reap(store.control, store.streams)
    assert await status(store) == "queued"
    assert not await store.control.exists(keys.reaping(WORKER)), "a reaper lets go when done"


async def test_a_chat_queued_with_no_job_on_a_dead_workers_list_gets_its_job_back(store: Stores) -> None:
    """A failover lost the claim the worker had made (the job was taken off the queue after it)."""
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, SHORT_MS, first=True))
    await store.control.hset(keys.worker_chats(WORKER), CHAT, "t1")
    await store.control.zrem(keys.queue(), CHAT)
    await store.control.delete(keys.job(CHAT))
    await asyncio.sleep(SHORT_MS / 1000 + 0.05)
    await reap(store.control, store.streams)
    assert await store.control.zcard(keys.queue()) == 1
    assert (await start(store, "t2", worker="w2"))[0] == "claimed"


async def test_a_reaper_leaves_the_list_of_a_worker_that_came_back_alone(store: Stores) -> None:
    """A reaper read the list while the worker was taken for dead; the worker came back, listed the
    chat again and claimed it: the reaper's last step must not take it off the list."""
    await admit(store)
    await run(store.control, machine.heartbeat(WORKER, 60_000, first=True))
    await store.control.hset(keys.worker_chats(WORKER), CHAT, "t1")  # listed, as the reaper read it
    assert await recover(store.control, store.streams, WORKER, CHAT, "t1", reaped=True) == 0
    assert await listed(store) == {CHAT.encode(): b"t1"}, "the worker's heartbeat holds: its list is its own"
    assert await recover(store.control, store.streams, WORKER, CHAT, "t1") == 0  # its own audit may
    assert await listed(store) == {}
