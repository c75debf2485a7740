"""``streambridge chat "PROMPT"``: the answer, printed as it streams; exits 1 unless it completes.

On a terminal the text streams live (a restarted attempt is announced on stderr and its text
starts over); into a pipe or file only the final answer is written, so it holds just that.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from yarl import URL

from streambridge.client import ClientError, StreambridgeClient
from streambridge.serve import catch_signals
from streambridge.shared.events import Cancelled, Complete, Content, Error, Failed, Started, Status


async def chat(prompt: str, *, url: str, model: str | None = None) -> int:
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        print(f"streambridge chat: --url {url!r} is not an http(s) URL", file=sys.stderr)
        return 2
    stop = catch_signals()
    streaming = asyncio.ensure_future(_stream(prompt, url, model, live=sys.stdout.isatty()))
    waiting: set[asyncio.Future[object]] = {stop, streaming}  # type: ignore[arg-type]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if not streaming.done():  # SIGINT/SIGTERM: leave quietly; the chat goes on server-side
        streaming.cancel()
        await asyncio.gather(streaming, return_exceptions=True)
        print(file=sys.stderr)
        return 0
    return streaming.result()


async def _stream(prompt: str, url: str, model: str | None, *, live: bool) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        async with StreambridgeClient(url) as client:
            await client.login_visitor()
            created = await client.create_chat(prompt, model=model)
            shown = 0  # the attempt whose text is on screen
            async with client.stream(created) as stream:
                async for received in stream:
                    event = received.event
                    if isinstance(event, Started) and shown and event.attempt != shown and live:
                        print(f"\n[attempt {event.attempt}: the answer restarts]", file=err, flush=True)
                    elif isinstance(event, Content) and live:
                        shown = event.attempt
                        out.write(event.content)
                        out.flush()
                    elif isinstance(event, Status | Error):
                        print(f"\n[{event.message}]" if live else f"[{event.message}]", file=err, flush=True)
                    elif isinstance(event, Complete):
                        out.write("\n" if live else stream.text + "\n")
                        return 0
                    elif isinstance(event, Failed):
                        print(f"\nfailed after {event.attempts} attempt(s): {event.message}", file=err)
                        return 1
                    elif isinstance(event, Cancelled):
                        print("\ncancelled", file=err)
                        return 1
        print("\nthe stream ended without a final event", file=err)
        return 1
    except ClientError as exc:
        print(f"streambridge chat: {exc}", file=err)
        return 1
    except (OSError, aiohttp.ClientError) as exc:
        print(f"streambridge chat: cannot reach {url}: {exc}", file=err)
        return 1
