"""API keys through the operator's CLI against a running deployment, and no secret in any log:
every process at DEBUG through a full run (keys, visitors, stream URLs, refusals, revocation)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, fake_llm, read_events, start_together

pytestmark = pytest.mark.e2e

LLM_KEY = "sk-llm-secret-0123456789abcdef"
SIGNING_SECRET = "signing-secret-0123456789abcdef"


class Deployment:
    def __init__(self) -> None:
        self.redis = OwnRedis()
        self.logs = Path(tempfile.mkdtemp(prefix="sb-keys-"))
        self.cli_output: list[str] = []
        self.llm, llm_url = fake_llm(self.logs, "--ttft-ms", "5", "--delay-ms", "1")
        self.env = clean_env(
            STREAMBRIDGE_REDIS_URL=self.redis.url(0),
            STREAMBRIDGE_LLM_BASE_URL=llm_url,
            STREAMBRIDGE_LLM_API_KEY=LLM_KEY,
            STREAMBRIDGE_SECRET=SIGNING_SECRET,
            STREAMBRIDGE_LOG_LEVEL="DEBUG",
        )
        self.up = Process(["up", "--port", "0"], self.env, self.logs, wait=False)
        start_together(self.llm, self.up)

    def keys(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "streambridge", "keys", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        self.cli_output.append(result.stderr)
        if args[0] != "create":  # create prints the key on stdout, as it must: once
            self.cli_output.append(result.stdout)
        return result

    def stop(self) -> None:
        self.llm.terminate()  # beside up: they stop side by side
        code = self.up.stop()
        self.llm.stop()
        self.redis.stop()
        assert code == 0

    def all_logs(self) -> str:
        return "".join(p.read_text() for p in self.logs.iterdir()) + "".join(self.up.stdout)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    system = Deployment()
    yield system
    system.stop()


def test_keys_are_created_listed_and_revoked_through_the_cli(deployment: Deployment) -> None:
    created = deployment.keys("create", "--user", "acme", "--max-running-chats", "7")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("sbk_")
    assert len(created.stdout.splitlines()) == 1, "stdout holds the key alone, for scripts"
    key_id = key.split("_")[1]
    listed = deployment.keys("list")
    assert key_id in listed.stdout
    assert "acme" in listed.stdout
    assert "max_running_chats=7" in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout, "list never shows a secret"

    async def use() -> tuple[int, int]:
        async with aiohttp.ClientSession(deployment.up.url) as http:
            auth = {"Authorization": f"Bearer {key}"}
            async with http.post("/v1/chats", json={"message": "hi"}, headers=auth) as response:
                before = response.status
            assert deployment.keys("revoke", key_id).returncode == 0
            async with http.post("/v1/chats", json={"message": "hi"}, headers=auth) as response:
                return before, response.status

    assert asyncio.run(use()) == (202, 401)
    assert deployment.keys("revoke", key_id).returncode == 1, "revoking twice says there was no such key"
    assert key_id not in deployment.keys("list").stdout


def test_no_key_token_or_secret_ever_reaches_a_log(deployment: Deployment) -> None:
    key = deployment.keys("create", "--user", "logs").stdout.strip()
    secrets_seen: list[str] = [key, LLM_KEY, SIGNING_SECRET]

    async def full_run() -> None:
        async with aiohttp.ClientSession(deployment.up.url) as http:
            async with http.post("/v1/auth/visitor") as response:
                visitor = (await response.json())["token"]
            secrets_seen.append(visitor)
            for token in (visitor, key):
                auth = {"Authorization": f"Bearer {token}"}
                async with http.post("/v1/chats", json={"message": "hi"}, headers=auth) as response:
                    chat = await response.json()
                stream_token = chat["stream_url"].split("token=")[1]
                secrets_seen.append(stream_token)
                await read_events(http, chat["stream_url"])  # to the end
                async with http.get(f"/v1/chats/{chat['id']}", headers=auth) as response:
                    secrets_seen.append((await response.json())["stream_url"].split("token=")[1])
                # refusals log too: a wrong token, a forged stream token, another chat's
                wrong = {"Authorization": f"Bearer {token}x"}
                async with http.post("/v1/chats", json={"message": "hi"}, headers=wrong) as response:
                    assert response.status == 401
                async with http.get(chat["stream_url"] + "x") as response:
                    assert response.status == 401
        deployment.keys("revoke", key)
        async with aiohttp.ClientSession(deployment.up.url) as http:
            auth = {"Authorization": f"Bearer {key}"}
            async with http.get(f"/v1/chats/{'0' * 32}", headers=auth) as response:
                assert response.status == 401

    asyncio.run(full_run())
    logs = deployment.all_logs() + "".join(deployment.cli_output)
    assert "DEBUG" in logs, "the processes really logged at DEBUG"
    for secret in secrets_seen:
        for part in secret_parts(secret):
            assert part not in logs, f"a secret reached a log: {part[:8]}…"


def secret_parts(secret: str) -> set[str]:
    """The secret, and the part of it that is secret on its own: a key's or visitor token's after
    its id (``sbk_<id>_<secret>``), a stream token's signature (``<expiry>.<id>.<signature>``).
    Either may hold ``_`` or ``.`` itself, so each is cut where its format says, not at the last."""
    if secret.startswith(("sbk_", "sbv_")):
        return {secret, secret.split("_", 2)[2]}
    if secret.count(".") >= 2:
        return {secret, secret.split(".", 2)[2]}
    return {secret}
