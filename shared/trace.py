"""W3C Trace Context (https://www.w3.org/TR/trace-context/): a chat's ``traceparent``, from the POST
that created it to the worker's call upstream.

The API reads the caller's ``traceparent`` (and ``tracestate``); a missing or malformed one is
replaced by a new trace, so every chat has a trace id to find it by. The chat records a child of
the caller's span (the API's), and each upstream call sends a child of that: the same trace id,
a new span id. A malformed ``traceparent`` is never passed on, and a ``tracestate`` only with the
valid ``traceparent`` it came with. Only the sampled flag is kept of the trace flags; several
``tracestate`` headers are one list; a ``tracestate`` with a malformed member is dropped whole.
"""

from __future__ import annotations

import re
import secrets
from typing import Final, NamedTuple

_TRACEPARENT: Final = re.compile(r"\A([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?\Z")
#: a ``tracestate`` list member: ``key=value`` (a simple key, or a multi-tenant ``tenant@system``)
_MEMBER: Final = re.compile(
    r"\A(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z"
)
#: at most this many list members (W3C); and a value this long at most, as streambridge passes it on
_MEMBERS: Final = 32
_TRACESTATE_CHARS: Final = 512
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
    # only the sampled flag is defined (and passed on): a bit not defined is never propagated
    flags = f"{int(flags, 16) & 0x01:02x}"
    return Trace(trace_id, span_id, flags, parse_tracestate(tracestate))


def parse_tracestate(tracestate: str | None) -> str | None:
    """A ``tracestate`` (its headers joined with ``,``) as it is passed on: its list members, or
    None when there are none, or when any is malformed, a key repeats, or there are more than 32
    (W3C: a malformed ``tracestate`` is dropped whole) or it is longer than 512 characters."""
    if tracestate is None:
        return None
    members = [m.strip(" \t") for m in tracestate.split(",")]
    members = [m for m in members if m]  # empty members are allowed, and mean nothing
    if not members or len(members) > _MEMBERS or any(_MEMBER.match(m) is None for m in members):
        return None
    if len({m.partition("=")[0] for m in members}) != len(members):
        return None
    state = ",".join(members)
    return state if len(state) <= _TRACESTATE_CHARS else None


def continue_or_start(traceparent: str | None, tracestate: str | None = None) -> Trace:
    """The span of a request that arrived with these headers: a child of the caller's span, or the
    root of a new trace when the caller sent none (or a malformed one)."""
    parent = parse(traceparent, tracestate)
    return parent.child() if parent is not None else new_trace()


def tracestate_of(values: list[str]) -> str | None:
    """The ``tracestate`` of a request that may carry several such headers: one list, in order."""
    return ",".join(values) if values else None


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
