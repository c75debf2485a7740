"""``streambridge chat "PROMPT"``: the answer, printed as it streams; exits 1 unless it completes.

On a terminal the text streams live (a restarted attempt is announced on stderr and its text
starts over); into a pipe or file only the final answer is written, so it holds just that.
The model's reasoning is not the answer: it goes to stderr (dimmed on a terminal, streamed live
when the answer is). Tool calls the model made are the answer: ``tool call: name(arguments)``.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from yarl import URL

from streambridge.client import ChatStream, ClientError, StreambridgeClient
from streambridge.serve import catch_signals
from streambridge.shared.events import Cancelled, Complete, Content, Error, Event, Failed, Reasoning, Started, Status

DIM, PLAIN = "\x1b[2m", "\x1b[0m"


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
        print(PLAIN if sys.stderr.isatty() else "", file=sys.stderr)  # a dimmed reasoning may be cut off
        return 0
    return streaming.result()


async def _stream(prompt: str, url: str, model: str | None, *, live: bool) -> int:
    screen = _Screen(live=live)
    err = sys.stderr
    try:
        async with StreambridgeClient(url) as client:
            await client.login_visitor()
            created = await client.create_chat(prompt, model=model)
            async with client.stream(created) as stream:
                async for received in stream:
                    event = received.event
                    screen.show(event)
                    if isinstance(event, Complete):
                        screen.complete(stream)
                        return 0
                    if isinstance(event, Failed):
                        print(f"\nfailed after {event.attempts} attempt(s): {event.message}", file=err)
                        return 1
                    if isinstance(event, Cancelled):
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


class _Screen:
    """Writes the events as they come (``live``), and the outcome at the end: the answer and tool
    calls on stdout, everything else (reasoning included) on stderr."""

    def __init__(self, *, live: bool) -> None:
        self.out, self.err, self.live = sys.stdout, sys.stderr, live
        self.dim, self.plain = (DIM, PLAIN) if self.err.isatty() else ("", "")
        self.shown = 0  # the attempt whose text is on screen
        self.thinking = False  # its reasoning is being written to stderr, a line end still owed

    def show(self, event: Event) -> None:
        if self.thinking and not isinstance(event, Reasoning):
            print(self.plain, file=self.err, flush=True)
            self.thinking = False
        if isinstance(event, Status | Error):
            print(f"\n[{event.message}]" if self.live else f"[{event.message}]", file=self.err, flush=True)
        if not self.live:
            return
        if isinstance(event, Started) and self.shown and event.attempt != self.shown:
            print(f"\n[attempt {event.attempt}: the answer restarts]", file=self.err, flush=True)
        elif isinstance(event, Reasoning):
            self.shown = event.attempt
            self.err.write(event.content if self.thinking else f"{self.dim}reasoning: {event.content}")
            self.err.flush()
            self.thinking = True
        elif isinstance(event, Content):
            self.shown = event.attempt
            self.out.write(event.content)
            self.out.flush()

    def complete(self, stream: ChatStream) -> None:
        if stream.reasoning and not self.live:
            print(f"{self.dim}reasoning: {stream.reasoning}{self.plain}", file=self.err, flush=True)
        if stream.text or not stream.tool_calls:
            self.out.write("\n" if self.live else stream.text + "\n")
        for call in stream.tool_calls:
            self.out.write(f"tool call: {call.function.name}({call.function.arguments})\n")
        self.out.flush()
