"""``streambridge batch run|status|cancel|list``: OpenAI batches from the terminal.

``batch run FILE -o OUT`` takes OpenAI's batch JSONL, or plain text (one prompt a line, its
``custom_id`` ``line-N``), uploads it, follows the batch's progress (a live bar with ``rich`` on a
terminal: done / failed / rate / ETA), and writes one ``BatchRequestOutput`` line per input line
to OUT, in input order. Its state is kept beside OUT (``OUT.batch.json``: the server, the batch and
the input's SHA-256): interrupted (Ctrl-C, a lost connection, a closed lid) and run again with the
same arguments, it re-attaches to the same batch, which ran on meanwhile, and finishes it; nothing
finished runs again. It exits 0 once every line completed, 1 if any failed or the batch did not
complete (and 0 on Ctrl-C: the batch goes on server-side).

Who it runs as: ``--token`` (an API key), else a visitor whose token is kept per server in
``$XDG_STATE_HOME/streambridge/tokens.json``, which ``status``, ``cancel`` and ``list`` use too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import aiohttp

from streambridge.serve import catch_signals
from streambridge.sse import SSEParser

ENDPOINT: Final = "/v1/chat/completions"
ENDED: Final = frozenset({"completed", "failed", "expired", "cancelled"})
#: seconds between reconnections of the progress stream, at most
MAX_BACKOFF: Final = 5.0


def add_parser(commands: Any) -> None:
    batch = commands.add_parser("batch", help="OpenAI batches: run a file with live progress; status, cancel, list")
    sub = batch.add_subparsers(dest="batch_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
        parser.add_argument("--token", help="an API key or token (default: this server's kept visitor token)")
        return parser

    run = action("run", "run FILE (OpenAI batch JSONL, or one prompt a line); write the results to -o OUT")
    run.add_argument("file", type=Path)
    run.add_argument("-o", "--output", type=Path, required=True, help="where the results go, in input order")
    run.add_argument("--model", help="the model of plain-text prompts (default: the server's)")
    for name, help in (("status", "a batch's status and counts"), ("cancel", "cancel a batch")):
        action(name, help).add_argument("batch_id")
    action("list", "your batches, newest first")


async def main(args: argparse.Namespace) -> int:
    stop = catch_signals()
    work = asyncio.ensure_future(_dispatch(args))
    waiting: set[asyncio.Future[Any]] = {stop, work}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        if args.batch_command == "run":
            say("\ninterrupted; the batch goes on. Run the same command again to pick it up.")
        return 0
    return work.result()


async def _dispatch(args: argparse.Namespace) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as http:
        api = Api(http, args.url.rstrip("/"), args.token)
        try:
            if args.batch_command == "run":
                return await run(api, args.file, args.output, args.model)
            await api.authenticate()
            if args.batch_command == "status":
                show(await api.call("GET", f"/v1/batches/{args.batch_id}"))
            elif args.batch_command == "cancel":
                show(await api.call("POST", f"/v1/batches/{args.batch_id}/cancel"))
            else:
                for batch in (await api.call("GET", "/v1/batches?limit=100"))["data"]:
                    show(batch)
            return 0
        except (ApiFailure, aiohttp.ClientError, OSError) as exc:
            say(f"streambridge batch: {exc}")
            return 1


class ApiFailure(Exception):
    pass


class Api:
    def __init__(self, http: aiohttp.ClientSession, url: str, token: str | None) -> None:
        self.http, self.url, self.token = http, url, token

    async def authenticate(self) -> None:
        if self.token is None:
            self.token = (await asyncio.to_thread(known_tokens)).get(self.url)
        if self.token is None:
            self.token = (await self.call("POST", "/v1/auth/visitor"))["token"]
            await asyncio.to_thread(keep_token, self.url, self.token)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.http.request(method, self.url + path, headers=self.headers, **kwargs) as response:
            body = await response.read()
            if response.status >= 400:
                try:
                    message = json.loads(body)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = body[:200].decode(errors="replace")
                raise ApiFailure(f"{method} {path}: {response.status} {message}")
            return json.loads(body)


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "streambridge"


def known_tokens() -> dict[str, str]:
    with contextlib.suppress(OSError, ValueError):
        found = json.loads((state_dir() / "tokens.json").read_text())
        if isinstance(found, dict):
            return {str(k): str(v) for k, v in found.items()}
    return {}


def keep_token(url: str, token: str) -> None:
    write_private(state_dir() / "tokens.json", json.dumps({**known_tokens(), url: token}))


def write_private(path: Path, text: str) -> None:
    """Atomically, readable by the user alone (it may hold a token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


class Input:
    """The input as batch JSONL (OpenAI's, as given, or made from plain text), and its ids in order."""

    def __init__(self, path: Path, model: str | None) -> None:
        self.raw = path.read_bytes()
        self.digest = hashlib.sha256(self.raw + b"\0" + (model or "").encode()).hexdigest()
        lines = [x for x in self.raw.decode("utf-8", "replace").splitlines()]
        if looks_like_jsonl([x for x in lines if x.strip()]):
            # sent as given, a bad line too: the server's validation names it and fails the batch,
            # where taking the file for plain text would send every JSON line as a prompt
            self.jsonl = self.raw
            self.ids = [custom_id for x in lines if (custom_id := request_id(x)) is not None]
            return
        out, self.ids = [], []
        for n, prompt in enumerate(lines, 1):
            if not prompt.strip():
                continue
            body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
            if model:
                body["model"] = model
            self.ids.append(f"line-{n}")
            out.append(json.dumps({"custom_id": f"line-{n}", "method": "POST", "url": ENDPOINT, "body": body}))
        self.jsonl = ("\n".join(out) + "\n").encode()


def write_in_order(output: Path, ids: list[str], results: dict[str, bytes]) -> None:
    tmp = output.with_name(f".{output.name}.tmp")
    with tmp.open("wb") as out:
        for custom_id in ids:
            if custom_id in results:
                out.write(results[custom_id] + b"\n")
    os.replace(tmp, output)


def is_request(line: str) -> bool:
    return request_id(line) is not None


def request_id(line: str) -> str | None:
    """The line's custom_id if it is a batch request line."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if isinstance(value, dict) and "custom_id" in value and "body" in value:
        return str(value["custom_id"])
    return None


def looks_like_jsonl(lines: list[str]) -> bool:
    """OpenAI batch JSONL if its first line is a request or most of its lines are: one malformed
    line must not turn a JSONL file into plain-text prompts (one prompt per JSON line)."""
    if not lines:
        return False
    if is_request(lines[0]):
        return True
    return sum(map(is_request, lines)) * 2 > len(lines)


def validation_errors(batch: dict[str, Any]) -> list[str]:
    """The batch's ``errors.data`` (the server's refusal of bad input lines), one message each."""
    errors = batch.get("errors") or {}
    out = []
    for error in errors.get("data") or []:
        where = f"line {error['line']}: " if error.get("line") is not None else ""
        out.append(f"{where}{error.get('message') or error.get('code')}")
    return out


async def run(api: Api, path: Path, output: Path, model: str | None) -> int:
    data = await asyncio.to_thread(Input, path, model)  # the file may be large: off the event loop
    state_path = output.with_name(output.name + ".batch.json")
    batch = await reattach(api, state_path, data)
    if batch is None:
        await api.authenticate()
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", data.jsonl, filename=path.name + ".jsonl", content_type="application/jsonl")
        uploaded = await api.call("POST", "/v1/files", data=form)
        body = {"input_file_id": uploaded["id"], "endpoint": ENDPOINT, "completion_window": "24h"}
        batch = await api.call("POST", "/v1/batches", json=body)
        state = {"url": api.url, "batch_id": batch["id"], "input_sha256": data.digest, "token": api.token}
        await asyncio.to_thread(write_private, state_path, json.dumps(state))
        say(f"batch {batch['id']}: {len(data.ids)} prompts")
    started = time.monotonic()
    batch = await follow(api, batch)
    for message in validation_errors(batch):
        say(f"invalid input: {message}")
    results: dict[str, bytes] = {}
    async with api.http.get(f"{api.url}/v1/batches/{batch['id']}/results", headers=api.headers) as response:
        if response.status != 200:
            raise ApiFailure(f"GET results: {response.status}")
        tail = b""
        async for chunk in response.content.iter_any():  # lines may be longer than readline's limit
            *lines, tail = (tail + chunk).split(b"\n")
            for raw in lines:
                if raw.strip():
                    results[json.loads(raw)["custom_id"]] = raw
    await asyncio.to_thread(write_in_order, output, data.ids, results)
    counts = batch["request_counts"]
    missing = len(data.ids) - counts["completed"] - counts["failed"]
    say(
        f"batch {batch['id']} {batch['status']}: {counts['completed']} completed, {counts['failed']} failed"
        + (f", {missing} not run" if missing else "")
        + f" in {time.monotonic() - started:.1f} s; results in {output}"
    )
    await asyncio.to_thread(state_path.unlink, missing_ok=True)
    return 0 if batch["status"] == "completed" and counts["failed"] == 0 else 1


async def reattach(api: Api, state_path: Path, data: Input) -> dict[str, Any] | None:
    """The batch an interrupted run of the same command started, if it can still finish."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        state = json.loads(await asyncio.to_thread(state_path.read_text))
        if state["url"] == api.url and state["input_sha256"] == data.digest:
            api.token = api.token or state["token"]
            with contextlib.suppress(ApiFailure):
                batch: dict[str, Any] = await api.call("GET", f"/v1/batches/{state['batch_id']}")
                if batch["status"] not in {"failed", "cancelled", "expired"}:
                    say(f"re-attaching to batch {batch['id']} ({batch['status']})")
                    return batch
    return None


async def follow(api: Api, batch: dict[str, Any]) -> dict[str, Any]:
    """Shows the batch's progress until it ends, reconnecting after drops; its final state."""
    counts = batch["request_counts"]
    with Progress(counts["total"]) as bar:
        bar.update(counts["completed"], counts["failed"])
        last: str | None = None
        failures = 0
        while batch["status"] not in ENDED:
            try:
                last = await stream_progress(api, batch["id"], last, bar)
                failures = 0
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                failures += 1
                bar.note(f"progress stream lost ({exc or type(exc).__name__}); reconnecting")
                await asyncio.sleep(min(MAX_BACKOFF, 0.2 * 2**failures))
            with contextlib.suppress(ApiFailure, aiohttp.ClientError, OSError):
                batch = await api.call("GET", f"/v1/batches/{batch['id']}")
        bar.update(batch["request_counts"]["completed"], batch["request_counts"]["failed"])
    return batch


async def stream_progress(api: Api, batch_id: str, last: str | None, bar: Progress) -> str | None:
    headers = {**api.headers, **({"Last-Event-ID": last} if last else {})}
    parser = SSEParser()
    async with api.http.get(f"{api.url}/v1/batches/{batch_id}/events", headers=headers) as response:
        if response.status != 200:
            raise aiohttp.ClientError(f"events answered {response.status}")
        async for chunk in response.content.iter_any():
            for message in parser.feed(chunk):
                last = message.id
                event = json.loads(message.data)
                if message.event in {"item", "end"}:
                    bar.update(event["completed"], event["failed"])
                if message.event == "end":
                    return last
    return last


class Progress:
    """A ``rich`` bar on a terminal; a line now and then otherwise (or without rich)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = self.failed = 0
        self._said = 0.0
        self._shown = -1
        self._rich: Any = None
        if sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
                from rich.progress import Progress as RichProgress

                self._rich = RichProgress(
                    TextColumn("[bold]batch"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("[red]{task.fields[failed]} failed"),
                    TextColumn("{task.fields[rate]}/s"),
                    TimeRemainingColumn(),
                    transient=False,
                )
                self._task = self._rich.add_task("batch", total=total, failed=0, rate="0.0")
        self._start = time.monotonic()
        self._start_done = -1

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    def update(self, completed: int, failed: int) -> None:
        if self._start_done < 0:
            self._start_done = completed + failed
        self.done, self.failed = completed + failed, failed
        elapsed = time.monotonic() - self._start
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, failed=failed, rate=f"{rate:.1f}")
        elif self.done != self._shown and (time.monotonic() - self._said >= 2 or self.done == self.total):
            self._said, self._shown = time.monotonic(), self.done
            say(f"{self.done}/{self.total} done, {failed} failed, {rate:.1f}/s")

    def note(self, message: str) -> None:
        if self._rich is not None:
            self._rich.console.print(message)
        else:
            say(message)


def show(batch: dict[str, Any]) -> None:
    c = batch["request_counts"]
    print(f"{batch['id']}  {batch['status']:<11} {c['completed']}/{c['total']} completed, {c['failed']} failed")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
