"""Property-based fuzzing of a real ``streambridge up`` from its own ``GET /openapi.json`` (schemathesis).

Every operation of the document gets generated requests, valid and invalid (schemathesis'
examples, coverage and fuzzing phases), with a visitor's token, then without a good one. The
property: never a 5xx, and every answer has a documented status, content type, headers and body;
a request the document rules out gets a 4xx; no credential but the owner's opens a chat.

Bounded and repeatable: a fixed number of examples per operation, derandomized generation, no
example database on disk, and a request timeout, so a stream of a running chat cannot hang it.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest
import requests
import schemathesis
from hypothesis.configuration import set_hypothesis_home_dir
from requests.structures import CaseInsensitiveDict
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.specs.openapi import checks

from streambridge.api import openapi, openapi_batches
from streambridge.shared.settings import ENV_PREFIX, Settings
from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, fake_llm, start_together

pytestmark = pytest.mark.e2e

# Hypothesis keeps caches (constants it found in the source, Unicode tables) under ./.hypothesis
# even without an example database: keep them out of the work tree.
HYPOTHESIS_HOME = Path(tempfile.mkdtemp(prefix="sb-fuzz-hypothesis-"))
set_hypothesis_home_dir(HYPOTHESIS_HOME)

Case: TypeAlias = schemathesis.Case[Any]

#: examples per operation in the fuzzing phase (the examples and coverage phases add their own)
MAX_EXAMPLES = int(os.environ.get("SB_TEST_FUZZ_EXAMPLES", "50"))  # CI's time budget; the coverage phase
# adds the boundary cases. A longer run: SB_TEST_FUZZ_EXAMPLES=1000
#: seconds for one request; an event stream is read for at most this long, then judged on what came
REQUEST_TIMEOUT = 3.0
SEED = 20241124
CHAT_ID = re.compile(openapi.CHAT_ID_PATTERN)
FILE_ID = re.compile(openapi_batches.FILE_ID_PATTERN)
BATCH_ID = re.compile(openapi_batches.BATCH_ID_PATTERN)
RESPONSE_ID = re.compile(openapi.RESPONSE_ID_PATTERN)
PUBLIC = frozenset({"GET /healthz", "GET /readyz", "GET /metrics", "GET /openapi.json", "POST /v1/auth/visitor"}) | {
    f"GET {path}"
    for path in ("/", "/page/chat.js", "/page/chat.css", "/page/icon.svg", "/streambridge.js", "/streambridge.d.ts")
}

# Limits high enough that most answers are not 429 (a 429 is still a documented answer). Only the
# settings this version has are passed: an unknown STREAMBRIDGE_* variable stops the process.
LIMITS = {
    "chats_per_minute": "100000",
    "visitor_chats_per_minute": "100000",
    "max_running_chats": "100000",
    "visitor_max_running_chats": "100000",
    "max_open_streams": "100000",
    "visitor_max_open_streams": "100000",
    "max_open_streams_per_ip": "100000",
    "max_queue_depth": "1000000",
    "visitor_logins_per_minute": "100000",
}

CONFORMANCE: list[CheckFunction] = [
    not_a_server_error,  # never a 5xx
    checks.status_code_conformance,  # every status documented for its operation
    checks.content_type_conformance,  # ... with its documented content type
    checks.response_headers_conformance,  # ... its required headers (Retry-After on 429) and their values
    checks.response_schema_conformance,  # ... and a body of its schema (each SSE event's data too)
]
CHECKS: list[CheckFunction] = [
    *CONFORMANCE,
    checks.negative_data_rejection,  # a request the document rules out gets a 4xx
    checks.missing_required_header,  # ... also one without a required header
    checks.unsupported_method,  # another method gets 405 with Allow
    checks.ignored_auth,  # a 2xx is sent again without the token and with a made-up one, which must fail
]


@dataclass
class Server:
    url: str
    token: str  # a visitor's
    other_token: str  # another visitor's
    stream_token: str  # the token of the first chat's stream_url
    chat_ids: list[str]  # the first visitor's chats: one that ended, then those fuzzing created
    cancelled: str  # a chat of the first visitor's that was cancelled (its cancel answers 2xx again)
    model: str  # a model the upstream lists
    file_ids: list[str]  # the first visitor's batch input, then the files fuzzing uploaded
    batch_id: str  # the first visitor's batch, made from that file
    statuses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)


def limits_env() -> dict[str, str]:
    known = set(Settings.__struct_fields__)
    return {ENV_PREFIX + name.upper(): value for name, value in LIMITS.items() if name in known}


def visitor(http: requests.Session, url: str) -> str:
    response = http.post(f"{url}/v1/auth/visitor", timeout=10)
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def completed_chat(http: requests.Session, url: str, auth: dict[str, str]) -> tuple[str, str]:
    """A chat that ran to its end: its id and its stream token."""
    response = http.post(f"{url}/v1/chats", json={"message": "fuzz me"}, headers=auth, timeout=10)
    assert response.status_code == 202, response.text
    chat_id, stream_url = str(response.json()["id"]), str(response.json()["stream_url"])
    deadline = time.monotonic() + 20
    while http.get(f"{url}/v1/chats/{chat_id}", headers=auth, timeout=10).json()["status"] != "complete":
        assert time.monotonic() < deadline, "the fixture's chat did not complete"
        time.sleep(0.1)
    return chat_id, parse_qs(urlsplit(stream_url).query)["token"][0]


def a_batch(http: requests.Session, url: str, auth: dict[str, str]) -> tuple[str, str]:
    """A batch input file, and a batch made from it."""
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}
    line["body"] = {"messages": [{"role": "user", "content": "fuzz me"}]}
    files = {"file": ("in.jsonl", msgspec.json.encode(line) + b"\n"), "purpose": (None, "batch")}
    uploaded = http.post(f"{url}/v1/files", files=files, headers=auth, timeout=10)
    assert uploaded.status_code == 200, uploaded.text
    body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = http.post(f"{url}/v1/batches", json=body, headers=auth, timeout=10)
    assert batch.status_code == 200, batch.text
    return str(uploaded.json()["id"]), str(batch.json()["id"])


def cancelled_chat(http: requests.Session, url: str, auth: dict[str, str]) -> str:
    body = {"message": "cancel me", "model": "fake?words=1000&delay_ms=50"}
    chat_id = str(http.post(f"{url}/v1/chats", json=body, headers=auth, timeout=10).json()["id"])
    response = http.post(f"{url}/v1/chats/{chat_id}/cancel", headers=auth, timeout=10)
    assert response.status_code == 202, response.text
    return chat_id


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """``streambridge up`` through the CLI, on a redis-server of the test's own; two visitors, one chat."""
    redis = OwnRedis()
    logs = Path(tempfile.mkdtemp(prefix="sb-fuzz-"))
    process: Process | None = None
    # a quick upstream: every non-streaming create waits for its chat's end (the default's answer takes ~1.7 s)
    llm, llm_url = fake_llm(logs, "--ttft-ms", "0", "--delay-ms", "0", "--words", "8")
    try:
        env = clean_env(STREAMBRIDGE_REDIS_URL=redis.url(0), STREAMBRIDGE_LLM_BASE_URL=llm_url, **limits_env())
        process = Process(["up", "--port", "0"], env, logs, wait=False)
        start_together(llm, process)
        with requests.Session() as http:
            token, other = visitor(http, process.url), visitor(http, process.url)
            auth = {"Authorization": f"Bearer {token}"}
            chat_id, stream_token = completed_chat(http, process.url, auth)
            cancelled = cancelled_chat(http, process.url, auth)
            model = http.get(f"{process.url}/v1/models", headers=auth, timeout=10).json()["data"][0]["id"]
            file_id, batch_id = a_batch(http, process.url, auth)
        yield Server(process.url, token, other, stream_token, [chat_id], cancelled, model, [file_id], batch_id)
    finally:
        if process is not None:
            assert process.stop() == 0, process.log_path.read_text()
        llm.stop()
        redis.stop()
        shutil.rmtree(HYPOTHESIS_HOME, ignore_errors=True)


def fuzz_config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "request-timeout": REQUEST_TIMEOUT,
            "warnings": False,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            # No input drawn from earlier answers (random chat ids) or steered by them: the same
            # requests every run, give or take what a live system answers.
            "phases": {
                "examples": {"enabled": True, "extra-data-sources": {"responses": False}},
                "coverage": {"enabled": True, "extra-data-sources": {"responses": False}},
                "fuzzing": {
                    "enabled": True,
                    "extra-data-sources": {"responses": False},
                    "error-feedback": {"enabled": False},
                },
                "stateful": {"enabled": False},
            },
        }
    )


# The document the server serves (test_the_fuzzed_document_is_the_served_one checks they are the
# same bytes). It is loaded at collection rather than from the live URL in a fixture because
# schemathesis' lazy `from_fixture` fails on pytest 9.2 (it sets `Node._nodeid`, which 9.2 removed).
schema = schemathesis.openapi.from_dict(msgspec.json.decode(openapi.BODY), config=fuzz_config())


def pick(case: Case, choices: int) -> int:
    """A choice derived from the generated case, so a failing example replays the same way
    (``@schema.given`` cannot be combined with the document's examples)."""
    seen = repr((case.operation.label, case.path_parameters, case.query, case.headers, case.body))
    return zlib.crc32(seen.encode("utf-8", "surrogatepass")) % choices


def use_chat(case: Case, server: Server) -> None:
    """Aim most well-formed ids at chats that exist, or nearly every one names no chat (404): the
    fixture's chat, which ended, or the latest one fuzzing created, likely still running. Likewise
    files (a delete at the latest upload, never the fixture's) and batches."""
    params = case.path_parameters
    if params is not None and "model" in params and pick(case, 2):
        params["model"] = server.model  # or nearly every generated one names no model
    chat_id = params.get("id") if params is not None else None
    body = case.body if case.operation.label == "POST /v1/batches" and isinstance(case.body, dict) else {}
    if isinstance(body.get("input_file_id"), str) and pick(case, 3) < 2:  # a negative case's wrong type stays
        body["input_file_id"] = server.file_ids[0]
    if params is not None and isinstance(chat_id, str) and pick(case, 3) < 2:
        if FILE_ID.match(chat_id) and case.operation.method.upper() == "DELETE":
            if len(server.file_ids) > 1:
                params["id"] = server.file_ids.pop()
            return
        if FILE_ID.match(chat_id):
            params["id"] = server.file_ids[0]
            return
        if BATCH_ID.match(chat_id):
            params["id"] = server.batch_id
            return
    if params is None or not isinstance(chat_id, str):
        return
    prefix = "resp_" if RESPONSE_ID.match(chat_id) else ""  # a response's id is its chat's
    if not (prefix or CHAT_ID.match(chat_id)):
        return
    choice = pick(case, 3)
    if choice < 2:
        params["id"] = prefix + server.chat_ids[-1 if choice else 0]
    elif case.operation.label.endswith("/cancel"):
        params["id"] = prefix + server.cancelled


def record(server: Server, case: Case, status: int) -> None:
    server.statuses[(case.operation.label, status)] += 1


def test_the_fuzzed_document_is_the_served_one(server: Server) -> None:
    response = requests.get(f"{server.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.content == openapi.BODY
    schema.validate()


@schema.parametrize()
def test_with_a_visitor_token(case: Case, server: Server) -> None:
    use_chat(case, server)
    auth = {"Authorization": f"Bearer {server.token}"}
    # requests leaves out a query parameter whose value is None or an empty list: a case made
    # invalid by one (an extra parameter) reaches the server valid, and is no fault of the server's
    dropped = any(value is None or value == [] for value in (case.query or {}).values())
    judged = [c for c in CHECKS if c is not checks.negative_data_rejection] if dropped else CHECKS
    response = case.call_and_validate(base_url=server.url, headers=auth, checks=judged)
    record(server, case, response.status_code)
    if case.operation.label == "POST /v1/chats" and response.status_code == 202:
        server.chat_ids.append(response.json()["id"])
    if case.operation.label == "POST /v1/files" and response.status_code == 200:
        server.file_ids.append(response.json()["id"])


UNKNOWN_TOKEN = "sbv_0123456789abcdef_" + "A" * 43  # well-formed, never issued
CREDENTIALS = ("generated", "none", "malformed", "unknown", "other_user", "stream_token")


@schema.parametrize()
def test_without_a_good_token(case: Case, server: Server) -> None:
    """Whatever schemathesis generates, none, a malformed or unknown token, another user's, or the
    first chat's stream token: no chat opens but that one's stream, and never a 5xx."""
    credential = CREDENTIALS[pick(case, len(CREDENTIALS))]
    use_chat(case, server)
    headers: dict[str, Any] = dict(case.headers or {})
    if credential != "generated":
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        if case.query is not None:
            case.query.pop("token", None)
    if credential in {"malformed", "unknown", "other_user"}:
        token = {"malformed": "sbv_not-a-token", "unknown": UNKNOWN_TOKEN, "other_user": server.other_token}
        headers["Authorization"] = f"Bearer {token[credential]}"
    elif credential == "stream_token":
        case.query = {**(case.query or {}), "token": server.stream_token}
    case.headers = CaseInsensitiveDict(headers)
    # The checks that judge a request by what was generated would misjudge the credential set here.
    response = case.call_and_validate(base_url=server.url, checks=CONFORMANCE)
    record(server, case, response.status_code)

    label, chat_id = case.operation.label, (case.path_parameters or {}).get("id")
    opens = {
        "other_user": label
        in {
            "POST /v1/chats",
            "POST /v1/chat/completions",
            "POST /v1/responses",
            "GET /v1/models",
            "GET /v1/models/{model}",
            "POST /v1/files",
            "GET /v1/files",
            "GET /v1/batches",
        },
        "stream_token": label == "GET /v1/chats/{id}/events" and chat_id == server.chat_ids[0],
    }
    if label not in PUBLIC and not opens.get(credential, False):
        assert not 200 <= response.status_code < 300, f"{label} answered {response.status_code}"


def test_fuzzing_reached_every_operation(server: Server) -> None:
    """The fuzzing above is not vacuous: every operation answered 2xx at least once."""
    if not server.statuses:
        pytest.skip("runs after the fuzz tests in this module")
    succeeded = {label for (label, status) in server.statuses if 200 <= status < 300}
    operations = {
        f"{m.upper()} {p}" for p, item in openapi.DOCUMENT["paths"].items() for m in item if m != "parameters"
    }
    summary = ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(server.statuses.items()))
    print(f"fuzz answers: {summary}")
    assert operations <= succeeded, f"never a 2xx: {sorted(operations - succeeded)}"
    assert not [status for (_, status) in server.statuses if status >= 500]
