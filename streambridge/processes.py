"""What each server command runs, from ``up`` (everything) to a single API, edge or worker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from aiohttp import web

from streambridge.api import ops
from streambridge.api.app import make_app
from streambridge.api.presence import ServerDescriber
from streambridge.embedded import RedisServer
from streambridge.fake_llm import FakeLLMConfig, check_config
from streambridge.fake_llm import make_app as make_fake_llm
from streambridge.serve import announce, catch_signals, say, settle_gc, start_site, stop_site
from streambridge.shared import logs, metrics
from streambridge.shared.errors import SettingsError
from streambridge.shared.presence import Heartbeat, announced
from streambridge.shared.settings import WORKER_METRICS_PORT, Settings
from streambridge.workers import ops as worker_ops
from streambridge.workers.ops import WORKER, make_worker_app
from streambridge.workers.presence import WorkerDescriber
from streambridge.workers.worker import make_worker, stop_worker

log = logging.getLogger("streambridge")


async def up(settings: Settings, host: str, port: int) -> int:
    """API + edge on one port, one worker, and an embedded Redis and LLM where none is configured.
    The worker's metrics are on that port's ``/metrics`` too: one process, one registry."""
    stop = catch_signals()
    configure_metrics(settings)
    async with contextlib.AsyncExitStack() as stack:
        if settings.redis_url is None:
            redis = RedisServer()
            await redis.start()
            stack.push_async_callback(_stop_redis, redis)
            settings = msgspec.structs.replace(settings, redis_url=redis.url)
            say(f"embedded Redis: {redis.binary} on {redis.url} (in memory; set STREAMBRIDGE_REDIS_URL to use yours)")
        llm_url = await _llm_url(settings, stack)
        settings = msgspec.structs.replace(settings, llm_base_url=llm_url)  # for /v1/models too
        runner, bound = await start_site(
            make_app(settings),
            host,
            port,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            grace=settings.shutdown_grace,
            access_log=settings.access_log,
        )
        worker = make_worker(settings, llm_url, lane=True)
        assert settings.redis_url is not None
        server = ServerDescriber(runner.app, bound, api=True, edge=True, stop=stop)
        heartbeats = await stack.enter_async_context(announced(settings.redis_url, server, WorkerDescriber(worker)))
        # stopped together, so the process exits within one grace, not the sum of two
        stops: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        stops.append(("api + edge", lambda: _drain_then_stop(runner, settings)))
        stack.push_async_callback(_stop_together, stops)
        settle_gc()
        worker_task = asyncio.create_task(worker.main(), name="worker")
        stops.append(("worker", lambda: stop_worker(worker, worker_task, settings.shutdown_grace)))
        say(f"worker: concurrency {settings.worker_concurrency}, LLM at {logs.display_url(llm_url)}")
        announce("streambridge (api + edge)", host, bound)
        say(f'try:  streambridge chat "hello" --url http://{host}:{bound}')
        await _until_signal_or(stop, worker_task)
        _nudge(heartbeats)  # "stopping" shows while the stop runs, not a beat later
    return 0


async def serve(settings: Settings, host: str, port: int, *, api: bool, edge: bool) -> int:
    stop = catch_signals()
    configure_metrics(settings)
    runner, bound = await start_site(
        make_app(settings, serve_api=api, serve_edge=edge),
        host,
        port,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        grace=settings.shutdown_grace,
        access_log=settings.access_log,
    )
    settle_gc()
    name = "streambridge api" if api else "streambridge edge"
    if api and not edge and settings.public_edge_url is None:
        log.warning("STREAMBRIDGE_PUBLIC_EDGE_URL is unset: stream_url will point at this API, which has no edge")
    assert settings.redis_url is not None
    describer = ServerDescriber(runner.app, bound, api=api, edge=edge, stop=stop)
    async with announced(settings.redis_url, describer) as heartbeats:
        announce(name, host, bound)
        try:
            await stop
            _nudge(heartbeats)  # "stopping" shows while the stop runs, not a beat later
        finally:
            await _quietly(name, lambda: _drain_then_stop(runner, settings))
    return 0


async def _drain_then_stop(runner: web.AppRunner, settings: Settings) -> None:
    """Says not ready (``/readyz`` 503) while still serving for ``shutdown_drain`` s, so a load
    balancer takes the process out before its port closes, then stops the site. The drain is taken
    out of the grace: the process stops within the same bound as without it.

    aiohttp's own shutdown closes the listening socket before the app hears of it, so without this
    no probe ever sees the 503: only a refused connection."""
    runner.app[ops.READINESS].serving = False
    drain = min(settings.shutdown_drain, settings.shutdown_grace)
    if drain > 0:
        await asyncio.sleep(drain)
    await stop_site(runner, settings.shutdown_grace - drain)


async def worker(settings: Settings) -> int:
    stop = catch_signals()
    configure_metrics(settings)
    async with contextlib.AsyncExitStack() as stack:
        llm_url = await _llm_url(settings, stack)
        arq_worker = make_worker(settings, llm_url, lane=True)
        assert settings.redis_url is not None
        await stack.enter_async_context(announced(settings.redis_url, WorkerDescriber(arq_worker)))
        # The port first: a port that cannot be bound stops the process before it takes any chat.
        host = settings.worker_metrics_host
        app = make_worker_app(arq_worker)
        runner, bound = await _worker_metrics_site(app, host, settings.worker_metrics_port)
        stack.push_async_callback(runner.cleanup)  # closed after the worker stopped: /readyz says so meanwhile
        settle_gc()
        task = asyncio.create_task(arq_worker.main(), name="worker")
        worker_ops.started(app, task)
        stack.push_async_callback(_stop_task, task)
        stack.push_async_callback(_quietly, "worker", lambda: stop_worker(arq_worker, task, settings.shutdown_grace))
        announce("streambridge worker metrics", host, bound)
        # "started" once its startup is done (its heartbeat, reaper and batch lane run): a tool that
        # waits for the line may count on them. A signal or a failed startup comes first, or never.
        if await _first_of(arq_worker.ready.wait(), stop, task):
            shown = logs.display_url(llm_url)
            started = f"streambridge worker started: concurrency {settings.worker_concurrency}, LLM at {shown}"
            print(logs.scrub(started), flush=True)  # on stdout, where tools wait for it; a JSON log has it too
            if logs.structured():
                log.info(started, extra={"event": "process.started"})
        await _until_signal_or(stop, task)
    return 0


async def _worker_metrics_site(app: web.Application, host: str, port: int | None) -> tuple[web.AppRunner, int]:
    """The worker's metrics site on ``port``; unset, on :data:`WORKER_METRICS_PORT`, or on a free port
    when another process (a second worker on this host) has that one: a warning says so, and the
    announced line where it is. A port set explicitly that is taken stops the worker."""
    try:
        return await start_site(app, host, WORKER_METRICS_PORT if port is None else port)
    except OSError as exc:
        if port is not None or exc.errno != errno.EADDRINUSE:
            raise
    log.warning(
        "worker metrics: port %d is taken (another worker on this host?); using a free one instead "
        "(set STREAMBRIDGE_WORKER_METRICS_PORT or --metrics-port to choose)",
        WORKER_METRICS_PORT,
    )
    return await start_site(make_worker_app(app[WORKER]), host, 0)


async def fake_llm(args: argparse.Namespace) -> int:
    stop = catch_signals()
    overrides = {
        "ttft_ms": args.ttft_ms,
        "delay_ms": args.delay_ms,
        "words": args.words,
        "fail": args.fail,
    }
    config = msgspec.structs.replace(FakeLLMConfig(), **{k: v for k, v in overrides.items() if v is not None})
    try:
        check_config(config)
    except ValueError as exc:
        raise SettingsError(f"fake-llm: {exc}") from None
    runner, bound = await start_site(make_fake_llm(config), args.host, args.port)
    announce("streambridge fake-llm", args.host, bound)
    try:
        await stop
    finally:
        await runner.cleanup()
    return 0


def configure_metrics(settings: Settings) -> None:
    if not settings.metrics:
        metrics.disable()


async def _llm_url(settings: Settings, stack: contextlib.AsyncExitStack) -> str:
    if settings.llm_base_url is not None:
        return settings.llm_base_url
    runner, bound = await start_site(make_fake_llm(FakeLLMConfig()), "127.0.0.1", 0)
    stack.push_async_callback(runner.cleanup)
    url = f"http://127.0.0.1:{bound}/v1"
    say(f"simulated LLM: {url} (set STREAMBRIDGE_LLM_BASE_URL for a real one)")
    return url


async def _first_of(ready: Coroutine[Any, Any, object], *others: asyncio.Future[Any]) -> bool:
    """Whether ``ready`` finished before any of ``others``."""
    waiting = asyncio.ensure_future(ready)
    try:
        await asyncio.wait([waiting, *others], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    return waiting.done() and not waiting.cancelled()


async def _until_signal_or(stop: asyncio.Future[signal.Signals], task: asyncio.Task[None]) -> None:
    waiting: set[asyncio.Future[object]] = {stop, task}  # type: ignore[arg-type]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # a worker that died on its own is an error, not a clean exit


def _nudge(heartbeats: list[Heartbeat]) -> None:
    for heartbeat in heartbeats:
        heartbeat.nudge()


async def _stop_together(stops: list[tuple[str, Callable[[], Awaitable[object]]]]) -> None:
    await asyncio.gather(*(_quietly(name, stop) for name, stop in stops))


async def _quietly(name: str, cleanup: Callable[[], Awaitable[object]]) -> None:
    """A cleanup step that fails (Redis gone, say) is logged; the process still exits cleanly."""
    try:
        await cleanup()
    except Exception as exc:
        log.warning("shutting down %s: %s", name, exc)


async def _stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _stop_redis(server: RedisServer) -> None:
    await server.stop()
    server.cleanup()


__all__ = ["fake_llm", "serve", "up", "worker"]
