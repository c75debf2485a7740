"""The chat's state machine (``shared.machine``), run once on fakeredis and once on a real redis-server.

Every transition, the races between them, and every script sent twice (a reply lost on a dropped
connection): the state afterwards is what one run leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import fakeredis
import pytest
from redis.asyncio import Redis

from streambridge.shared import keys, machine
from streambridge.shared.jobs import JOB_EXPIRES_MS, job_record

CHAT = "c" * 32
OWNER = "visitor_1"
CRED = "0123456789abcdef"
TTL_MS = 1500
LIMITS = machine.Admission(max_queue=100, chats_per_minute=100, max_running=100, deadline_ms=60_000, result_ttl=600)


@pytest.fixture(params=["fakeredis", "redis-server"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    if request.param == "fakeredis":
        client: Redis = fakeredis.FakeAsyncRedis()
    else:
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    await client.set(keys.credential(CRED), b"{}")
    yield client
    await client.flushdb()
    await client.aclose()


async def run(store: Redis, c: machine.Call) -> Any:
    answer = await machine.call(store, c)
    if isinstance(answer, list):
        return [a.decode() if isinstance(a, bytes) else a for a in answer]
    return answer.decode() if isinstance(answer, bytes) else answer


def admission(
    chat_id: str = CHAT,
    *,
    request: bytes = b'{"messages":[]}',
    key: str | None = None,
    limits: machine.Admission = LIMITS,
    replay: bool = True,
) -> machine.Call:
    return machine.admit(
        chat_id,
        OWNER,
        CRED,
        created_at="2026-12-02T00:00:00.000Z",
        request=request,
        job=job_record(chat_id),
        job_expires_ms=JOB_EXPIRES_MS,
        limits=limits,
        idempotency_key=key,
        replay=replay,
    )


#: a deployment whose queue is full: every admission is refused
FULL: Final = machine.Admission(max_queue=0, chats_per_minute=100, max_running=100, deadline_ms=60_000, result_ttl=600)


def reaping(chat_id: str = CHAT) -> machine.Call:
    return machine.reap(chat_id, job=job_record(chat_id), job_expires_ms=JOB_EXPIRES_MS)


def cancelling(chat_id: str = CHAT) -> machine.Call:
    return machine.cancel(chat_id, OWNER, result=b'{"status":"cancelled"}', stream_ttl=60)


async def status(store: Redis, chat_id: str = CHAT) -> str | None:
    value = await store.hget(keys.chat(chat_id), "status")  # type: ignore[misc]
    return value.decode() if value is not None else None


async def redis_ms(store: Redis) -> int:
    seconds, micros = await store.time()
    return int(seconds * 1000 + micros // 1000)


async def state(store: Redis) -> dict[str, object]:
    """Every key and its value; scores that come from the clock are shown only as present."""
    dump: dict[str, object] = {}
    for raw in sorted(await store.keys("*")):
        key = raw.decode()
        kind = (await store.type(raw)).decode()
        if kind == "hash":
            dump[key] = await store.hgetall(raw)  # type: ignore[misc]
        elif kind == "zset":
            dump[key] = sorted(m for m, _ in await store.zrange(raw, 0, -1, withscores=True))
        elif kind == "list":
            dump[key] = await store.lrange(raw, 0, -1)  # type: ignore[misc]
        elif kind == "stream":
            dump[key] = [f for _, f in await store.xrange(raw)]
        else:
            dump[key] = await store.get(raw) if key != keys.job(CHAT) else "job record"
    return dump


async def test_admission_records_a_queued_chat_its_job_and_its_wake_token(store: Redis) -> None:
    assert await run(store, admission()) == ["ok"]
    assert await status(store) == "queued"
    assert await store.zrange(keys.queue(), 0, -1) == [CHAT.encode()]
    assert await store.exists(keys.job(CHAT))
    assert await store.lrange(keys.wake(), 0, -1) == [CHAT.encode()]  # type: ignore[misc]
    assert await store.zrange(keys.active(OWNER), 0, -1) == [CHAT.encode()]
    assert await store.get(keys.rate(OWNER)) == b"1"


async def test_admission_sent_twice_makes_one_chat_and_counts_it_once(store: Redis) -> None:
    await run(store, admission())
    once = await state(store)
    assert await run(store, admission()) == ["ok"]
    assert await state(store) == once


async def test_admission_replayed_after_the_chat_started_leaves_it_running(store: Redis) -> None:
    # The old ADMIT reset a running chat to `queued`: a worker's death then orphaned it.
    await run(store, admission())
    assert (await run(store, machine.start(CHAT, "t1", TTL_MS)))[0] == "claimed"
    assert await run(store, admission()) == ["ok"]
    assert await status(store) == "running"
    assert await store.zcard(keys.queue()) == 0


async def test_admission_replayed_by_a_user_at_the_running_limit_is_not_refused(store: Redis) -> None:
    one = machine.Admission(max_queue=100, chats_per_minute=1, max_running=1, deadline_ms=60_000, result_ttl=600)

    assert await run(store, admission(limits=one)) == ["ok"]
    assert await run(store, admission(limits=one)) == ["ok"]  # not 429 for the chat it already made


async def test_an_idempotency_key_returns_the_first_chat_and_refuses_a_different_request(store: Redis) -> None:
    assert await run(store, admission(key="k-1")) == ["ok"]
    assert await run(store, admission("d" * 32, key="k-1")) == ["replay", CHAT]
    assert not await store.exists(keys.chat("d" * 32))
    assert await store.zcard(keys.queue()) == 1
    assert await run(store, admission("e" * 32, request=b'{"other":1}', key="k-1")) == ["reused"]
    assert await run(store, admission("e" * 32, key="k-2")) == ["ok"]
    assert 0 < await store.ttl(keys.idempotency(OWNER, "k-1")) <= 86_400


async def test_a_start_takes_the_job_off_the_queue_and_claims_the_lease(store: Redis) -> None:
    await run(store, admission())
    before = await redis_ms(store)
    answer = await run(store, machine.start(CHAT, "t1", TTL_MS))
    assert answer[0] == "claimed"
    chat = dict(zip(answer[2::2], answer[3::2], strict=True))
    assert chat["owner"] == OWNER
    assert chat["status"] == "running"
    assert int(chat["created_ms"]) <= int(answer[1])
    assert await store.zcard(keys.queue()) == 0
    assert not await store.exists(keys.job(CHAT))
    assert await store.hget(keys.lease(CHAT), "token") == b"t1"  # type: ignore[misc]
    lapses = await store.zscore(keys.running(), CHAT)
    assert lapses is not None
    assert before + TTL_MS <= lapses <= await redis_ms(store) + TTL_MS


async def test_a_start_records_its_pickup_in_microseconds_from_admission(store: Redis) -> None:
    await run(store, admission())
    await asyncio.sleep(0.0025)
    await run(store, machine.start(CHAT, "t1", TTL_MS))
    chat = await store.hgetall(keys.chat(CHAT))  # type: ignore[misc]
    pickup_us = int(chat[b"pickup_us"])
    # at least the wait; and finer than the millisecond figure, which rounds it
    assert 2500 <= pickup_us < 1_000_000
    assert int(chat[b"queued_us"]) // 1000 in range(int(chat[b"created_ms"]) - 1, int(chat[b"created_ms"]) + 2)


async def test_a_queued_chat_whose_old_lease_holds_waits_on_the_queue_until_it_goes(store: Redis) -> None:
    # a state only a crash leaves (an AOF recovery): queued, and an earlier attempt's lease alive
    await run(store, admission())
    await store.hset(keys.lease(CHAT), mapping={"token": "old", "seq": 3})  # type: ignore[misc]
    assert await run(store, machine.start(CHAT, "t1", TTL_MS)) == ["busy"]
    assert await store.zcard(keys.queue()) == 1, "the job stays queued: nothing else would start it"
    await store.delete(keys.lease(CHAT))
    assert (await run(store, machine.start(CHAT, "t1", TTL_MS)))[0] == "claimed"


async def test_a_refused_admission_leaves_its_idempotency_key_free(store: Redis) -> None:
    assert await run(store, admission(key="k", limits=FULL)) == ["queue"]
    assert not await store.exists(keys.idempotency(OWNER, "k"))
    assert await run(store, admission("d" * 32, request=b"{}", key="k")) == ["ok"]


async def test_a_start_sent_twice_is_the_same_claim(store: Redis) -> None:
    await run(store, admission())
    first = await run(store, machine.start(CHAT, "t1", TTL_MS))
    again = await run(store, machine.start(CHAT, "t1", TTL_MS))
    assert first[0] == again[0] == "claimed"
    assert first[2:] == again[2:]


async def test_a_duplicate_wake_starts_the_chat_once(store: Redis) -> None:
    await run(store, admission())
    assert (await run(store, machine.start(CHAT, "t1", TTL_MS)))[0] == "claimed"
    assert await run(store, machine.start(CHAT, "t2", TTL_MS)) == ["taken"]
    assert await store.hget(keys.lease(CHAT), "token") == b"t1"  # type: ignore[misc]


async def test_a_cancel_before_the_start_wins_and_the_chat_never_runs(store: Redis) -> None:
    await run(store, admission())
    cancelled, age_ms = await run(store, cancelling())
    assert cancelled == "cancelled"
    assert 0 <= age_ms < 5_000, "a queued chat's cancel says its age"
    assert await run(store, machine.start(CHAT, "t1", TTL_MS)) == ["taken"]
    assert await status(store) == "cancelled"
    assert await store.zcard(keys.queue()) == 0
    assert await store.zcard(keys.active(OWNER)) == 0, "it no longer counts against its owner"
    assert [f[b"type"] for _, f in await store.xrange(keys.events(CHAT))] == [b"cancelled"]


async def test_a_start_before_the_cancel_wins_and_the_cancel_reaches_its_worker(store: Redis) -> None:
    await run(store, admission())
    await run(store, machine.start(CHAT, "t1", TTL_MS))
    assert await run(store, cancelling()) == "running"
    assert await status(store) == "running", "its worker ends it, after appending `cancelled`"
    # The renewal is the backstop for a cancel message the worker missed.
    assert await run(store, machine.renew(CHAT, "t1", TTL_MS)) == 2


async def test_cancel_sent_twice_appends_one_cancelled_event(store: Redis) -> None:
    await run(store, admission())
    await run(store, cancelling())
    assert await run(store, cancelling()) == "cancelled"
    assert await store.xlen(keys.events(CHAT)) == 1


async def test_a_renewal_moves_the_lapse_by_redis_clock_and_a_lost_lease_renews_nothing(store: Redis) -> None:
    await run(store, admission())
    await run(store, machine.start(CHAT, "t1", TTL_MS))
    await store.zadd(keys.running(), {CHAT: 0})
    assert await run(store, machine.renew(CHAT, "t1", TTL_MS)) == 1
    assert (await store.zscore(keys.running(), CHAT) or 0) >= await redis_ms(store)
    assert await run(store, machine.renew(CHAT, "someone-else", TTL_MS)) == 0


async def test_a_chat_whose_lease_holds_is_not_reaped(store: Redis) -> None:
    await run(store, admission())
    await run(store, machine.start(CHAT, "t1", TTL_MS))
    await store.zadd(keys.running(), {CHAT: 0})  # due, but its worker still renews
    assert await run(store, machine.lapsed()) == [CHAT]
    assert await run(store, reaping()) == 0
    assert await status(store) == "running"


async def test_a_lapsed_chat_is_reaped_once_back_to_the_front_of_the_queue(store: Redis) -> None:
    for chat_id in ("a" * 32, CHAT, "b" * 32):  # a millisecond apart: queue order is by the ms
        await run(store, admission(chat_id))
        await asyncio.sleep(0.002)
    await run(store, machine.start(CHAT, "t1", TTL_MS))
    await store.delete(keys.lease(CHAT))  # its worker died: the lease lapsed
    await store.zadd(keys.running(), {CHAT: 0})
    assert await run(store, reaping()) == 1
    assert await run(store, reaping()) == 0, "sent twice, or by a second reaper: one recovery"
    assert await status(store) == "queued"
    assert await store.zcard(keys.running()) == 0
    # Accepted before "b", after "a": it waits behind "a" only, and is the next to wake.
    assert [m.decode() for m in await store.zrange(keys.queue(), 0, -1)] == ["a" * 32, CHAT, "b" * 32]
    assert (await store.lrange(keys.wake(), 0, 0))[0] == CHAT.encode()  # type: ignore[misc]
    answer = await run(store, machine.start(CHAT, "t2", TTL_MS))
    assert answer[0] == "claimed"
    assert dict(zip(answer[2::2], answer[3::2], strict=True))["recoveries"] == "1"
    assert await run(store, machine.renew(CHAT, "t1", TTL_MS)) == 0, "the dead attempt stays fenced out"


async def test_a_renewal_just_before_the_reaper_keeps_the_chat(store: Redis) -> None:
    await run(store, admission())
    await run(store, machine.start(CHAT, "t1", TTL_MS))
    await store.zadd(keys.running(), {CHAT: 0})
    lapsed = await run(store, machine.lapsed())
    await run(store, machine.renew(CHAT, "t1", TTL_MS))  # between the reaper's two calls
    await store.delete(keys.lease(CHAT))  # (as if it lapsed only now: not yet due)
    assert lapsed == [CHAT]
    assert await run(store, reaping()) == 0


async def test_a_handed_back_chat_is_due_at_once_and_only_the_reaper_queues_it_again(store: Redis) -> None:
    await run(store, admission())
    await run(store, machine.start(CHAT, "t1", TTL_MS))
    assert await run(store, machine.release(CHAT, "t1")) == 1
    assert await run(store, machine.release(CHAT, "t1")) == 0  # sent twice: nothing more
    assert await run(store, machine.start(CHAT, "t2", TTL_MS)) == ["taken"], "arq's scan cannot take it"
    assert await run(store, machine.lapsed()) == [CHAT]
    assert await run(store, reaping()) == 1
    assert (await run(store, machine.start(CHAT, "t2", TTL_MS)))[0] == "claimed"


async def test_finish_ends_the_chat_once_and_frees_its_owner(store: Redis) -> None:
    await run(store, admission())
    await run(store, machine.start(CHAT, "t1", TTL_MS))
    finish = machine.Call(
        machine.FINISH,
        machine.finish_keys(CHAT, OWNER),
        ["t1", "1", "1000", "complete", b'{"type":"complete"}', "complete", b"{}", "600", "60", CHAT],
    )
    assert await run(store, finish) == 1
    once = await state(store)
    assert await run(store, finish) == 0
    assert await state(store) == once
    assert await status(store) == "complete"
    assert await store.zcard(keys.running()) == 0
    assert await store.zcard(keys.active(OWNER)) == 0
    assert not await store.exists(keys.lease(CHAT))
    assert await run(store, cancelling()) == "complete", "a finished chat cannot be cancelled"
    assert await run(store, reaping()) == 0


async def test_every_script_sent_twice_leaves_what_one_run_leaves(store: Redis) -> None:
    """A chat's whole life, each call sent twice in a row, as redis-py does when a reply is lost."""
    life = [
        admission(),
        machine.start(CHAT, "t1", TTL_MS),
        machine.renew(CHAT, "t1", TTL_MS),
        machine.Call(machine.APPEND, machine.append_keys(CHAT), ["t1", "1", "1000", "1", "started", b"{}"]),
        machine.release(CHAT, "t1"),
        machine.lapsed(),
        reaping(),
        machine.start(CHAT, "t2", TTL_MS),
        cancelling(),
    ]
    for call in life:
        first = await run(store, call)
        after_one = await state(store)
        again = await run(store, call)
        assert await state(store) == after_one, call.script.name
        if call.script.name in ("START", "ADMIT", "LAPSED", "CANCEL"):
            assert again[2:] == first[2:] if call.script.name == "START" else again == first, call.script.name


async def test_scores_come_from_redis_clock_whatever_the_hosts_clock_says(
    store: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: 4_000_000_000.0)  # a host clock decades off
    await run(store, admission())
    await run(store, machine.start(CHAT, "t1", TTL_MS))
    now = await redis_ms(store)
    lapses = await store.zscore(keys.running(), CHAT) or 0
    deadline = await store.zscore(keys.active(OWNER), CHAT) or 0
    assert now < lapses <= now + TTL_MS
    assert now < deadline <= now + LIMITS.deadline_ms
    assert await run(store, machine.lapsed()) == []


async def test_a_refused_request_under_a_recording_key_forgets_the_earlier_chat(store: Redis) -> None:
    """The SDK's retry of a refused request must not be answered with an earlier, identical one."""
    assert await run(store, admission(key="same-body", replay=False)) == ["ok"]
    assert await run(store, admission("d" * 32, key="same-body", limits=FULL, replay=False)) == ["queue"]
    assert not await store.exists(keys.idempotency(OWNER, "same-body"))
