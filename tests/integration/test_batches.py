"""Batches through the official openai SDK against the API in-process, a real Redis, the simulated
LLM on a real port and a batch feeder run until its batches end (as a burst worker runs chats)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from streambridge import keys_cli
from streambridge.api.app import make_app
from streambridge.api.credentials import Credential, Limits, issue, quota
from streambridge.cli import build_parser
from streambridge.fake_llm import expected_text
from streambridge.shared import batches, keys, machine
from streambridge.shared.settings import Settings
from streambridge.workers.batches import BatchFeeder
from streambridge.workers.llm import make_client
from tests.integration.conftest import bearer, read_sse

RunBatches = Callable[[], Awaitable[None]]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, lease_ttl=0.3, max_attempts=3)


@pytest.fixture
async def sdk(client: TestClient, token: str) -> AsyncIterator[openai.AsyncOpenAI]:  # type: ignore[type-arg]
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=token, max_retries=0)
    yield sdk
    await sdk.close()


@pytest.fixture
async def feeder(real_redis: Redis, settings: Settings, llm_url: str) -> AsyncIterator[BatchFeeder]:
    llm = make_client(llm_url, None)
    feeder = BatchFeeder(real_redis, llm, settings)
    yield feeder
    await feeder.close()
    await llm.close()


def line(custom_id: str, prompt: str, model: str = "fake?words=5") -> dict[str, object]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(*lines: dict[str, object]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


async def submit(sdk: openai.AsyncOpenAI, data: bytes) -> openai.types.Batch:
    uploaded = await sdk.files.create(file=("prompts.jsonl", io.BytesIO(data)), purpose="batch")
    return await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "t"}
    )


async def content(sdk: openai.AsyncOpenAI, file_id: str | None) -> dict[str, dict[str, object]]:
    assert file_id is not None
    text = (await sdk.files.content(file_id)).text
    found = [json.loads(x) for x in text.splitlines()]
    by_id = {x["custom_id"]: x for x in found}
    assert len(by_id) == len(found), "one line per custom_id"
    return by_id


async def test_a_batch_runs_end_to_end_through_the_sdk(sdk: openai.AsyncOpenAI, feeder: BatchFeeder) -> None:
    prompts = {f"r{n}": f"prompt number {n}" for n in range(6)}
    data = jsonl(
        *(line(cid, p) for cid, p in prompts.items()),
        line("bad-model", "refused", model="fake?no_such_option=1"),  # the upstream answers 400
        line("flaky", "fails twice", model="fake?words=5&fail=500&fail_times=2"),
    )
    batch = await submit(sdk, data)
    assert batch.status == "in_progress"
    assert batch.request_counts is not None
    assert batch.request_counts.total == 8

    await feeder.run_until_idle()

    done = await sdk.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (7, 1)
    assert done.metadata == {"run": "t"}
    assert done.completed_at is not None
    assert done.finalizing_at is not None
    assert done.usage is not None
    assert done.usage.total_tokens > 0
    output = await content(sdk, done.output_file_id)
    assert set(output) == {*prompts, "flaky"}
    for cid, prompt in prompts.items():
        response = output[cid]["response"]
        assert isinstance(response, dict)
        assert response["status_code"] == 200
        assert response["body"]["choices"][0]["message"]["content"] == expected_text(prompt, 5)
    errors = await content(sdk, done.error_file_id)
    assert list(errors) == ["bad-model"]
    assert errors["bad-model"]["response"]["status_code"] == 400  # type: ignore[index]
    assert errors["bad-model"]["error"] is None


async def test_a_malformed_input_fails_the_batch_naming_each_bad_line(sdk: openai.AsyncOpenAI) -> None:
    data = (
        jsonl(line("a", "fine"), line("a", "again"))
        + b"not json\n"
        + jsonl({**line("c", "x"), "body": {"messages": []}})
        + jsonl({**line("d", "x"), "body": {**line("d", "x")["body"], "n": 2}})  # type: ignore[dict-item]
    )
    batch = await submit(sdk, data)
    assert batch.status == "failed"
    assert batch.errors is not None
    assert batch.errors.data is not None
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [
        (2, "duplicate_custom_id", None),
        (3, "invalid_json_line", None),
        (4, "invalid_request", "body.messages"),  # named as the line has it, as every field of its body
        (5, "invalid_request", "body.n"),
    ]
    assert batch.output_file_id is None


async def test_files_are_listed_read_and_deleted(sdk: openai.AsyncOpenAI, client: TestClient) -> None:  # type: ignore[type-arg]
    data = jsonl(line("a", "one"), line("b", "two"))
    uploaded = await sdk.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(data), "in.jsonl", "batch")
    assert (await sdk.files.content(uploaded.id)).content == data
    assert [f.id async for f in sdk.files.list()] == [uploaded.id]
    assert (await sdk.files.delete(uploaded.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await sdk.files.retrieve(uploaded.id)


async def test_an_upload_that_is_not_a_batch_is_refused_with_openais_error(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert refused.value.code == "invalid_request"
    with pytest.raises(openai.BadRequestError) as missing:
        await sdk.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert missing.value.code == "invalid_input_file"


async def test_batches_list_pages_with_the_sdk(sdk: openai.AsyncOpenAI) -> None:
    made = [(await submit(sdk, jsonl(line("a", f"p{n}")))).id for n in range(3)]
    page = await sdk.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2]
    assert page.has_more
    assert [b.id async for b in await sdk.batches.list(limit=2)] == made[::-1]


async def test_a_dead_workers_items_run_again_and_each_has_one_result_line(
    sdk: openai.AsyncOpenAI, feeder: BatchFeeder, real_redis: Redis, settings: Settings
) -> None:
    batch = await submit(sdk, jsonl(*(line(f"r{n}", f"p{n}") for n in range(5))))
    k = await batches.batch_keys(real_redis, batch.id)
    assert k is not None
    # a worker claims three items and dies: nothing renews their leases
    lost = await machine.call(real_redis, batches.claim(k, 3, lease_ms=300, max_running=100))
    assert len(lost) == 6

    await feeder.run_until_idle()

    done = await sdk.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert done.request_counts.completed == 5
    assert set(await content(sdk, done.output_file_id)) == {f"r{n}" for n in range(5)}
    # the dead worker wakes up and finishes an item after all: it changes nothing
    late = batches.done(k, 0, ok=True, line=b"{}", custom_id="r0", usage=batches.Usage(), ttl=60)
    assert await machine.call(real_redis, late) == 0
    assert await real_redis.llen(keys.file_lines(k.output_file)) == 5


async def test_cancel_mid_batch_keeps_finished_items_and_stops_the_rest(
    sdk: openai.AsyncOpenAI,
    feeder: BatchFeeder,
    client: TestClient,
    token: str,  # type: ignore[type-arg]
) -> None:
    slow = "fake?words=20&delay_ms=20"  # about 0.4 s an item
    batch = await submit(sdk, jsonl(*(line(f"r{n}", f"p{n}", model=slow) for n in range(200))))
    running = asyncio.create_task(feeder.run_until_idle())
    async with client.get(f"/v1/batches/{batch.id}/events", headers=bearer(token)) as response:
        async for chunk in response.content.iter_any():
            if b"event: item" in chunk:
                break
    cancelling = await sdk.batches.cancel(batch.id)
    assert cancelling.status in {"cancelling", "cancelled"}
    await running
    done = await sdk.batches.retrieve(batch.id)
    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    assert done.request_counts is not None
    finished = done.request_counts.completed + done.request_counts.failed
    assert 1 <= finished < 200
    assert len(await content(sdk, done.output_file_id)) == done.request_counts.completed


async def test_an_expired_batch_sends_unfinished_lines_to_the_error_file(
    settings: Settings, real_redis: Redis, llm_url: str, token: str
) -> None:
    short = msgspec.structs.replace(settings, batch_completion_window=0.5, batch_worker_concurrency=1)
    async with TestClient(TestServer(make_app(short))) as client:
        sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=token, max_retries=0)
        slow = "fake?words=10&delay_ms=40"  # about 0.4 s each, one at a time: two at most in the window
        batch = await submit(sdk, jsonl(*(line(f"r{n}", f"p{n}", model=slow) for n in range(6))))
        llm = make_client(llm_url, None)
        feeder = BatchFeeder(real_redis, llm, short)
        await feeder.run_until_idle()
        await feeder.close()
        await llm.close()
        done = await sdk.batches.retrieve(batch.id)
        assert done.status == "expired"
        assert done.expired_at is not None
        counts = done.request_counts
        assert counts is not None
        assert counts.completed + counts.failed == 6
        assert counts.completed < 6
        errors = await content(sdk, done.error_file_id)
        assert len(errors) == counts.failed
        assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}  # type: ignore[index]
        await sdk.close()


async def test_progress_events_resume_after_last_event_id_exactly(
    sdk: openai.AsyncOpenAI,
    feeder: BatchFeeder,
    client: TestClient,
    token: str,  # type: ignore[type-arg]
) -> None:
    batch = await submit(sdk, jsonl(*(line(f"r{n}", f"p{n}") for n in range(4))))
    await feeder.run_until_idle()
    async with client.get(f"/v1/batches/{batch.id}/events", headers=bearer(token)) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        everything = await read_sse(response)
    assert [m.event for m in everything] == ["status", "status", *["item"] * 4, "status", "end"]
    items = [json.loads(m.data) for m in everything if m.event == "item"]
    assert sorted(i["custom_id"] for i in items) == ["r0", "r1", "r2", "r3"]
    assert [i["completed"] for i in items] == [1, 2, 3, 4]
    assert json.loads(everything[-1].data) == {
        "type": "end",
        "status": "completed",
        "completed": 4,
        "failed": 0,
        "total": 4,
    }
    resumed_at = everything[3].id
    headers = {**bearer(token), "Last-Event-ID": resumed_at}
    async with client.get(f"/v1/batches/{batch.id}/events", headers=headers) as response:
        rest = await read_sse(response)
    assert [m.id for m in rest] == [m.id for m in everything[4:]]
    # a misspelt resume parameter is refused, not taken for "from the start"
    async with client.get(f"/v1/batches/{batch.id}/events?last_event=1-0", headers=bearer(token)) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "last_event"


async def test_results_stream_what_has_finished(
    sdk: openai.AsyncOpenAI,
    feeder: BatchFeeder,
    client: TestClient,
    token: str,  # type: ignore[type-arg]
) -> None:
    batch = await submit(sdk, jsonl(line("ok", "fine"), line("no", "x", model="fake?no_such_option=1")))
    async with client.get(f"/v1/batches/{batch.id}/results", headers=bearer(token)) as response:
        assert response.status == 200
        assert await response.read() == b""
    await feeder.run_until_idle()
    async with client.get(f"/v1/batches/{batch.id}/results", headers=bearer(token)) as response:
        lines = [json.loads(x) for x in (await response.read()).splitlines()]
    assert [x["custom_id"] for x in lines] == ["ok", "no"]


async def test_another_users_batch_and_file_are_not_found(
    sdk: openai.AsyncOpenAI,
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    batch = await submit(sdk, jsonl(line("a", "mine")))
    other = (await (await client.post("/v1/auth/visitor")).json())["token"]
    for path in (f"/v1/batches/{batch.id}", f"/v1/files/{batch.input_file_id}", f"/v1/batches/{batch.id}/events"):
        async with client.get(path, headers=bearer(other)) as response:
            assert response.status == 404, path
            assert (await response.json())["error"]["type"] == "not_found_error"


async def test_an_upstreams_429s_halve_the_batchs_concurrency_and_the_items_still_complete(
    sdk: openai.AsyncOpenAI, feeder: BatchFeeder
) -> None:
    limited = "fake?words=5&fail=429&fail_times=1&retry_after=0"
    batch = await submit(sdk, jsonl(*(line(f"r{n}", f"p{n}", model=limited) for n in range(3))))
    full = feeder.limit

    await feeder.run_until_idle()

    assert feeder.limit < full  # the batch backs off; interactive chats have their own slots
    done = await sdk.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert done.request_counts.completed == 3


async def test_a_users_running_items_are_bounded_across_their_batches(
    sdk: openai.AsyncOpenAI, real_redis: Redis, settings: Settings
) -> None:
    # the visitor's limit (STREAMBRIDGE_BATCH_USER_MAX_RUNNING_ITEMS) is recorded on each batch it makes
    first, second = [await submit(sdk, jsonl(*(line(f"r{n}", f"p{n}") for n in range(5)))) for _ in range(2)]
    a, b = await batches.batch_keys(real_redis, first.id), await batches.batch_keys(real_redis, second.id)
    assert a is not None
    assert b is not None
    await real_redis.hset(keys.batch(first.id), "user_limit", 3)
    await real_redis.hset(keys.batch(second.id), "user_limit", 3)

    async def claim(k: batches.BatchKeys, n: int) -> list[int]:
        answer = await machine.call(real_redis, batches.claim(k, n, lease_ms=60_000, max_running=100))
        return [int(i) for i in answer[::2]]

    assert await claim(a, 2) == [0, 1]
    assert await claim(b, 5) == [0]  # the user has 3 running in all
    done = batches.done(a, 0, ok=True, line=b"{}", custom_id="r0", usage=batches.Usage(), ttl=60)
    assert await machine.call(real_redis, done) == 1
    assert await claim(b, 5) == [1]  # one ended: room for one more


async def test_an_api_keys_per_batch_limit_bounds_its_batches_running_items_and_others_keep_the_setting(
    settings: Settings, real_redis: Redis
) -> None:
    # the API runs with the default setting (200); the claiming worker's live setting is 4: a batch
    # without a key override follows the worker's setting, not the one in force at its creation
    plain, _ = await issue(real_redis, "acme", "key")
    small, _ = await issue(real_redis, "smallco", "key", limits=Limits(batch_max_running_items=2))
    roomy, _ = await issue(real_redis, "bigco", "key", limits=Limits(batch_max_running_items=7))
    data = jsonl(*(line(f"r{n}", f"p{n}") for n in range(10)))
    running = {}
    async with TestClient(TestServer(make_app(settings))) as c:
        for name, key in (("plain", plain), ("small", small), ("roomy", roomy)):
            sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key=key, max_retries=0)
            batch = await submit(sdk, data)
            await sdk.close()
            k = await batches.batch_keys(real_redis, batch.id)
            assert k is not None
            kept = await real_redis.hget(keys.batch(batch.id), "batch_limit")
            assert kept == {"plain": None, "small": b"2", "roomy": b"7"}[name]  # only an override is kept
            # a worker asks for 10 with its own setting, 4: a key's override decides, else the setting
            answer = await machine.call(
                real_redis, batches.claim(k, 10, lease_ms=60_000, max_running=4, user_max_running=400)
            )
            running[name] = len(answer) // 2
    assert running == {"plain": 4, "small": 2, "roomy": 7}


def test_keys_create_takes_batch_max_running_items_as_the_keys_per_batch_override() -> None:
    args = build_parser().parse_args(["keys", "create", "--user", "acme", "--batch-max-running-items", "3"])
    limits = Limits(batch_max_running_items=args.batch_max_running_items)
    credential = Credential("0" * 16, "acme", "key", "", "", limits)
    assert quota(Settings(), credential).batch_max_running_items == 3
    assert quota(Settings(), Credential("0" * 16, "acme", "key", "", "")).batch_max_running_items == 200


def test_keys_create_warns_when_the_per_batch_override_is_above_the_users_limit() -> None:
    warning = keys_cli.limits_warning(Limits(batch_max_running_items=500, batch_running_items=300), Settings())
    assert warning is not None
    assert "above the user's limit across their batches (300)" in warning
    assert keys_cli.limits_warning(Limits(batch_max_running_items=500), Settings()) is not None  # default 400
    assert keys_cli.limits_warning(Limits(batch_max_running_items=300), Settings()) is None
    assert keys_cli.limits_warning(Limits(), Settings()) is None


async def test_an_upload_whose_filename_is_not_utf8_is_kept_with_replacement_characters(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
) -> None:
    # a hand-made multipart body: the SDK and aiohttp's writer would both encode the name for us
    data = jsonl(line("a", "one"))
    body = (
        b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--xx\r\nContent-Disposition: form-data; name="file"; filename="\xff\xfe.jsonl"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + data + b"\r\n--xx--\r\n"
    )
    headers = {**bearer(token), "Content-Type": "multipart/form-data; boundary=xx"}
    async with client.post("/v1/files", data=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        uploaded = await response.json()
    assert uploaded["filename"].endswith(".jsonl")
    async with client.get(f"/v1/files/{uploaded['id']}", headers=bearer(token)) as response:
        assert (await response.json())["filename"] == uploaded["filename"]


async def test_files_listed_by_purpose_are_filtered_before_the_limit_so_the_sdk_pages_on(
    sdk: openai.AsyncOpenAI, real_redis: Redis
) -> None:
    made = [
        (await sdk.files.create(file=(f"{n}.jsonl", io.BytesIO(jsonl(line("a", "p")))), purpose="batch")).id
        for n in range(4)
    ]
    for file_id in (made[3], made[2], made[0]):  # the newest two and the oldest look like results
        await real_redis.hset(keys.file(file_id), "purpose", "batch_output")
    page = await sdk.files.list(purpose="batch", limit=1)
    assert [f.id for f in page.data] == [made[1]]
    assert page.has_more is False
    assert [f.id async for f in sdk.files.list(purpose="batch_output", limit=1)] == [made[3], made[2], made[0]]


async def test_429s_slow_a_batch_but_use_up_no_attempt_so_a_burst_longer_than_the_retries_completes(
    sdk: openai.AsyncOpenAI, feeder: BatchFeeder, settings: Settings
) -> None:
    assert settings.max_attempts == 3
    limited = "fake?words=3&fail=429&fail_times=3"  # the 4th request answers: past max_attempts
    batch = await submit(sdk, jsonl(*(line(f"r{n}", f"p{n}", model=limited) for n in range(3))))

    await feeder.run_until_idle()

    done = await sdk.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)


async def test_a_file_of_big_lines_is_read_in_pages_of_about_the_byte_budget(real_redis: Redis) -> None:
    from types import SimpleNamespace

    from streambridge.api.files import PAGE_BYTES, pages

    assert PAGE_BYTES == 2 * 1024 * 1024
    key = f"test:big-lines:{id(real_redis)}"
    big = [bytes([97 + n]) * 300_000 for n in range(10)]
    await real_redis.rpush(key, *big)
    try:
        ctx = SimpleNamespace(redis=real_redis)
        read = [page async for page in pages(ctx, key)]  # type: ignore[arg-type]
        assert b"".join(read) == b"".join(x + b"\n" for x in big)
        assert [page.count(b"\n") for page in read] == [7, 3]  # the line that crosses 2 MiB ends a page
        stopped = [page async for page in pages(ctx, key, stop=9, budget=1_000_000)]  # type: ignore[arg-type]
        assert [page.count(b"\n") for page in stopped] == [4, 4, 1]
    finally:
        await real_redis.delete(key)


async def test_expiry_walks_a_batch_bigger_than_its_chunk_over_several_ticks_one_line_per_item(
    sdk: openai.AsyncOpenAI, real_redis: Redis
) -> None:
    batch = await submit(sdk, jsonl(*(line(f"r{n}", f"p{n}") for n in range(5))))
    k = await batches.batch_keys(real_redis, batch.id)
    assert k is not None
    finished = batches.done(k, 1, ok=True, line=b'{"custom_id": "r1"}', custom_id="r1", usage=batches.Usage(), ttl=60)
    assert await machine.call(real_redis, finished) == 1
    await real_redis.hset(keys.batch(batch.id), "expires_ms", 0)  # the window is over

    def tick() -> machine.Call:
        return batches.tick(k, ttl=60, expire_chunk=2)

    assert await machine.call(real_redis, tick()) == -1  # lines 0-1 walked: more to come
    midway = await sdk.batches.retrieve(batch.id)
    assert midway.status == "in_progress"
    assert midway.request_counts is not None
    assert (midway.request_counts.completed, midway.request_counts.failed) == (1, 1)
    late = batches.done(k, 4, ok=True, line=b'{"custom_id": "r4"}', custom_id="r4", usage=batches.Usage(), ttl=60)
    assert await machine.call(real_redis, late) == 0  # the expiry owns every unfinished line
    assert await machine.call(real_redis, batches.cancel(k, ttl=60)) == b"in_progress"
    assert await machine.call(real_redis, batches.renew(k, [3], lease_ms=1000)) == b"expired"
    assert await machine.call(real_redis, tick()) == -1  # lines 2-3
    assert await machine.call(real_redis, tick()) == 0  # line 4: the end

    done = await sdk.batches.retrieve(batch.id)
    assert done.status == "expired"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed, done.request_counts.total) == (1, 4, 5)
    errors = await content(sdk, done.error_file_id)
    assert sorted(errors) == ["r0", "r2", "r3", "r4"]
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}  # type: ignore[index]
    assert await real_redis.zscore(keys.active_batches(), batch.id) is None


async def test_a_visitor_past_its_file_quota_is_refused_until_it_deletes_a_file(
    settings: Settings,
    real_redis: Redis,
) -> None:
    data = jsonl(*(line(f"r{n}", "x" * 100) for n in range(20)))
    quota = len(data) * 2 + 10  # room for two files of `data`, not three
    async with TestClient(
        TestServer(make_app(msgspec.structs.replace(settings, visitor_file_bytes_per_user=quota)))
    ) as c:
        token = (await (await c.post("/v1/auth/visitor")).json())["token"]
        sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key=token, max_retries=0)
        first = await sdk.files.create(file=("a.jsonl", io.BytesIO(data)), purpose="batch")
        await sdk.files.create(file=("b.jsonl", io.BytesIO(data)), purpose="batch")
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.files.create(file=("c.jsonl", io.BytesIO(data)), purpose="batch")
        assert refused.value.code == "storage_quota_exceeded"
        assert len([f async for f in sdk.files.list()]) == 2, "the refused upload left nothing behind"
        user = (await real_redis.hget(keys.file(first.id), "owner")).decode()  # type: ignore[misc]
        assert int(await real_redis.get(keys.user_file_bytes(user))) == 2 * len(data)
        await sdk.files.delete(first.id)
        third = await sdk.files.create(file=("c.jsonl", io.BytesIO(data)), purpose="batch")
        assert third.bytes == len(data)
        # a file bigger than the whole quota is refused as it is read, before it is all sent
        with pytest.raises(openai.BadRequestError) as alone:
            await sdk.files.create(file=("d.jsonl", io.BytesIO(data * 3)), purpose="batch")
        assert alone.value.code == "storage_quota_exceeded"
        await sdk.close()


async def test_an_expired_files_bytes_are_no_longer_counted(
    settings: Settings,
    real_redis: Redis,
) -> None:
    data = jsonl(line("a", "one"))
    limited = msgspec.structs.replace(settings, visitor_file_bytes_per_user=len(data) + 5)
    async with TestClient(TestServer(make_app(limited))) as c:
        token = (await (await c.post("/v1/auth/visitor")).json())["token"]
        sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key=token, max_retries=0)
        first = await sdk.files.create(file=("a.jsonl", io.BytesIO(data)), purpose="batch")
        with pytest.raises(openai.BadRequestError):
            await sdk.files.create(file=("b.jsonl", io.BytesIO(data)), purpose="batch")
        # as if FILE_TTL had passed: the file's member is scored by when it expires
        user = (await real_redis.hget(keys.file(first.id), "owner")).decode()  # type: ignore[misc]
        await real_redis.zadd(keys.user_file_sizes(user), {f"{first.id}:{len(data)}": 1})
        await sdk.files.create(file=("b.jsonl", io.BytesIO(data)), purpose="batch")
        assert int(await real_redis.get(keys.user_file_bytes(user))) == len(data)
        await sdk.close()


async def test_an_api_keys_file_bytes_override_raises_its_quota(
    settings: Settings,
    real_redis: Redis,
) -> None:
    data = jsonl(*(line(f"r{n}", "x" * 100) for n in range(20)))
    tight = msgspec.structs.replace(settings, file_bytes_per_user=len(data) + 10)
    plain, _ = await issue(real_redis, "acme", "key")
    roomy, _ = await issue(real_redis, "bigco", "key", limits=Limits(file_bytes=len(data) * 3))
    async with TestClient(TestServer(make_app(tight))) as c:
        for key, fits in ((plain, 1), (roomy, 3)):
            sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key=key, max_retries=0)
            for _ in range(fits):
                await sdk.files.create(file=("a.jsonl", io.BytesIO(data)), purpose="batch")
            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.files.create(file=("a.jsonl", io.BytesIO(data)), purpose="batch")
            assert refused.value.code == "storage_quota_exceeded"
            await sdk.close()


def test_keys_create_takes_file_bytes_as_the_keys_override() -> None:
    args = build_parser().parse_args(["keys", "create", "--user", "acme", "--file-bytes", "12345"])
    assert args.file_bytes == 12345
    assert "file_bytes" in keys_cli.LIMIT_FLAGS
    credential = Credential("0" * 16, "acme", "key", "", "", Limits(file_bytes=args.file_bytes))
    assert quota(Settings(), credential).file_bytes == 12345


async def test_batch_results_past_the_file_quota_are_kept_but_count_so_no_new_upload_or_batch_starts(
    settings: Settings, real_redis: Redis, llm_url: str
) -> None:
    data = jsonl(*(line(f"r{n}", f"quota {n}") for n in range(4)))
    # room for the input, not for the input and its results (each output line is a few hundred bytes)
    limited = msgspec.structs.replace(settings, visitor_file_bytes_per_user=len(data) + 200)
    async with TestClient(TestServer(make_app(limited))) as c:
        token = (await (await c.post("/v1/auth/visitor")).json())["token"]
        sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key=token, max_retries=0)
        batch = await submit(sdk, data)
        llm = make_client(llm_url, None)
        feeder = BatchFeeder(real_redis, llm, limited)
        await feeder.run_until_idle()
        await feeder.close()
        await llm.close()
        done = await sdk.batches.retrieve(batch.id)
        assert done.status == "completed", "results are never refused"
        assert done.request_counts is not None
        assert done.request_counts.completed == 4
        output = await sdk.files.retrieve(done.output_file_id or "")
        user = (await real_redis.hget(keys.batch(batch.id), "owner")).decode()  # type: ignore[misc]
        assert int(await real_redis.get(keys.user_file_bytes(user))) == len(data) + output.bytes

        with pytest.raises(openai.BadRequestError) as upload:
            await sdk.files.create(file=("b.jsonl", io.BytesIO(b"\n")), purpose="batch")
        assert upload.value.code == "storage_quota_exceeded"
        with pytest.raises(openai.BadRequestError) as again:
            await sdk.batches.create(
                input_file_id=batch.input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert again.value.code == "storage_quota_exceeded"
        assert again.value.param == "input_file_id"

        await sdk.files.delete(output.id)  # frees the results' bytes: the same input runs again
        rerun = await sdk.batches.create(
            input_file_id=batch.input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert rerun.status == "in_progress"
        assert int(await real_redis.get(keys.user_file_bytes(user))) == len(data)
        await sdk.close()


async def test_batches_created_at_once_store_no_more_than_the_quota_and_one_batchs_results(
    settings: Settings, real_redis: Redis, llm_url: str
) -> None:
    data = jsonl(*(line(f"r{n}", f"many {n}") for n in range(2)))
    # the quota leaves room for the input and about two result lines; the user runs 2 items at once
    limited = msgspec.structs.replace(settings, visitor_file_bytes_per_user=832, batch_user_max_running_items=2)
    async with TestClient(TestServer(make_app(limited))) as c:
        token = (await (await c.post("/v1/auth/visitor")).json())["token"]
        sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key=token, max_retries=0)
        first = await submit(sdk, data)
        made = [first.id] + [
            (
                await sdk.batches.create(
                    input_file_id=first.input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
                )
            ).id
            for _ in range(9)
        ]  # all accepted: nothing is stored yet but the input
        llm = make_client(llm_url, None)
        feeder = BatchFeeder(real_redis, llm, limited)
        feeder.start()
        await asyncio.sleep(3)  # long enough for all ten to run, unbounded
        await feeder.close()
        await llm.close()
        user = (await real_redis.hget(keys.batch(first.id), "owner")).decode()  # type: ignore[misc]
        stored = int(await real_redis.get(keys.user_file_bytes(user)))
        sizes = [
            int(x or 0)
            for b in made
            for x in await real_redis.hmget(keys.batch(b), "output_bytes", "error_bytes")  # type: ignore[misc]
        ]
        ran = [(await sdk.batches.retrieve(b)).status for b in made]
        assert ran.count("completed") >= 1
        assert "in_progress" in ran, "the rest wait while the owner is over the quota"
        assert stored == len(data) + sum(sizes), "every result line written is counted as it is written"
        assert stored <= 832 + max(sizes), ran
        await sdk.close()
