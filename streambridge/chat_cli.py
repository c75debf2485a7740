"""``streambridge chat "PROMPT"``: the answer, printed as it streams; exits 1 unless it completes."""

from __future__ import annotations

import sys

from shared.events import Cancelled, Complete, Content, Error, Failed, Started, Status
from streambridge.client import ClientError, StreambridgeClient


async def chat(prompt: str, *, url: str, model: str | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        async with StreambridgeClient(url) as client:
            await client.login_visitor()
            created = await client.create_chat(prompt, model=model)
            printed_attempt = 0
            async with client.stream(created) as stream:
                async for received in stream:
                    event = received.event
                    if isinstance(event, Started) and printed_attempt and event.attempt != printed_attempt:
                        print(f"\n[attempt {event.attempt}: the answer restarts]", file=err, flush=True)
                    elif isinstance(event, Content):
                        printed_attempt = event.attempt
                        out.write(event.content)
                        out.flush()
                    elif isinstance(event, Status | Error):
                        print(f"\n[{event.message}]", file=err, flush=True)
                    elif isinstance(event, Complete):
                        out.write("\n")
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
    except OSError as exc:
        print(f"streambridge chat: cannot reach {url}: {exc}", file=err)
        return 1
