"""``streambridge``: one CLI for every process (see the contract's table of commands)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import msgspec

from streambridge import batch_cli, keys_cli, status_cli
from streambridge.shared import logs
from streambridge.shared.errors import SettingsError, StreambridgeError
from streambridge.shared.settings import Settings, load_settings

log = logging.getLogger("streambridge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streambridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def server(name: str, help: str, port: int) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
        sub.add_argument("--port", type=tcp_port, default=port, help=f"port (default {port}; 0 picks a free one)")
        return sub

    server("up", "the whole system: API + edge on one port, a worker, embedded Redis and LLM if unset", 8000)
    server("api", "the API only (auth, create, read, cancel)", 8000)
    server("edge", "the SSE edge only (tails chat streams)", 8001)
    worker = commands.add_parser("worker", help="an arq worker that runs chats")
    worker.add_argument("--concurrency", type=int, help="chats run at once (default STREAMBRIDGE_WORKER_CONCURRENCY)")
    worker.add_argument(
        "--metrics-host", help="interface for /metrics and /readyz (default STREAMBRIDGE_WORKER_METRICS_HOST)"
    )
    worker.add_argument(
        "--metrics-port",
        type=tcp_port,
        help="port for /metrics and /readyz (default STREAMBRIDGE_WORKER_METRICS_PORT: 8002; 0 picks a free one)",
    )
    fake = server("fake-llm", "the simulated OpenAI-compatible LLM", 8100)
    fake.add_argument("--ttft-ms", type=float, help="delay before the first token")
    fake.add_argument("--delay-ms", type=float, help="delay between chunks")
    fake.add_argument("--words", type=int, help="answer length in words")
    fake.add_argument("--fail", help="500 | 429 | drop:K | stall | stall:K")
    keys_cli.add_parser(commands)
    batch_cli.add_parser(commands)
    status_cli.add_parser(commands)
    chat = commands.add_parser("chat", help="stream an answer in the terminal, resuming after drops")
    chat.add_argument("prompt")
    chat.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    chat.add_argument("--model", help="model name (default: the server's)")
    return parser


def tcp_port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (0-65535)")
    return int(value)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = run(args)
    except SettingsError as exc:
        fail(str(exc))
        code = 2
    except StreambridgeError as exc:
        fail(str(exc))
        code = 1
    except ModuleNotFoundError as exc:  # a client-only install asked to run a server
        fail(
            f"{args.command} needs the server parts ({exc.name} is missing): pip install 'streambridge[server]'",
        )
        code = 1
    except _start_errors() as exc:  # e.g. Redis unreachable at start: one line, not a traceback
        fail(f"cannot start: {type(exc).__name__}: {exc}")
        code = 1
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


def fail(message: str) -> None:
    """Why the command stops: a JSON record where the log is JSON (every line on stderr parses),
    else the one plain line ``streambridge: …``; scrubbed either way."""
    if logs.structured():
        log.error("%s", message, extra={"event": "process.failed"})
        logs.flush()
    else:
        print(f"streambridge: {logs.scrub(message)}", file=sys.stderr)


def _start_errors() -> tuple[type[Exception], ...]:
    try:
        from redis.exceptions import RedisError
    except ImportError:
        return (OSError,)
    return (RedisError, OSError)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(
        os.environ,
        worker_concurrency=getattr(args, "concurrency", None),
        worker_metrics_host=getattr(args, "metrics_host", None),
        worker_metrics_port=getattr(args, "metrics_port", None),
    )
    if args.command == "chat":
        from streambridge.chat_cli import chat

        return _run_loop(chat(args.prompt, url=args.url, model=args.model))
    if args.command == "fake-llm":
        from streambridge import processes

        return _run_loop(processes.fake_llm(args))
    if args.command == "batch":
        return _run_loop(batch_cli.main(args))
    if args.command == "keys":
        return _run_loop(keys_cli.run(args, require_redis(settings, "keys")))
    if args.command == "status":
        from streambridge import status_view

        return _run_loop(status_view.main(args, require_redis(settings, "status")))
    if args.command != "up":  # a bad setting is the one plain line, before the log is configured
        settings = require_redis(settings, args.command)
    _configure_logging(settings, args.command)
    from streambridge import processes

    if args.command == "up":
        return _run_loop(processes.up(settings, args.host, args.port))
    if args.command == "api":
        return _run_loop(processes.serve(settings, args.host, args.port, api=True, edge=False))
    if args.command == "edge":
        return _run_loop(processes.serve(settings, args.host, args.port, api=False, edge=True))
    if args.command == "worker":
        return _run_loop(processes.worker(settings))
    raise AssertionError(args.command)


def require_redis(settings: Settings, command: str) -> Settings:
    if settings.redis_url is None:
        raise SettingsError(f"STREAMBRIDGE_REDIS_URL: required by `streambridge {command}` (only `up` embeds Redis)")
    return settings


def replace(settings: Settings, **changes: object) -> Settings:
    return msgspec.structs.replace(settings, **changes)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


def _configure_logging(settings: Settings, command: str) -> None:
    logs.configure(
        role=command,
        level=settings.log_level,
        format=settings.log_format,
        content=settings.log_content,
        secrets=(settings.secret, settings.llm_api_key),
    )
