"""A full run's logs, as an operator collects them: every process JSON, one chat followed across
api, worker and edge by its id and trace id, and no prompt, answer or credential anywhere unless
``STREAMBRIDGE_LOG_CONTENT`` says so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from streambridge.fake_llm import DEFAULT_CONFIG, expected_text
from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, fake_llm, read_events, start_together

pytestmark = pytest.mark.e2e

PROMPT = "zebra-quokka-marmalade-7741 what is the tide doing"
LLM_KEY = "sk-llm-key-that-must-never-be-logged-3141"
SECRET = "signing-secret-that-must-never-be-logged-2718"
#: each chat's own trace: the lines naming a chat must carry its trace id, not another's
TRACE_IDS = ("0af7651916cd43dd8448eb211c80319c", "4bf92f3577b34da6a3ce929d0e0e4736")


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-b7ad6b7169203331-01"


@dataclass
class Run:
    """What one full run left: each process's stderr and stdout, and the secrets it was given."""

    logs: dict[str, list[str]] = field(default_factory=dict)  # role → stderr lines
    stdout: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    chat_id: str = ""
    traces: dict[str, str] = field(default_factory=dict)  # chat id → the trace id its POST sent

    def everything(self) -> str:
        return "\n".join(line for lines in self.logs.values() for line in lines) + "".join(self.stdout)


def full_run(logs: Path, **settings: str) -> Run:
    """redis-server, the simulated LLM, an api, an edge and a worker at DEBUG with access logs, then
    chats through every door: an API key, a visitor, the stream URL's token, a resume, a cancel."""
    redis = OwnRedis()
    llm, llm_url = fake_llm(logs, "--ttft-ms", "5", "--delay-ms", "1")
    env = clean_env(
        STREAMBRIDGE_REDIS_URL=redis.url(0),
        STREAMBRIDGE_LLM_BASE_URL=llm_url,
        STREAMBRIDGE_LLM_API_KEY=LLM_KEY,
        STREAMBRIDGE_SECRET=SECRET,
        STREAMBRIDGE_LOG_LEVEL="DEBUG",
        STREAMBRIDGE_LOG_FORMAT="json",
        STREAMBRIDGE_ACCESS_LOG="true",
        **settings,
    )
    processes: dict[str, Process] = {}
    run = Run(secrets=[LLM_KEY, SECRET])
    try:
        processes["edge"] = Process(["edge", "--port", "0"], env, logs, wait=False)
        processes["worker"] = Process(["worker"], env, logs, ready="worker started", wait=False)
        edge_env = {**env, "STREAMBRIDGE_PUBLIC_EDGE_URL": processes["edge"].wait_ready().url}
        processes["api"] = Process(["api", "--port", "0"], edge_env, logs, wait=False)
        start_together(llm, *processes.values())
        created = subprocess.run(
            [sys.executable, "-m", "streambridge", "keys", "create", "--user", "logs"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        api_key = created.stdout.strip()
        run.secrets.append(api_key)
        asyncio.run(chats(run, processes["api"].url, processes["edge"].url, api_key))
    finally:
        codes = {}
        for process in [llm, *processes.values()]:  # side by side
            process.terminate()
        for role, process in reversed(processes.items()):  # every one stopped, then checked
            codes[role] = process.stop()
            run.logs[role] = process.log_path.read_text().splitlines()
            run.stdout += process.stdout
        llm.stop()
        redis.stop()
    assert all(code == 0 for code in codes.values()), (codes, run.logs)
    return run


async def chats(run: Run, api: str, edge: str, api_key: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/v1/auth/visitor") as response:
            visitor = (await response.json())["token"]
        run.secrets.append(visitor)
        for token, trace_id in zip((api_key, visitor), TRACE_IDS, strict=True):
            auth = {"Authorization": f"Bearer {token}"}
            headers = {**auth, "traceparent": traceparent(trace_id), "Idempotency-Key": f"k-{token[:3]}"}
            async with http.post(f"{api}/v1/chats", json={"message": PROMPT}, headers=headers) as response:
                assert response.status == 202, await response.text()
                chat = await response.json()
            run.chat_id = run.chat_id or chat["id"]
            run.traces[chat["id"]] = trace_id
            stream_url = chat["stream_url"]
            run.secrets.append(stream_url.partition("token=")[2])
            events = await read_events(http, stream_url)  # the token in the query
            assert events[-1].event == "complete"
            await read_events(http, stream_url.partition("?")[0], auth | {"Last-Event-ID": events[1].id or ""})
            async with http.get(f"{api}/v1/chats/{chat['id']}", headers=auth) as response:
                assert (await response.json())["content"] == expected_text(PROMPT, DEFAULT_CONFIG.words)
            async with http.post(f"{api}/v1/chats/{chat['id']}/cancel", headers=auth) as response:
                assert response.status == 202
        auth = {"Authorization": f"Bearer {api_key}"}
        body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}
        async with http.post(f"{edge}/v1/chat/completions", json=body, headers=auth) as response:  # served by edges
            assert response.status == 200, await response.text()
        # requests the API refuses, the prompt in them: their errors are answered, not logged with it
        refused = {"message": PROMPT, "temperature": PROMPT}  # a field of the wrong type
        async with http.post(f"{api}/v1/chats", json=refused, headers=auth) as response:
            assert response.status == 422
        async with http.post(f"{api}/v1/chats", data=f'{{"message": "{PROMPT}"', headers=auth) as response:
            assert response.status == 400
        async with http.get(f"{api}/v1/chats/{run.chat_id}", headers={"Authorization": "Bearer sbk_nope"}) as response:
            assert response.status == 401


def records(run: Run) -> dict[str, list[dict[str, Any]]]:
    parsed: dict[str, list[dict[str, Any]]] = {}
    for role, lines in run.logs.items():
        for line in lines:
            record = json.loads(line)  # every line of every process's log is one JSON object
            assert isinstance(record, dict), line
            parsed.setdefault(role, []).append(record)
    return parsed


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return full_run(tmp_path_factory.mktemp("logs"))


def test_no_prompt_answer_or_credential_reaches_any_log(quiet_run: Run) -> None:
    everything = quiet_run.everything()
    assert quiet_run.chat_id in everything, "the run was logged"
    assert PROMPT not in everything
    assert "zebra-quokka" not in everything
    assert expected_text(PROMPT, DEFAULT_CONFIG.words) not in everything
    for secret in quiet_run.secrets:
        assert secret
        assert secret not in everything, f"{secret[:6]}… was logged"


def test_every_line_is_json_and_one_chat_is_followed_across_processes(quiet_run: Run) -> None:
    by_role = records(quiet_run)
    assert set(by_role) == {"api", "edge", "worker"}
    for role, lines in by_role.items():
        assert all(r["role"] == role and r["ts"].endswith("Z") and r["level"] and r["logger"] for r in lines)
        assert any(r.get("chat_id") == quiet_run.chat_id for r in lines), f"{role} never names the chat"
    chat_events = {role: [r for r in lines if r.get("chat_id") == quiet_run.chat_id] for role, lines in by_role.items()}
    events = {role: {r.get("event") for r in lines} for role, lines in chat_events.items()}
    assert {"chat.admitted", "http.request", "chat.cancel_requested"} <= events["api"]
    assert {"attempt.started", "chat.completed"} <= events["worker"]
    assert {"stream.opened", "stream.resumed", "stream.closed"} <= events["edge"]
    assert len(set(quiet_run.traces)) == len(TRACE_IDS)
    for chat_id, trace_id in quiet_run.traces.items():
        for role, lines in by_role.items():
            naming = [r for r in lines if r.get("chat_id") == chat_id]
            assert naming, f"{role} never names chat {chat_id}"
            assert {r.get("trace_id") for r in naming} == {trace_id}, (
                f"{role}: a line naming {chat_id} has another trace"
            )
    admitted = next(r for r in chat_events["api"] if r.get("event") == "chat.admitted")
    assert admitted["user"] == "logs"
    assert "prompt" not in admitted
    started = next(r for r in chat_events["worker"] if r.get("event") == "attempt.started")
    assert started["attempt"] == 1
    assert started["user"] == "logs"


def test_with_log_content_on_the_prompt_and_answer_are_logged(tmp_path_factory: pytest.TempPathFactory) -> None:
    run = full_run(tmp_path_factory.mktemp("content"), STREAMBRIDGE_LOG_CONTENT="true")
    everything = run.everything()
    assert PROMPT in everything
    assert expected_text(PROMPT, DEFAULT_CONFIG.words) in everything
    for secret in run.secrets:
        assert secret not in everything, f"{secret[:6]}… was logged"
    records(run)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_up_prints_no_credential_of_the_llm_url(tmp_path: Path, log_format: str) -> None:
    """What ``up`` and a worker print about themselves (stdout's start line, stderr's notices) is
    scrubbed as the log is: the LLM's URL without its userinfo and query."""
    llm_url = "https://user:llmpass99@llm.invalid/v1?api-key=AZKEY1234"
    env = clean_env(STREAMBRIDGE_LLM_BASE_URL=llm_url, STREAMBRIDGE_LOG_FORMAT=log_format)
    up = Process(["up", "--port", "0"], env, tmp_path)
    code = up.stop()
    said = up.log_path.read_text() + "".join(up.stdout)
    assert code == 0, said
    assert "https://llm.invalid/v1" in said, said
    for secret in ("llmpass99", "AZKEY1234", "user:"):
        assert secret not in said, said


def test_a_worker_that_cannot_reach_redis_says_so_in_json(tmp_path: Path) -> None:
    env = clean_env(STREAMBRIDGE_REDIS_URL="redis://:hunter2pw@127.0.0.1:1/0", STREAMBRIDGE_LOG_FORMAT="json")
    done = subprocess.run(
        [sys.executable, "-m", "streambridge", "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # every line on stderr is one JSON object
    failed = records[-1]
    assert failed["event"] == "process.failed"
    assert failed["level"] == "ERROR"
    assert failed["message"].startswith("cannot start: ")
    assert "hunter2pw" not in done.stderr


def test_a_workers_start_line_prints_no_credential_of_the_llm_url(tmp_path: Path) -> None:
    redis = OwnRedis()
    try:
        llm_url = "https://user:llmpass99@llm.invalid/v1?api-key=AZKEY1234"
        env = clean_env(STREAMBRIDGE_REDIS_URL=redis.url(0), STREAMBRIDGE_LLM_BASE_URL=llm_url)
        worker = Process(["worker"], env, tmp_path, ready="worker started")
        code = worker.stop()
    finally:
        redis.stop()
    said = worker.log_path.read_text() + "".join(worker.stdout)
    assert code == 0, said
    assert "LLM at https://llm.invalid/v1" in "".join(worker.stdout)
    for secret in ("llmpass99", "AZKEY1234"):
        assert secret not in said, said
