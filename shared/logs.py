"""Logs: one JSON object per line for a collector, or text for a terminal, with the fields that let
one chat be followed across api, worker and edge.

Every record carries ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``message`` and ``role`` (the
process: api, edge, worker or up); then what the code running it bound with :func:`bind` (a
request's or a chat's task binds ``chat_id``, ``user``, ``trace_id``, ``attempt``), then the
record's own ``extra=`` fields (``event``, a short machine name like ``chat.admitted``, and its
details). Nothing else is added, and nothing is added per token.

Prompts, answers and credentials stay out of logs. The code logs neither; and every line is
scrubbed on its way out of what might hold a credential: a token in a URL's query (``?token=``),
a ``Bearer`` header, a password in a URL, a streambridge token (``sbk_…``, ``sbv_…``), and the
configured secrets' values. Libraries that log request bodies at DEBUG (the openai SDK) are held
at INFO. ``STREAMBRIDGE_LOG_CONTENT=true`` adds the prompt and the answer to the lines that
admit and end a chat (and lets the SDK's DEBUG lines through); credentials are scrubbed still.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, TextIO

import msgspec

#: the process's role, in every record
_role = "-"
_content = False
_context: ContextVar[Mapping[str, Any]] = ContextVar("streambridge_log_context", default=MappingProxyType({}))

#: what every ``LogRecord`` has: anything else on a record came from ``extra=``
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

#: libraries that log request bodies below INFO (the openai SDK: every request's options)
_CONTENT_LOGGERS: Final = ("openai", "httpcore")
#: libraries too chatty below WARNING for a service's log (httpx: a line per request)
_NOISY: Final = ("arq", "httpx", "httpx2")

FORMATS: Final = ("auto", "json", "text")


def bind(**fields: Any) -> None:
    """Adds fields to every record logged from here on in this task (and the tasks it starts);
    a field bound to None is dropped."""
    merged = {**_context.get(), **fields}
    _context.set(MappingProxyType({k: v for k, v in merged.items() if v is not None}))


def bound() -> Mapping[str, Any]:
    return _context.get()


def content_logged() -> bool:
    """Whether prompts and answers may be logged (``STREAMBRIDGE_LOG_CONTENT``)."""
    return _content


def structured() -> bool:
    """Whether the root logger writes JSON (so a process's own notices should be records too)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


class Redactor:
    """Scrubs credentials from a formatted line (see the module's docstring)."""

    _QUERY: Final = (
        r"token|access_token|access-token|api_key|api-key|apikey|x-api-key|key|secret|sig|signature"
        r"|password|passwd|pwd|auth"
    )
    _PATTERNS: Final = (
        # a credential in a URL's query: a stream URL's token, an api_key, a signature
        (re.compile(rf"([?&;](?:{_QUERY})=)[^&\s\"'\\#;]+", re.I), r"\1[redacted]"),
        (re.compile(r"(\bBearer\s+)[^\s\"'\\,;]+", re.I), r"\1[redacted]"),
        (re.compile(r"(://[^/\s:@\"'\\]*:)[^/\s@\"'\\]+@"), r"\1[redacted]@"),  # a URL's password
        (re.compile(r"\b(sb[kv]_[0-9a-f]{16}_)[A-Za-z0-9_-]+"), r"\1[redacted]"),  # a streambridge token
    )

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # a short "secret" would blank common words: such a one is no secret anyway
        values = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, values))) if values else None

    def __call__(self, line: str) -> str:
        for pattern, replacement in self._PATTERNS:
            line = pattern.sub(replacement, line)
        if self._secrets is not None:
            line = self._secrets.sub("[redacted]", line)
        return line


def display_url(url: str) -> str:
    """``url`` as a notice or an error may show it: without its userinfo (a password) and its query
    (an ``api-key=``), even when it is malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    rest = rest.rpartition("@")[2]  # a password may hold any character but the last '@'
    rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    return f"{scheme}{sep}{rest}"


#: the configured process's scrubber (:func:`configure`), for what is printed rather than logged
_redactor: Redactor | None = None


def scrub(text: str) -> str:
    """``text`` with credentials scrubbed as every log line is: for a notice printed, not logged."""
    return (_redactor or Redactor())(text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(_context.get())
    fields.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact
        self._encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "role": _role,
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return self._redact(self._encoder.encode(line).decode())


class TextFormatter(logging.Formatter):
    """The classic line, with the record's fields after it as ``key=value``."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            first, newline, rest = line.partition("\n")  # after the message, before a traceback
            line = f"{first} [{extra}]{newline}{rest}"
        return self._redact(line)


def configure(
    *,
    role: str,
    level: str = "INFO",
    format: str = "auto",
    content: bool = False,
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
) -> None:
    """Sends every record at ``level`` and above to ``stream`` (stderr), as JSON or text; ``auto``
    is text on a terminal and JSON otherwise (a file, a pipe, a container's log)."""
    global _role, _content, _redactor
    _role, _content = role, content
    stream = stream or sys.stderr
    if format == "auto":
        format = "text" if stream.isatty() else "json"
    redact = _redactor = Redactor(secrets)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redact) if format == "json" else TextFormatter(redact))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    for name in _CONTENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if content else max(logging.INFO, root.level))
