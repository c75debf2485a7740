"""W3C Trace Context (https://www.w3.org/TR/trace-context/): a chat's ``traceparent``, from the POST
that created it to the worker's call upstream.

The API reads the caller's ``traceparent`` (and ``tracestate``); a missing or malformed one is
replaced by a new trace, so every chat has a trace id to find it by. The chat records a child of
the caller's span (the API's), and each upstream call sends a child of that: the same trace id,
a new span id. A malformed ``traceparent`` is never passed on, and a ``tracestate`` only with the
valid ``traceparent`` it came with.
"""

from __future__ import annotations

import re
import secrets
from typing import Final, NamedTuple

_TRACEPARENT: Final = re.compile(r"\A([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?\Z")
_TRACESTATE: Final = re.compile(r"\A[\x20-\x7e]{0,512}\Z")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
#: the flags of a trace streambridge starts: sampled, so a tracing upstream records its side
SAMPLED: Final = "01"


class Trace(NamedTuple):
    trace_id: str
    span_id: str
    flags: str = SAMPLED
    state: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> Trace:
        """A span of this trace whose parent is this one: the same trace id, a new span id."""
        return Trace(self.trace_id, new_span_id(), self.flags, self.state)

    def headers(self) -> dict[str, str]:
        """The headers that carry this span to the next hop."""
        if self.state:
            return {"traceparent": self.traceparent, "tracestate": self.state}
        return {"traceparent": self.traceparent}


def new_span_id() -> str:
    return secrets.token_hex(8)


def new_trace() -> Trace:
    return Trace(secrets.token_hex(16), new_span_id())


def parse(traceparent: str | None, tracestate: str | None = None) -> Trace | None:
    """The span a ``traceparent`` names, or None if it is missing or malformed. A version above 00
    may carry more fields, which are dropped (what it says in version 00's fields is kept)."""
    if traceparent is None:
        return None
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    state = tracestate.strip() if tracestate is not None else None
    if not state or _TRACESTATE.match(state) is None:
        state = None
    return Trace(trace_id, span_id, flags, state)


def continue_or_start(traceparent: str | None, tracestate: str | None = None) -> Trace:
    """The span of a request that arrived with these headers: a child of the caller's span, or the
    root of a new trace when the caller sent none (or a malformed one)."""
    parent = parse(traceparent, tracestate)
    return parent.child() if parent is not None else new_trace()


def decode(stored: bytes | str | None) -> Trace | None:
    """A span as a chat's record keeps it (:func:`encode`)."""
    if stored is None:
        return None
    text = stored.decode() if isinstance(stored, bytes) else stored
    traceparent, _, tracestate = text.partition(" ")
    return parse(traceparent, tracestate or None)


def encode(trace: Trace) -> str:
    """``traceparent`` and, if any, ``tracestate``, separated by a space (neither holds one at its ends)."""
    return f"{trace.traceparent} {trace.state}" if trace.state else trace.traceparent
