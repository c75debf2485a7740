"""Settings, read once from the environment into a typed, frozen Struct.

Every field ``name`` is the variable ``STREAMBRIDGE_NAME``. A malformed value or an
unknown ``STREAMBRIDGE_*`` variable raises :class:`SettingsError` with one line naming
the variable; the CLI prints that line and exits 2.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import msgspec

from streambridge.shared.chats import VENDOR_FIELD
from streambridge.shared.errors import SettingsError
from streambridge.shared.logs import display_url

ENV_PREFIX: Final = "STREAMBRIDGE_"
#: the scheme of a Redis Cluster's seed nodes in ``STREAMBRIDGE_STREAMS_REDIS_URL``
CLUSTER_SCHEME: Final = "redis-cluster"
#: a worker's metrics port when none is set
WORKER_METRICS_PORT: Final = 8002

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    redis_url: str | None = None
    #: where a chat's own keys live (``redis-cluster://host:port[,host:port…]`` or a plain URL);
    #: unset: on ``redis_url``'s Redis
    streams_redis_url: str | None = None
    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_model: str = "gpt-4o-mini"
    public_edge_url: str | None = None
    secret: str | None = None

    worker_concurrency: Positive = 50
    #: a ``progress`` event every N content chunks
    progress_every: Positive = 10
    max_attempts: Positive = 3
    retry_base_delay: Seconds = 0.5
    #: a running chat's lease; a dead worker's chat runs again about this long after it died
    lease_ttl: Annotated[float, msgspec.Meta(ge=0.3, le=60)] = 1.5
    #: on SIGTERM, how long a worker lets running chats finish before handing them back
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    #: on SIGTERM, how long an api or edge answers /readyz 503 while still serving, so a load
    #: balancer stops sending it requests before its port closes; taken out of the grace, not added
    shutdown_drain: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    #: every chat ends (``failed`` at worst) this many seconds after it was accepted
    chat_deadline: Seconds = 900.0
    first_token_timeout: Seconds = 60.0
    idle_timeout: Seconds = 60.0
    #: how long a chat's stream is kept once the chat has ended
    stream_ttl: Positive = 3600
    #: how long (ms) a worker holds a chat's lone event for others to share its append's round trip;
    #: 0: at once (an event that arrives while an append is in flight waits for it regardless)
    append_coalesce_ms: Annotated[float, msgspec.Meta(ge=0, le=50)] = 0.0
    #: length cap of a running stream (approximate, as with XADD MAXLEN ~)
    stream_maxlen: Positive = 100_000
    #: how long ``GET /v1/chats/{id}`` answers after the chat ended
    result_ttl: Positive = 7 * 86400
    visitor_token_ttl: Positive = 7 * 86400
    stream_token_ttl: Positive = 3600
    heartbeat_interval: Annotated[float, msgspec.Meta(gt=0, le=15)] = 15.0
    max_body_bytes: Positive = 1024 * 1024
    #: a chat's prompt: at most this many messages and characters in all
    max_messages: Positive = 200
    max_prompt_chars: Positive = 200_000
    #: the largest ``max_tokens`` a chat may ask for
    max_tokens_cap: Positive = 8192
    #: fields beyond OpenAI's own that a request may pass to the upstream (vLLM's ``top_k``, OpenAI's
    #: ``service_tier``, …): comma-separated names, ``*`` any well-formed name, empty none; visitors apart
    vendor_fields: str = "*"
    visitor_vendor_fields: str = ""
    #: per-user limits for API keys, counted in Redis across every process; each can be
    #: overridden per key (``streambridge keys create --user NAME --chats-per-minute 600``)
    chats_per_minute: Positive = 60
    #: chats queued or running at once
    max_running_chats: Positive = 20
    #: SSE streams open at once, across every edge
    max_open_streams: Positive = 100
    #: the same limits for visitors (anonymous users): tighter by default
    visitor_chats_per_minute: Positive = 10
    visitor_max_running_chats: Positive = 3
    visitor_max_open_streams: Positive = 10
    #: visitor logins (``POST /v1/auth/visitor``) one client address may make per minute
    visitor_logins_per_minute: Positive = 20
    #: SSE streams open at once from one client IP address, across every edge
    max_open_streams_per_ip: Positive = 500
    #: proxies (addresses or CIDR networks, comma-separated) whose X-Forwarded-For names the client;
    #: the per-address limits then count the client's address, not the proxy's. Empty: trust none
    trusted_proxies: str = ""
    #: admission control: while this many chats wait for a worker, new ones get 503 at once
    max_queue_depth: Positive = 10_000
    #: a connection must send a request's headers within this many seconds (also the keep-alive idle limit)
    header_timeout: Seconds = 10.0
    #: ... and the request's body within this many seconds (else 408)
    body_timeout: Seconds = 10.0
    #: an SSE response ends after this long in all, or this long without an event; clients resume
    stream_max_lifetime: Seconds = 3600.0
    stream_idle_timeout: Seconds = 600.0
    #: a stream whose client reads nothing for this long (a write cannot complete) is dropped
    stream_write_timeout: Seconds = 30.0
    #: Redis sockets per API/edge process, however many clients (one is the edge's Pub/Sub)
    redis_max_connections: Annotated[int, msgspec.Meta(ge=2)] = 4
    #: batches (the Files and Batches API): OpenAI's limits on an input file
    batch_max_lines: Positive = 50_000
    max_file_bytes: Positive = 200 * 1024 * 1024
    #: how long the "24h" completion window lasts; unfinished lines then fail as ``batch_expired``
    batch_completion_window: Seconds = 86_400.0
    #: items of one batch running at once, across every worker
    batch_max_running_items: Positive = 200
    #: items of one user's batches running at once, across every worker (an API key may have its own)
    batch_user_max_running_items: Positive = 400
    #: batch items one worker runs at once, at most (an upstream's 429s lower it for a while)
    batch_worker_concurrency: Positive = 50
    #: a worker's chat slots batch items never take: they stay free for interactive chats
    batch_reserved_slots: Annotated[int, msgspec.Meta(ge=0)] = 5
    #: one attempt of a batch item gives up after this long
    batch_item_timeout: Seconds = 600.0
    #: how long files, and batches once ended, are kept
    file_ttl: Positive = 30 * 86400
    #: bytes of uploaded files one user may keep stored at once (an API key may have its own,
    #: ``--file-bytes``): files live ``file_ttl``, so without it one user could fill Redis
    file_bytes_per_user: Positive = 1024 * 1024 * 1024
    #: the same for visitors (anonymous users): tighter by default
    visitor_file_bytes_per_user: Positive = 50 * 1024 * 1024
    log_level: str = "INFO"
    #: ``json``: one JSON object per line; ``text``: a line for people; ``auto``: text when stderr is a terminal
    log_format: str = "auto"
    #: prompts and answers in the logs (the lines that admit and end a chat); credentials never are
    log_content: bool = False
    #: a line per HTTP request (method, path without its query, status, duration) from api and edge
    access_log: bool = False
    #: Prometheus metrics (``GET /metrics``); false makes every metric a no-op and the route a 404
    metrics: bool = True
    #: where a worker serves ``/metrics`` and ``/readyz`` (``streambridge worker --metrics-port``);
    #: 0 picks a free port. Unset: :data:`WORKER_METRICS_PORT`, or a free port (announced, with a
    #: warning) when another worker on the host has it. ``up`` serves its worker's on its own port.
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    #: browser origins allowed to call the API and edge, comma-separated (e.g. https://app.example);
    #: empty: no cross-origin access
    cors_origins: str = ""

    def __post_init__(self) -> None:
        _check_url("redis_url", self.redis_url, {"redis", "rediss", "unix"})
        _check_streams_url(self.streams_redis_url)
        _check_url("llm_base_url", self.llm_base_url, {"http", "https"})
        _check_url("public_edge_url", self.public_edge_url, {"http", "https"})
        for origin in self.allowed_origins:
            parts = urlsplit(origin)
            if origin == "*" or parts.scheme not in {"http", "https"} or not parts.hostname or parts.path:
                raise SettingsError(f"{env_name('cors_origins')}: {origin!r} is not an origin like https://app.example")
        self.trusted_networks  # noqa: B018 - raises SettingsError on a malformed entry
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"{env_name('log_level')}: must be one of DEBUG, INFO, WARNING, ERROR")
        if self.log_format not in {"auto", "json", "text"}:
            raise SettingsError(f"{env_name('log_format')}: must be one of auto, json, text")
        for name in ("vendor_fields", "visitor_vendor_fields"):
            for entry in (e.strip() for e in getattr(self, name).split(",")):
                if entry and entry != "*" and not VENDOR_FIELD.match(entry):
                    raise SettingsError(
                        f"{env_name(name)}: {entry!r} is not a field name (comma-separated names, or *)"
                    )

    @property
    def allowed_origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    @property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        networks = []
        for entry in (e.strip() for e in self.trusted_proxies.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                message = f"{entry!r} is not an address or network like 10.0.0.0/8"
                raise SettingsError(f"{env_name('trusted_proxies')}: {message}") from None
        return tuple(networks)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def load_settings(environ: Mapping[str, str], **overrides: Any) -> Settings:
    """Settings from ``environ``; ``overrides`` (CLI flags) win over the environment."""
    fields = set(Settings.__struct_fields__)
    raw: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        field = name.removeprefix(ENV_PREFIX).lower()
        if field not in fields:
            raise SettingsError(f"{name}: unknown setting")
        raw[field] = value
    if "llm_api_key" not in raw and environ.get("OPENAI_API_KEY"):
        raw["llm_api_key"] = environ["OPENAI_API_KEY"]
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(exc)) from None


def _explain(exc: msgspec.ValidationError) -> str:
    # msgspec says "Expected `int` >= 1 - at `$.worker_concurrency`": lead with the variable.
    message, _, path = str(exc).rpartition(" - at `$.")
    if not path:
        return str(exc)
    if message.startswith("Expected `bool`"):
        message = "must be true or false"
    return f"{env_name(path.rstrip('`'))}: {message[0].lower()}{message[1:]}"


def _scrubbed(exc: Exception, url: str) -> str:
    """``exc``'s words without any part of ``url``'s userinfo (a parser may quote a password as a port)."""
    text = str(exc)
    userinfo = url.partition("://")[2].rpartition("@")[0]
    for part in sorted({p for p in re.split(r"[:/]", userinfo) if p}, key=len, reverse=True):
        text = text.replace(part, "[redacted]")
    return text


def _check_url(field: str, value: str | None, schemes: set[str]) -> None:
    if value is None:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        why = _scrubbed(exc, value)
        raise SettingsError(f"{env_name(field)}: malformed URL {display_url(value)!r} ({why})") from None
    if parts.scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in sorted(schemes))
        raise SettingsError(f"{env_name(field)}: malformed URL {display_url(value)!r} (expected {allowed})")
    if parts.scheme != "unix" and not parts.hostname:
        raise SettingsError(f"{env_name(field)}: malformed URL {display_url(value)!r} (no host)")
    if field in ("redis_url", "streams_redis_url"):
        _check_redis_url(value, field)


def _check_streams_url(value: str | None) -> None:
    """A plain Redis URL, as ``redis_url``; or a cluster's seed nodes, ``redis-cluster://h:p[,h:p…]``."""
    if value is None or not value.startswith(CLUSTER_SCHEME + "://"):
        _check_url("streams_redis_url", value, {"redis", "rediss", "unix"})
        return
    try:
        parse_cluster_url(value)
    except ValueError as exc:
        raise SettingsError(f"{env_name('streams_redis_url')}: {exc}") from None


def parse_cluster_url(url: str) -> list[tuple[str, int]]:
    """``redis-cluster://host:port[,host:port…]``'s seed nodes; ``ValueError`` saying what is wrong."""
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    if scheme != CLUSTER_SCHEME:
        raise ValueError(f"not a Redis Cluster URL (redis-cluster://host:port[,host:port…]): {url!r}")
    if any(c in rest for c in "/?#@"):
        raise ValueError(f"a Redis Cluster URL holds seed nodes only, no path, query or credentials: {url!r}")
    seeds = []
    for seed in rest.split(","):
        host, colon, port = seed.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a Redis Cluster seed must be host:port, not {seed!r} in {url!r}")
        seeds.append((host.strip("[]"), int(port)))  # [::1]:7000 → ::1
    return seeds


def _check_redis_url(value: str, field: str = "redis_url") -> None:
    """What redis-py would reject only when connecting: a database that is not a number, bad options."""
    try:
        from redis.asyncio import ConnectionPool
    except ImportError:  # a client-only install (no `[server]` extra) runs no server to connect
        return

    try:
        pool = ConnectionPool.from_url(value)
        pool.connection_class(**pool.connection_kwargs)  # not connected: checks option names and types
    except (ValueError, TypeError) as exc:
        why = _scrubbed(exc, value)
        raise SettingsError(f"{env_name(field)}: malformed URL {display_url(value)!r} ({why})") from None
    path = urlsplit(value).path.strip("/")
    if urlsplit(value).scheme != "unix" and path and not (path.isascii() and path.isdigit()):
        shown = display_url(value)
        raise SettingsError(f"{env_name(field)}: malformed URL {shown!r} (the database must be a number)")
