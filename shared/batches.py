"""A batch's state machine, its items and its progress events: every change to a batch is a Lua script here.

::

             CREATE                          DONE (last line)
  (none) ───────────▶ validating ──▶ in_progress ─────────────▶ finalizing ─▶ completed
                          │              │  │ TICK (window over: every unfinished line fails
                          │              │  │       as batch_expired) ─────────────────▶ expired
                          ▼ a bad line   │  └ CANCEL ─▶ cancelling ──(no item running)─▶ cancelled
                        failed           │
                                         └ CLAIM (lease) ─▶ an item runs ─▶ DONE | RELEASE (handed back)
                                           TICK: a lapsed lease (dead worker) puts the line back

Each line of the input file is an item, found by its index (``keys.file_items``). Invariants each
script keeps in one atomic call:

- an item has exactly one result line: DONE sets the line's bit in ``keys.batch_done`` and appends
  its line to the output or error file in the same call; a second DONE for it (a worker thought dead
  that finishes after all) changes nothing. So ``completed + failed`` is the number of lines done,
  never more, and equals ``total`` once the batch completes or expires.
- a running item is in ``keys.batch_leases``, scored by when its lease lapses; its worker renews it
  (RENEW), and TICK (in every worker) puts a lapsed one back on ``keys.batch_again``, which CLAIM
  takes before new lines: a dead worker's items run again.
- no item of a batch that is not ``in_progress`` starts; a cancelled batch keeps its finished items.
- every event of the batch is appended (XADD) in the same call as the change it tells of.
- expiry is a chunk of lines per TICK, from ``expire_cursor`` in the batch's hash: while the field
  exists the batch is still ``in_progress`` but no CLAIM, DONE or CANCEL touches it, so the lines
  the walk has yet to reach stay unfinished until it reaches them.

Time is Redis's (``TIME``). The batch's hash holds its counts, usage and timestamps; ``output_file``
and ``error_file`` are the ids its result files take, named ``output_file_id`` / ``error_file_id``
(the OpenAI fields) once they hold a line and the batch has ended.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec

from streambridge.shared import keys
from streambridge.shared.machine import Call, define

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
TERMINAL_BATCH_STATUSES: Final = frozenset({"failed", "completed", "expired", "cancelled"})
#: the one endpoint batch lines may name (batch lines are Chat Completions bodies)
ENDPOINT: Final = "/v1/chat/completions"
#: the one completion window OpenAI offers; its length is ``Settings.batch_completion_window``
COMPLETION_WINDOW: Final = "24h"


class Item(msgspec.Struct, frozen=True):
    """A line of a batch's input as a worker runs it: its ``custom_id`` and the upstream request body
    (a Chat Completions body as ``api/chats.chat_request`` parsed it; the worker adds ``model`` if it
    names none)."""

    custom_id: str
    body: msgspec.Raw


class LineError(msgspec.Struct, omit_defaults=False):
    """One reason a batch's input was refused (OpenAI's ``BatchError``); ``line`` counts from 1."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class Response(msgspec.Struct):
    status_code: int
    request_id: str
    body: msgspec.Raw


class OutputError(msgspec.Struct):
    code: str
    message: str


class OutputLine(msgspec.Struct):
    """A line of a batch's output or error file: OpenAI's ``BatchRequestOutput``."""

    id: str
    custom_id: str
    response: Response | None
    error: OutputError | None


class ItemDone(msgspec.Struct, tag="item", tag_field="type"):
    """An item ended: ``completed`` (in the output file) or ``failed`` (in the error file); the
    batch's counts after it."""

    custom_id: str
    index: int
    status: Literal["completed", "failed"]
    completed: int
    failed: int
    total: int


class StatusChanged(msgspec.Struct, tag="status", tag_field="type"):
    """The batch moved to a status that is not its last (``validating``, ``in_progress``, ``cancelling``,
    ``finalizing``)."""

    status: BatchStatus


class BatchEnded(msgspec.Struct, tag="end", tag_field="type"):
    """Terminal: the batch's last status and counts. The stream closes after it."""

    status: BatchStatus
    completed: int
    failed: int
    total: int


BatchEvent = ItemDone | StatusChanged | BatchEnded
_event_decoder: Final = msgspec.json.Decoder(BatchEvent)
_item_decoder: Final = msgspec.json.Decoder(Item)


def decode_batch_event(data: bytes | str) -> BatchEvent:
    return _event_decoder.decode(data)


def decode_item(data: bytes | str) -> Item:
    return _item_decoder.decode(data)


Metadata = Annotated[dict[str, Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=16)]


class BatchKeys(NamedTuple):
    """The ids a batch's scripts need to name all of its keys."""

    batch_id: str
    owner: str
    input_file: str
    output_file: str
    error_file: str

    def keys(self) -> list[str]:
        return [
            keys.batch(self.batch_id),
            keys.batch_events(self.batch_id),
            keys.batch_leases(self.batch_id),
            keys.batch_again(self.batch_id),
            keys.batch_done(self.batch_id),
            keys.active_batches(),
            keys.user_files(self.owner),
            keys.file(self.output_file),
            keys.file_lines(self.output_file),
            keys.file(self.error_file),
            keys.file_lines(self.error_file),
            keys.file_items(self.input_file),
            keys.file(self.input_file),
            keys.user_batches(self.owner),
            keys.user_batch_items(self.owner),
            keys.user_file_sizes(self.owner),
            keys.user_file_bytes(self.owner),
        ]


# Every script takes the keys of ``BatchKeys.keys`` in that order, and these helpers.
_BATCH_PRELUDE: Final = """
local B, EV, LEASES, AGAIN, DONE, ACTIVE, UFILES = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local OUTF, OUTL, ERRF, ERRL, ITEMS = KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local USER_ITEMS, FSIZES, FTOTAL = KEYS[15], KEYS[16], KEYS[17]
local function member(index) return redis.call('HGET', B, 'id') .. ':' .. index end
local TERMINAL = {failed = true, completed = true, expired = true, cancelled = true}
local function event(kind, fields)
  fields.type = kind
  local data = cjson.encode(fields)
  redis.call('XADD', EV, '*', 'type', kind, 'data', data)
end
-- A running batch's results count into its owner's stored bytes (api/files.py's quota) as each line
-- is written, under one provisional member of the sizes (``<id>:results:<bytes>``), kept until the
-- batch's window ends plus the TTL; finish swaps it for the result files' own members.
local function results_member(bytes) return redis.call('HGET', B, 'id') .. ':results:' .. bytes end
local function uncount_results()
  local v = redis.call('HMGET', B, 'output_bytes', 'error_bytes')
  local bytes = tonumber(v[1] or '0') + tonumber(v[2] or '0')
  if bytes > 0 and redis.call('ZREM', FSIZES, results_member(bytes)) == 1 then
    redis.call('DECRBY', FTOTAL, bytes)
  end
  return bytes
end
local function count_results(add, ttl)
  local bytes = uncount_results() + add
  local keep = tonumber(redis.call('HGET', B, 'expires_ms')) - now_ms() + ttl * 1000
  redis.call('ZADD', FSIZES, now_ms() + keep, results_member(bytes))
  redis.call('INCRBY', FTOTAL, bytes)
  for _, key in ipairs({FSIZES, FTOTAL}) do
    local pttl = redis.call('PTTL', key)
    if pttl >= 0 and pttl < keep then redis.call('PEXPIRE', key, keep) end
  end
end
local function counts()
  local v = redis.call('HMGET', B, 'completed', 'failed', 'total')
  return tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
end
-- a result file's record, once it holds a line
local function result_file(fkey, lkey, field, bytes_field, suffix, now, ttl)
  local lines = redis.call('LLEN', lkey)
  if lines == 0 then return end
  local b = redis.call('HMGET', B, 'owner', field, bytes_field, 'id')
  redis.call('HSET', fkey, 'owner', b[1], 'purpose', 'batch_output', 'filename', b[4] .. suffix,
    'bytes', b[3], 'lines', lines, 'created_ms', now)
  redis.call('EXPIRE', fkey, ttl)
  redis.call('EXPIRE', lkey, ttl)
  redis.call('ZADD', UFILES, now, b[2])
  redis.call('HSET', B, field .. '_id', b[2])
  -- the owner's stored bytes (api/files.py's quota) count it from now: never refused, since its
  -- items have run, but a user it takes past the quota starts no upload or batch until they delete
  -- files; deleting it, or its expiry, frees its bytes as any file's
  redis.call('ZADD', FSIZES, now + ttl * 1000, b[2] .. ':' .. b[3])
  redis.call('INCRBY', FTOTAL, b[3])
  redis.call('PEXPIRE', FSIZES, ttl * 1000)
  redis.call('PEXPIRE', FTOTAL, ttl * 1000)
end
local function finish(status, ttl)
  local now = now_ms()
  local id = redis.call('HGET', B, 'id')
  uncount_results()  -- counted again just below, as the result files
  if status == 'completed' then
    redis.call('HSET', B, 'status', 'finalizing', 'finalizing_at', math.floor(now / 1000))
    event('status', {status = 'finalizing'})
  end
  result_file(OUTF, OUTL, 'output_file', 'output_bytes', '_output.jsonl', now, ttl)
  result_file(ERRF, ERRL, 'error_file', 'error_bytes', '_error.jsonl', now, ttl)
  redis.call('HSET', B, 'status', status, status .. '_at', math.floor(now / 1000))
  redis.call('ZREM', ACTIVE, id)
  redis.call('DEL', LEASES, AGAIN)
  local c, f, t = counts()
  event('end', {status = status, completed = c, failed = f, total = t})
  redis.call('EXPIRE', B, ttl)
  redis.call('EXPIRE', EV, ttl)
  redis.call('EXPIRE', DONE, ttl)
end
"""


def _define(name: str, lua: str) -> Any:
    return define(name, _BATCH_PRELUDE + lua)


# A batch from an uploaded file whose lines were checked as it arrived (``api/files.py``): ``failed``
# at once if any line was bad (``errors`` names each), else ``in_progress``. Answers ``ok``,
# ``failed`` or ``no_file`` (not the caller's, not a batch input, deleted).
# ARGV: batch id, owner, endpoint, completion window, metadata (JSON), window (ms), TTL (s), the
# input, output and error files' ids, the owner's limit of running items (across batches), and
# this batch's, each '' unless the creator's API key overrides it. An override is kept with the
# batch (whichever worker claims its items applies it); without one, CLAIM applies the claiming
# worker's live settings, so lowering them takes effect on batches already running.
CREATE: Final = _define(
    "BATCH_CREATE",
    """
local f = redis.call('HMGET', KEYS[13], 'owner', 'purpose', 'lines', 'invalid', 'errors')
if f[1] ~= ARGV[2] or f[2] ~= 'batch' then return 'no_file' end
local now = now_ms()
local expires = now + tonumber(ARGV[6])
redis.call('HSET', B, 'id', ARGV[1], 'owner', ARGV[2], 'endpoint', ARGV[3], 'completion_window', ARGV[4],
  'metadata', ARGV[5], 'input_file_id', ARGV[8], 'output_file', ARGV[9], 'error_file', ARGV[10],
  'created_ms', now, 'created_at', math.floor(now / 1000), 'expires_ms', expires,
  'expires_at', math.floor(expires / 1000), 'total', f[3], 'next', 0, 'completed', 0, 'failed', 0,
  'output_bytes', 0, 'error_bytes', 0, 'prompt_tokens', 0, 'completion_tokens', 0, 'total_tokens', 0,
  'status', 'validating')
if ARGV[11] ~= '' then redis.call('HSET', B, 'user_limit', ARGV[11]) end
if ARGV[12] ~= '' then redis.call('HSET', B, 'batch_limit', ARGV[12]) end
if ARGV[13] then redis.call('HSET', B, 'file_quota', ARGV[13]) end
redis.call('ZADD', KEYS[14], now, ARGV[1])
redis.call('EXPIRE', KEYS[14], ARGV[7])
event('status', {status = 'validating'})
if tonumber(f[4]) > 0 or tonumber(f[3]) == 0 then
  local errors = f[5]
  if tonumber(f[3]) == 0 and tonumber(f[4]) == 0 then
    errors = '[{"code":"empty_file","message":"the input file has no lines","param":null,"line":null}]'
  end
  redis.call('HSET', B, 'errors', errors)
  finish('failed', ARGV[7])
  return 'failed'
end
redis.call('HSET', B, 'status', 'in_progress', 'in_progress_at', math.floor(now / 1000))
redis.call('EXPIRE', B, math.floor(tonumber(ARGV[6]) / 1000) + tonumber(ARGV[7]))
event('status', {status = 'in_progress'})
redis.call('ZADD', ACTIVE, now, ARGV[1])
return 'ok'
""",
)

# Up to ARGV[1] items to run, each leased for ARGV[2] ms, within the batch's limit of running at
# once (``batch_limit``, its key's override; else ARGV[3], the worker's setting) and its owner's
# (``user_limit``, across their batches; else ARGV[4], or ARGV[3] from a worker that sends none):
# lines handed back first, then new ones.
# Answers ``{index, item, ...}``.
CLAIM: Final = _define(
    "BATCH_CLAIM",
    """
local b = redis.call('HMGET', B, 'status', 'expires_ms', 'next', 'total')
local now = now_ms()
if b[1] ~= 'in_progress' or now >= tonumber(b[2]) then return {} end
-- an owner whose stored bytes (their running batches' results among them) fill the quota starts no
-- item: the batch waits, and goes on once they delete files (or expires at the end of its window)
local quota = redis.call('HGET', B, 'file_quota')
if quota and tonumber(redis.call('GET', FTOTAL) or '0') >= tonumber(quota) then return {} end
redis.call('ZREMRANGEBYSCORE', USER_ITEMS, '-inf', now)
local limits = redis.call('HMGET', B, 'user_limit', 'batch_limit')
local user_room = tonumber(limits[1] or ARGV[4] or ARGV[3]) - redis.call('ZCARD', USER_ITEMS)
local batch_room = tonumber(limits[2] or ARGV[3]) - redis.call('ZCARD', LEASES)
local n = math.min(tonumber(ARGV[1]), batch_room, user_room)
local nxt, total = tonumber(b[3]), tonumber(b[4])
local out = {}
while #out < 2 * n do
  local index = redis.call('LPOP', AGAIN)
  if not index then
    if nxt >= total then break end
    index = tostring(nxt)
    nxt = nxt + 1
  end
  if redis.call('GETBIT', DONE, index) == 0 and not redis.call('ZSCORE', LEASES, index) then
    redis.call('ZADD', LEASES, now + tonumber(ARGV[2]), index)
    redis.call('ZADD', USER_ITEMS, now + tonumber(ARGV[2]), member(index))
    out[#out + 1] = index
    out[#out + 1] = redis.call('LINDEX', ITEMS, index) or ''
  end
end
redis.call('HSET', B, 'next', nxt)
redis.call('PEXPIRE', USER_ITEMS, 10 * tonumber(ARGV[2]))
return out
""",
)

# The running items' leases, renewed (those still held). Answers the batch's status: a worker
# stops its items of a batch that is no longer ``in_progress``. ARGV: lease (ms), index, ...
RENEW: Final = _define(
    "BATCH_RENEW",
    """
local lapse = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', LEASES, 'XX', lapse, ARGV[i])
  redis.call('ZADD', USER_ITEMS, 'XX', lapse, member(ARGV[i]))
end
redis.call('PEXPIRE', USER_ITEMS, 10 * tonumber(ARGV[1]))
local b = redis.call('HMGET', B, 'status', 'expire_cursor')
if b[2] then return 'expired' end  -- expiring: its running items' results would be refused
return b[1] or 'gone'
""",
)

# Items handed back unfinished (their worker is stopping, or their batch is): run again later if
# the batch still runs; a cancelling batch with nothing left running is cancelled.
# ARGV: TTL (s), index, ...
RELEASE: Final = _define(
    "BATCH_RELEASE",
    """
local status = redis.call('HGET', B, 'status')
for i = 2, #ARGV do
  redis.call('ZREM', USER_ITEMS, member(ARGV[i]))
  if redis.call('ZREM', LEASES, ARGV[i]) == 1 and status == 'in_progress'
      and redis.call('GETBIT', DONE, ARGV[i]) == 0 then
    redis.call('LPUSH', AGAIN, ARGV[i])
  end
end
if status == 'cancelling' and redis.call('ZCARD', LEASES) == 0 then finish('cancelled', ARGV[1]) end
return 1
""",
)

# An item's one result line: into the output file (ARGV[2] = '1') or the error file, with the
# counts, the usage and an ``item`` event; the batch ends with its last line. Answers 1, or 0 if
# the line had its result already (or the batch ended: expired, cancelled).
# ARGV: index, ok, line, custom id, prompt tokens, completion tokens, total tokens, TTL (s).
DONE: Final = _define(
    "BATCH_DONE",
    """
local index = ARGV[1]
local b = redis.call('HMGET', B, 'status', 'expire_cursor')
local status = b[1]
if status ~= 'in_progress' and status ~= 'cancelling' then return 0 end
-- expiring: every unfinished line is the expiry's (a late result would race the cursor, and could
-- end an expired batch as completed)
if b[2] then return 0 end
if redis.call('GETBIT', DONE, index) == 1 then return 0 end
redis.call('SETBIT', DONE, index, 1)
redis.call('ZREM', LEASES, index)
redis.call('ZREM', USER_ITEMS, member(index))
local outcome
count_results(#ARGV[3] + 1, tonumber(ARGV[8]))
if ARGV[2] == '1' then
  redis.call('RPUSH', OUTL, ARGV[3])
  redis.call('HINCRBY', B, 'output_bytes', #ARGV[3] + 1)
  redis.call('HINCRBY', B, 'completed', 1)
  outcome = 'completed'
else
  redis.call('RPUSH', ERRL, ARGV[3])
  redis.call('HINCRBY', B, 'error_bytes', #ARGV[3] + 1)
  redis.call('HINCRBY', B, 'failed', 1)
  outcome = 'failed'
end
redis.call('HINCRBY', B, 'prompt_tokens', ARGV[5])
redis.call('HINCRBY', B, 'completion_tokens', ARGV[6])
redis.call('HINCRBY', B, 'total_tokens', ARGV[7])
local c, f, t = counts()
event('item', {custom_id = ARGV[4], index = tonumber(index), status = outcome, completed = c, failed = f, total = t})
if c + f >= t then
  finish('completed', ARGV[8])
elseif status == 'cancelling' and redis.call('ZCARD', LEASES) == 0 then
  finish('cancelled', ARGV[8])
end
return 1
""",
)

# The owner cancels: no new item starts; running ones are stopped by their workers (RENEW tells
# them), and the batch is ``cancelled`` once none runs. Answers the status after. ARGV: TTL (s).
CANCEL: Final = _define(
    "BATCH_CANCEL",
    """
local status = redis.call('HGET', B, 'status')
if status ~= 'in_progress' and status ~= 'validating' then return status end
if redis.call('HEXISTS', B, 'expire_cursor') == 1 then return status end  -- expiring: it ends expired
local now = now_ms()
redis.call('HSET', B, 'status', 'cancelling', 'cancelling_at', math.floor(now / 1000))
event('status', {status = 'cancelling'})
if redis.call('ZCARD', LEASES) == 0 then
  finish('cancelled', ARGV[1])
  return 'cancelled'
end
return 'cancelling'
""",
)

# Every worker, for every active batch, every so often: a lapsed lease (its worker died) puts its
# line back; a batch past its window expires (every unfinished line goes to the error file as
# ``batch_expired``); a cancelling batch with nothing running is cancelled; an ended one leaves the
# active set. Answers how many leases lapsed, or -1 while an expiry has lines left to walk.
# Expiry walks at most ARGV[4] lines a call, from the cursor ``expire_cursor`` in the batch's hash:
# a 50,000-line batch in one call held Redis for most of a second. Until the cursor reaches the end
# the batch stays ``in_progress`` (no claim, no result, no cancel: the expiry owns every unfinished
# line), then ends ``expired``. ARGV: batch id, TTL (s), at most this many lapsed, lines a call.
TICK: Final = _define(
    "BATCH_TICK",
    """
local b = redis.call('HMGET', B, 'status', 'expires_ms', 'total', 'id')
if not b[1] or TERMINAL[b[1]] then
  redis.call('ZREM', ACTIVE, ARGV[1])
  return 0
end
local now = now_ms()
if b[1] == 'in_progress' and now >= tonumber(b[2]) then
  local message = 'This request could not be executed before the completion window expired.'
  local failed, bytes = 0, 0
  local from, total = tonumber(redis.call('HGET', B, 'expire_cursor') or 0), tonumber(b[3])
  local to = math.min(from + tonumber(ARGV[4]), total)
  for i = from, to - 1 do
    if redis.call('GETBIT', DONE, i) == 0 then
      redis.call('SETBIT', DONE, i, 1)
      local ok, item = pcall(cjson.decode, redis.call('LINDEX', ITEMS, i) or '')
      local line = cjson.encode({id = 'batch_req_' .. b[4] .. '_' .. i, custom_id = ok and item.custom_id or '',
        response = cjson.null, error = {code = 'batch_expired', message = message}})
      redis.call('RPUSH', ERRL, line)
      failed, bytes = failed + 1, bytes + #line + 1
    end
  end
  if bytes > 0 then count_results(bytes, tonumber(ARGV[2])) end
  redis.call('HINCRBY', B, 'failed', failed)
  redis.call('HINCRBY', B, 'error_bytes', bytes)
  redis.call('HSET', B, 'expire_cursor', to)
  if to < total then return -1 end
  finish('expired', ARGV[2])
  return 0
end
local lapsed = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, index in ipairs(lapsed) do
  redis.call('ZREM', LEASES, index)
  redis.call('ZREM', USER_ITEMS, member(index))
  if b[1] == 'in_progress' and redis.call('GETBIT', DONE, index) == 0 then redis.call('LPUSH', AGAIN, index) end
end
if b[1] == 'cancelling' and redis.call('ZCARD', LEASES) == 0 then finish('cancelled', ARGV[2]) end
return #lapsed
""",
)


def create(
    k: BatchKeys,
    *,
    endpoint: str,
    window: str,
    metadata: bytes,
    window_ms: int,
    ttl: int,
    user_limit: int | None,
    batch_limit: int | None,
    file_quota: int | None = None,
) -> Call:
    """``user_limit``, ``batch_limit``: the API key's overrides, None without one (see CREATE)."""
    args: list[str | bytes] = [k.batch_id, k.owner, endpoint, window, metadata, str(window_ms), str(ttl)]
    limits = ["" if user_limit is None else str(user_limit), "" if batch_limit is None else str(batch_limit)]
    quota = [] if file_quota is None else [str(file_quota)]
    return Call(CREATE, k.keys(), [*args, k.input_file, k.output_file, k.error_file, *limits, *quota])


def claim(k: BatchKeys, n: int, *, lease_ms: int, max_running: int, user_max_running: int | None = None) -> Call:
    args: list[str | bytes] = [str(n), str(lease_ms), str(max_running)]
    return Call(CLAIM, k.keys(), args if user_max_running is None else [*args, str(user_max_running)])


def renew(k: BatchKeys, indexes: list[int], *, lease_ms: int) -> Call:
    return Call(RENEW, k.keys(), [str(lease_ms), *map(str, indexes)])


def release(k: BatchKeys, indexes: list[int], *, ttl: int) -> Call:
    return Call(RELEASE, k.keys(), [str(ttl), *map(str, indexes)])


class Usage(NamedTuple):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def done(k: BatchKeys, index: int, *, ok: bool, line: bytes, custom_id: str, usage: Usage, ttl: int) -> Call:
    args: list[str | bytes] = [str(index), "1" if ok else "0", line, custom_id]
    args += [str(usage.prompt_tokens), str(usage.completion_tokens), str(usage.total_tokens), str(ttl)]
    return Call(DONE, k.keys(), args)


def cancel(k: BatchKeys, *, ttl: int) -> Call:
    return Call(CANCEL, k.keys(), [str(ttl)])


#: lines one TICK call expires: about a millisecond of Redis's time
EXPIRE_CHUNK: Final = 1000


def tick(k: BatchKeys, *, ttl: int, limit: int = 1000, expire_chunk: int = EXPIRE_CHUNK) -> Call:
    return Call(TICK, k.keys(), [k.batch_id, str(ttl), str(limit), str(expire_chunk)])


async def batch_keys(redis: Any, batch_id: str) -> BatchKeys | None:
    """The batch's keys, from its hash; None if it is gone."""
    owner, input_file, output_file, error_file = await redis.hmget(
        keys.batch(batch_id), ["owner", "input_file_id", "output_file", "error_file"]
    )
    if owner is None:
        return None
    return BatchKeys(batch_id, owner.decode(), input_file.decode(), output_file.decode(), error_file.decode())
