"""Running aiohttp apps and long-lived tasks until SIGINT/SIGTERM, then shutting down cleanly."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from streambridge.shared import logs

log = logging.getLogger("streambridge")

BACKLOG: Final = 4096


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    header_timeout: float = 75.0,
    body_timeout: float = 10.0,
    grace: float = 10.0,
    access_log: bool = False,
) -> tuple[web.AppRunner, int]:
    """Serve ``app``; port 0 picks a free port, which is returned. ``access_log``: a line per request
    (:class:`AccessLogger`)."""
    # handler_cancellation: a client that disconnects cancels its handler at once, which
    # frees an SSE stream's subscription instead of waiting for the next heartbeat write.
    # aiohttp arms its keep-alive timer when a connection opens and after each response, and
    # disarms it only once a request's headers are complete: it is the header read timeout
    # that closes slowloris connections. After an answer sent before its request's body was read
    # (a 401, a 408), aiohttp reads on so the client sees the answer: only briefly, for a slow sender.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        access_log_class=AccessLogger,
        keepalive_timeout=header_timeout,
        lingering_time=min(2.0, body_timeout),
        # how long a stop waits for requests in flight (aiohttp's default: 60 s)
        shutdown_timeout=grace,
    )
    await runner.setup()
    # A listen queue for a reconnect storm: an edge that restarts sends thousands of clients
    # back at once, and past aiohttp's default of 128 the kernel drops their SYNs, each retried
    # only after a second or more. (The kernel caps it at net.core.somaxconn.)
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=BACKLOG)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, int(bound)


#: young-generation passes between two full collections (CPython's default: 10)
FULL_COLLECTION_EVERY: Final = 1000


def settle_gc() -> None:
    """Keeps the collector's full passes out of what lives as long as the process, and rare.

    A full pass walks every object the collector tracks, and holds the event loop meanwhile: on
    the 2-core bench machine, 0.3 s with 6,000 streams open on an edge, 0.6 s with 10,000, every
    stream's delivery waiting on it. CPython's default runs one whenever the long-lived objects
    have grown by a quarter since the last: every second or so while streams open, and under load.
    Young passes still collect short-lived cycles; an object that lives long and then dies in a
    cycle waits for the next full pass, minutes away under load. (Python 3.14's incremental
    collector makes the trade unneeded.)
    """
    gc.freeze()  # what start made (modules, the app): never garbage
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


#: how long a stop waits, past its grace, for the app's own cleanup (closing Redis pools)
CLEANUP_WAIT: Final = 3.0


async def stop_site(runner: web.AppRunner, grace: float) -> None:
    """Stops serving within ``grace + CLEANUP_WAIT`` seconds, whatever Redis does: a frozen Redis
    may hold a request or a pool's close, never the process."""
    try:
        async with asyncio.timeout(grace + CLEANUP_WAIT):
            await runner.cleanup()
    except TimeoutError:
        say(f"stopping took over {grace + CLEANUP_WAIT:.0f} s (Redis unresponsive?); exiting anyway")


class AccessLogger(AbstractAccessLogger):
    """A request's line: its path without the query (a stream URL's token rides there), the
    status, the time taken; the chat and user, where the handler bound them (``shared.logs``)."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %d %.3f s",
            request.method,
            request.path,
            response.status,
            time,
            extra={
                "event": "http.request",
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 1),
                "remote": request.remote,
            },
        )


def announce(what: str, host: str, port: int) -> None:
    """The line (on stdout) that says where a server listens; tools wait for it. A JSON log has it too."""
    print(f"{what} listening on http://{host}:{port}", flush=True)
    if logs.structured():
        log.info("%s listening on http://%s:%d", what, host, port, extra={"event": "process.listening"})


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
    """A notice for the operator, on stderr: a log record where the log is JSON, so every line parses."""
    if logs.structured():
        log.info(message)
    else:
        print(logs.scrub(message), file=sys.stderr, flush=True)
