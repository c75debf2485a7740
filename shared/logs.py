"""Logs: one JSON object per line for a collector, or text for a terminal, with the fields that let
one chat be followed across api, worker and edge.

Every record carries ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``message`` and ``role`` (the
process: api, edge, worker or up); then what the code running it bound with :func:`bind` (a
request's or a chat's task binds ``chat_id``, ``user``, ``trace_id``, ``attempt``), then the
record's own ``extra=`` fields (``event``, a short machine name like ``chat.admitted``, and its
details). Nothing else is added, and nothing is added per token.

Prompts, answers and credentials stay out of logs. The code logs neither; and every record is
scrubbed on its way out of what might hold a credential: a token in a URL's query (``?token=``),
a ``Bearer`` header, a password in a URL, a streambridge token (``sbk_…``, ``sbv_…``), and the
configured secrets' values. The scrubbing runs on the record's text (its message, its traceback,
each string or bytes field) before it is encoded, so no escape hides a credential from it. The
openai SDK's and its HTTP transport's records below INFO (a request's URL, options) are dropped by
a filter on the handler, whatever their loggers' levels (``OPENAI_LOG=debug`` sets the SDK's).
``STREAMBRIDGE_LOG_CONTENT=true`` adds the prompt and the answer to the lines that admit and end a
chat (and lets those DEBUG lines through); credentials are scrubbed still.

The event loop only queues a record (``QueueHandler``); a thread formats, scrubs and writes it, and
everything queued is written at exit. Text lines escape control characters (``\\n``, ``\\x1b``),
so what a client sent (a percent-decoded path) cannot forge a line.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
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
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

#: libraries whose records below INFO may describe a request (the openai SDK: its method and
#: retries; 1.x also logged its options, body included; httpcore: its URL)
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
    """Scrubs credentials from text (see the module's docstring): a record's message, its traceback
    and each of its string fields, before they are encoded (so an escape, a newline or a tab next to
    a credential changes nothing)."""

    _QUERY: Final = (
        r"token|access_token|access-token|api_key|api-key|apikey|x-api-key|key|secret|sig|signature"
        r"|password|passwd|pwd|auth"
    )
    # each pattern runs only where a cheap substring test says it may match
    _EQUALS: Final = re.compile(rf"([?&;](?:{_QUERY})=)[^&\s\"'\\#;]+", re.I)  # a URL's query: a token, a key
    _BEARER: Final = re.compile(r"(?<![A-Za-z0-9])(Bearer\s+)[^\s\"'\\,;]+", re.I)
    _PASSWORD: Final = re.compile(r"(://[^/\s:@]*:)[^/\s@]+@")  # a URL's password
    _TOKEN: Final = re.compile(r"(?<![A-Za-z0-9])(sb[kv]_[0-9a-f]{16}_)[A-Za-z0-9_-]+")  # a streambridge token

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # a short "secret" would blank common words: such a one is no secret anyway
        self._secrets = tuple(sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        if "=" in text:
            text = self._EQUALS.sub(r"\1[redacted]", text)
        if "earer" in text or "EARER" in text:
            text = self._BEARER.sub(r"\1[redacted]", text)
        if "://" in text:
            text = self._PASSWORD.sub(r"\1[redacted]@", text)
        if "sbk_" in text or "sbv_" in text:
            text = self._TOKEN.sub(r"\1[redacted]", text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text

    def value(self, value: Any) -> Any:
        """A field's value, scrubbed: strings (and bytes, as text) at any depth; what JSON has no
        type for becomes its ``str()`` first."""
        if isinstance(value, str):
            return self(value)
        if value is None or isinstance(value, int | float):
            return value
        if isinstance(value, bytes | bytearray | memoryview):
            return self(bytes(value).decode("utf-8", "backslashreplace"))
        if isinstance(value, Mapping):
            return {str(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v) for v in value]
        return self(str(value))


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
    bound_then = record.__dict__.get(_BOUND)  # what the task had bound when it logged (:class:`_Enqueue`)
    fields = dict(bound_then if bound_then is not None else _context.get())
    fields.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact
        self._encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        redact = self._redact
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "role": _role,
        }
        for key, value in _fields(record).items():
            if key not in line:
                line[key] = redact.value(value)
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return self._encoder.encode(line).decode()


#: what a terminal would act on: C0 and C1 controls (a newline would start a forged line), DEL,
#: and Unicode's line and paragraph separators
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE: Final = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


class TextFormatter(logging.Formatter):
    """The classic line, with the record's fields after it as ``key=value``. Control characters in
    the line are escaped (``\\n``, ``\\x1b``): a message (a percent-decoded path) cannot start a
    line of its own; a traceback follows on lines of its own, each indented."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = _fields(record)
        if fields:
            line += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        line = self._redact(line)
        if not line.isprintable():
            line = _CONTROL.sub(_escape_one, line)
        tail = []
        if record.exc_info:
            tail.append(self.formatException(record.exc_info))
        elif record.exc_text:
            tail.append(record.exc_text)
        if record.stack_info:
            tail.append(self.formatStack(record.stack_info))
        if tail:
            text = _CONTROL_BUT_NEWLINE.sub(_escape_one, self._redact("\n".join(tail)))
            line += "".join(f"\n    {row}" for row in text.splitlines())
        return line


#: the attribute on a queued record that holds what its task had bound (:func:`bind`)
_BOUND: Final = "_streambridge_bound"
_STANDARD = _STANDARD | {_BOUND}


class _Enqueue(logging.handlers.QueueHandler):
    """Hands a record to the writer thread (:class:`logging.handlers.QueueListener`): the event loop
    pays for a queue put, not for formatting, scrubbing and a write to a pipe. What must be read on
    the caller's side is read here: the message with its arguments, and the task's bound fields."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        record.__dict__[_BOUND] = _context.get()
        return record


#: loggers whose records below INFO may hold a request (its body, its URL): the openai SDK's, httpx's
_HELD: Final = ("openai", "httpx", "httpcore")


class _HoldContent(logging.Filter):
    """Drops the SDK's and its transport's records below INFO unless content may be logged: the
    loggers' own levels are not enough, as the SDK sets its own at import (``OPENAI_LOG=debug``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _content or record.levelno >= logging.INFO or not record.name.startswith(_HELD)


_queue: queue.Queue[logging.LogRecord] | None = None
_listener: logging.handlers.QueueListener | None = None


def flush() -> None:
    """Waits until every record logged so far is written."""
    if _queue is not None and _listener is not None:
        _queue.join()


def _stop_writing() -> None:
    """Writes what is queued, then stops the writer thread (at exit, and before a new configure)."""
    global _listener, _queue
    if _listener is not None:
        _listener.stop()  # its sentinel goes after every record queued: they are written first
    _listener = _queue = None


atexit.register(_stop_writing)  # before logging's own shutdown, which atexit runs later


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
    is text on a terminal and JSON otherwise (a file, a pipe, a container's log). A thread formats
    and writes them; at exit (or :func:`flush`) everything logged is written."""
    global _role, _content, _redactor, _queue, _listener
    _stop_writing()
    _role, _content = role, content
    stream = stream or sys.stderr
    if format == "auto":
        format = "text" if stream.isatty() else "json"
    redact = _redactor = Redactor(secrets)
    formatter = JsonFormatter(redact) if format == "json" else TextFormatter(redact)
    writer = logging.StreamHandler(stream)
    writer.setFormatter(formatter)
    _queue = queue.Queue()
    handler = _Enqueue(_queue)
    handler.setFormatter(formatter)  # unused by the queue; says what the log is (:func:`structured`)
    handler.addFilter(_HoldContent())
    _listener = logging.handlers.QueueListener(_queue, writer)
    _listener.start()
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a warning is a record too, not a line of its own on stderr
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    for name in _CONTENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if content else max(logging.INFO, root.level))
    # the configuration itself, for whoever turned DEBUG on to see what a process does
    logging.getLogger("streambridge").debug(
        "logging: %s at %s, content %s", format, level.upper(), "on" if content else "off"
    )
