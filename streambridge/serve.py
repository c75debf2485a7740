"""Running aiohttp apps and long-lived tasks until SIGINT/SIGTERM, then shutting down cleanly."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys

from aiohttp import web


async def start_site(
    app: web.Application, host: str, port: int, *, header_timeout: float = 75.0, body_timeout: float = 10.0
) -> tuple[web.AppRunner, int]:
    """Serve ``app``; port 0 picks a free port, which is returned."""
    # handler_cancellation: a client that disconnects cancels its handler at once, which
    # frees an SSE stream's subscription instead of waiting for the next heartbeat write.
    # aiohttp arms its keep-alive timer when a connection opens and after each response, and
    # disarms it only once a request's headers are complete: it is the header read timeout
    # that closes slowloris connections. After an answer sent before its request's body was read
    # (a 401, a 408), aiohttp reads on so the client sees the answer: only briefly, for a slow sender.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=header_timeout,
        lingering_time=min(2.0, body_timeout),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    # Everything made at start (modules, the app) lives as long as the process: keep it out of
    # the collector's full passes, which otherwise walk it all and pause every stream meanwhile.
    gc.freeze()
    return runner, int(bound)


def announce(what: str, host: str, port: int) -> None:
    print(f"{what} listening on http://{host}:{port}", flush=True)


def catch_signals() -> asyncio.Future[signal.Signals]:
    """Resolved by the first SIGINT/SIGTERM; installed before a process announces it is ready."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return received


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
