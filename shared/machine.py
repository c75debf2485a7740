"""The chat's state machine: every change to a chat's state is one of the Lua scripts here.

::

                 ADMIT                 START                     FINISH
      (none) ──────────▶ queued ────────────────▶ running ─────────────────▶ complete | failed
                          │  ▲                     │   │                      | cancelled
                  CANCEL  │  │ REAP (lease lapsed: │   │ CANCEL: flags it; its worker FINISHes `cancelled`
                          ▼  │ worker dead, or     │   │ RENEW keeps the lease; RELEASE (hand-back)
                   cancelled └─ handed back) ◀─────┘   │ drops it, due for REAP at once
                                                       └ APPEND (fenced by the lease) adds events

Invariants the scripts keep, each in one atomic call:

- ``queued`` ⇔ the chat's job is in arq's queue (so the queue's length is the number of chats
  waiting: admission reads it); a wake token may be on the wake list too, or a stale one.
- ``running`` ⇔ the chat is in ``running``, scored by when its lease lapses; while an attempt
  lives, the lease exists and only that attempt's token may append.
- A terminal status ⇔ the stream holds exactly one terminal event, and the chat is in neither
  set. Nothing leaves a terminal status.
- ``attempts`` only grows (an attempt's ``started`` event records it, in APPEND).

Every script is safe to run twice (a client that lost the reply sends it again): a replay finds
its own work done and answers as the first run did (ADMIT: ``ok``; START: the same claim;
APPEND: 0, the batch is in; FINISH: 0; REAP: 0, the chat is queued already; the rest are
idempotent). Every key a script touches comes in ``KEYS``; none is built inside Lua. Time comes
from Redis (``TIME``), never a host's clock, so hosts whose clocks disagree still agree on
leases, deadlines and windows.

Each script, its keys (``KEYS[n]``) and who runs it:

=========  ===============================================================  ======
ADMIT      credential, queue, rate, active(owner), chat, job, wake,          api
           [idempotency]
CANCEL     chat, events, notify, cancels, queue, job, active(owner)          api
START      queue, job, chat, lease, running                                  worker
RENEW      lease, running, chat                                              worker
RELEASE    lease, running                                                    worker
LAPSED     running                                                           worker (reaper)
REAP       chat, lease, running, queue, job, wake                            worker (reaper)
APPEND     events, lease, notify, chat                                       worker (sink)
FINISH     events, lease, notify, chat, running, active(owner)               worker (sink)
=========  ===============================================================  ======
"""

from __future__ import annotations

import hashlib
from typing import Any, Final, NamedTuple

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from streambridge.shared import keys


class Script(NamedTuple):
    name: str
    lua: str
    sha: str


class Call(NamedTuple):
    """A script with its keys and arguments, ready to send (:func:`call`, or a pipeline's ``evalsha``)."""

    script: Script
    keys: list[str]
    args: list[str | bytes]


def define(name: str, lua: str) -> Script:
    """A script, with the helpers every script here shares (``now_ms``, ``enqueue``) in front of it."""
    lua = _PRELUDE + lua
    return Script(name, lua, hashlib.sha1(lua.encode()).hexdigest())


async def call(redis: Redis, c: Call) -> Any:
    """Runs the call by its script's hash, sending the script itself only when Redis lacks it."""
    try:
        return await redis.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)  # type: ignore[arg-type,misc]
    except NoScriptError:
        return await redis.eval(c.script.lua, len(c.keys), *c.keys, *c.args)  # type: ignore[arg-type,misc]


#: the wake list keeps at most this many tokens: those beyond it are found by arq's scan
WAKE_LIMIT: Final = 100_000

_PRELUDE: Final = (
    """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- microseconds (exact in a double until the year 2255): pickups are about a millisecond, which
-- whole milliseconds only round
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- arq's job record and queue entry, and a token on the wake list (at its front: a recovered chat's)
local function enqueue(job_key, queue, wake, job_id, job, expires_ms, score, front)
  redis.call('SET', job_key, job, 'PX', expires_ms)
  redis.call('ZADD', queue, score, job_id)
  if front then
    redis.call('LPUSH', wake, job_id)
  else
    redis.call('RPUSH', wake, job_id)
    redis.call('LTRIM', wake, -"""
    + str(WAKE_LIMIT)
    + """, -1)
  end
end
"""
)

# Admission. Refusals come before anything is written, so a refused chat counts for nothing.
# ARGV: chat id, owner, created_at, request, job record, job expiry (ms), queue depth limit,
# chats per minute, chats running at once, deadline (ms from now), result TTL (s), request's
# SHA-256, idempotency record's TTL (s), replay or record, the chat's trace (``shared.trace``; may be empty).
ADMIT: Final = define(
    "ADMIT",
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'revoked'} end
local idem = KEYS[8]
if idem and ARGV[14] == 'replay' then
  local first = redis.call('HMGET', idem, 'chat', 'request')
  if first[1] then
    if first[2] ~= ARGV[12] then return {'reused'} end
    return {'replay', first[1]}
  end
end
if redis.call('EXISTS', KEYS[5]) == 1 then return {'ok'} end
-- a refused request's retry must not find an earlier request's chat under a recording key
local function refuse(answer)
  if idem and ARGV[14] == 'record' then redis.call('DEL', idem) end
  return answer
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then return refuse({'queue'}) end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[9]) then return refuse({'running'}) end
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[8]) then
  return refuse({'rate', redis.call('PTTL', KEYS[3])})
end
if redis.call('INCR', KEYS[3]) == 1 or redis.call('PTTL', KEYS[3]) < 0 then
  redis.call('PEXPIRE', KEYS[3], 60000)
end
local deadline = now + tonumber(ARGV[10])
redis.call('ZADD', KEYS[4], deadline, ARGV[1])
redis.call('PEXPIREAT', KEYS[4], deadline)
redis.call('HSET', KEYS[5], 'owner', ARGV[2], 'created_at', ARGV[3], 'created_ms', now, 'status', 'queued',
  'attempts', 0, 'request', ARGV[4], 'queued_us', string.format('%d', now_us()))
if ARGV[15] and ARGV[15] ~= '' then redis.call('HSET', KEYS[5], 'trace', ARGV[15]) end
redis.call('EXPIRE', KEYS[5], ARGV[11])
enqueue(KEYS[6], KEYS[2], KEYS[7], ARGV[1], ARGV[5], ARGV[6], now, false)
if idem then
  redis.call('HSET', idem, 'chat', ARGV[1], 'request', ARGV[12])
  redis.call('EXPIRE', idem, ARGV[13])
end
return {'ok'}
""",
)

# A queued chat is cancelled here, with its job, so no worker starts it; a running one is
# flagged and its worker told at once (Pub/Sub), and ends it ``cancelled`` (RENEW reads the flag
# too: a backstop for a message the worker missed). ARGV: the result, stream TTL (s), chat id.
# Answers the status it found; a queued chat it cancelled, ``{'cancelled', its age (ms)}``: no
# worker ends that one, so its caller counts its end (by Redis's clock, as a worker would).
CANCEL: Final = define(
    "CANCEL",
    """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  local data = '{"type":"cancelled"}'
  local id = redis.call('XADD', KEYS[2], '*', 'type', 'cancelled', 'data', data)
  redis.call('PUBLISH', KEYS[3], id .. '\\n' .. 'cancelled' .. '\\n' .. data)
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'result', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[5], ARGV[3])
  redis.call('DEL', KEYS[6])
  redis.call('ZREM', KEYS[7], ARGV[3])
  local created = tonumber(redis.call('HGET', KEYS[1], 'created_ms') or '')
  return {'cancelled', created and math.max(0, now_ms() - created) or 0}
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  redis.call('PUBLISH', KEYS[4], ARGV[3])
end
return status
""",
)

# A worker takes a queued chat: taking its job off the queue decides which worker (a duplicate
# wake token, or arq's scan, finds it gone: ``taken``); then the lease's claim. Answers
# ``{'claimed', now (ms), the chat's fields...}`` or ``{why not}``. ``pickup_ms``: queued → started,
# from the queue's score (whole ms); ``pickup_us``: admitted → started, in µs, from ``queued_us``.
# ARGV: chat id (the job's id), the attempt's token, lease TTL (ms).
START: Final = define(
    "START",
    """
local function claimed(now)
  local chat = redis.call('HGETALL', KEYS[3])
  table.insert(chat, 1, now)
  table.insert(chat, 1, 'claimed')
  return chat
end
local now = now_ms()
if redis.call('HGET', KEYS[4], 'token') == ARGV[2] then return claimed(now) end
local enqueued = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not enqueued then return {'taken'} end
-- another attempt holds the chat: the job stays queued, and starts once that lease is gone
if redis.call('EXISTS', KEYS[4]) == 1 then return {'busy'} end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
local status = redis.call('HGET', KEYS[3], 'status')
if not status then return {'missing'} end
if status ~= 'queued' and status ~= 'running' then return {status} end
redis.call('HSET', KEYS[4], 'token', ARGV[2], 'seq', 0)
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('HSET', KEYS[3], 'status', 'running', 'pickup_ms', math.max(0, now - tonumber(enqueued)))
local queued_us = redis.call('HGET', KEYS[3], 'queued_us')
if queued_us then
  redis.call('HSET', KEYS[3], 'pickup_us', string.format('%d', math.max(0, now_us() - tonumber(queued_us))))
end
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[3]), ARGV[1])
return claimed(now)
""",
)

# 0: lost to another attempt; 1: renewed; 2: renewed, and the owner asked to cancel.
# ARGV: token, lease TTL (ms), chat id.
RENEW: Final = define(
    "RENEW",
    """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[2]), ARGV[3])
if redis.call('HEXISTS', KEYS[3], 'cancel') == 1 then return 2 end
return 1
""",
)

# Hand a chat back at once (its worker is stopping): the lease goes, and the chat is due for REAP.
# ARGV: token, chat id.
RELEASE: Final = define(
    "RELEASE",
    """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return 1
""",
)

# Running chats whose lease lapsed by Redis's clock. ARGV: at most this many.
LAPSED: Final = define("LAPSED", "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, ARGV[1])")

# A lapsed chat goes back to the queue, at its front (it was accepted before every chat waiting
# behind it, and its reader is mid-answer), in the same call that takes it off ``running``: a
# failure between the two can leave no chat running with nothing looking for it. One reaper wins.
# Answers the recovery's number, or 0. ARGV: chat id, job record, job expiry (ms).
REAP: Final = define(
    "REAP",
    """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local due = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not due or tonumber(due) > now_ms() then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local recovery = redis.call('HINCRBY', KEYS[1], 'recoveries', 1)
redis.call('HSET', KEYS[1], 'status', 'queued')
local first = tonumber(redis.call('HGET', KEYS[1], 'created_ms') or '0')
enqueue(KEYS[5], KEYS[4], KEYS[6], ARGV[1], ARGV[2], ARGV[3], first, true)
return recovery
""",
)

# A batch of events, fenced by the lease: -1 the lease is another attempt's; 0 this batch is in
# already (a re-send); -2 an earlier batch is missing (Redis lost it: the attempt must restart);
# 1 appended, and announced in one notification ``id\\ntype\\ndata`` per entry. With an
# attempt's ``started`` event, the attempt's number is recorded on the chat.
# ARGV: token, the batch's sequence number, MAXLEN, attempt ('' if none starts), then type, data, ...
APPEND: Final = define(
    "APPEND",
    """
local lease = redis.call('HMGET', KEYS[2], 'token', 'seq')
if lease[1] ~= ARGV[1] then return -1 end
local seq, mine = tonumber(lease[2] or '0'), tonumber(ARGV[2])
if seq >= mine then return 0 end
if seq < mine - 1 then return -2 end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], 'attempts', ARGV[4]) end
local notice = {}
for i = 5, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
  notice[#notice + 1] = id .. '\\n' .. ARGV[i] .. '\\n' .. ARGV[i + 1]
end
if #notice > 0 then redis.call('PUBLISH', KEYS[3], table.concat(notice, '\\n')) end
redis.call('HSET', KEYS[2], 'seq', ARGV[2])
return 1
""",
)

# The terminal event and the chat's final state in one step: the stream never holds a terminal
# event while the chat still looks runnable. Answers as APPEND, or 0 once the chat has ended.
# ARGV: token, seq, MAXLEN, type, data, status, result, result TTL (s), stream TTL (s), chat id.
FINISH: Final = define(
    "FINISH",
    """
local status = redis.call('HGET', KEYS[4], 'status')
if status == 'complete' or status == 'failed' or status == 'cancelled' then return 0 end
local lease = redis.call('HMGET', KEYS[2], 'token', 'seq')
if lease[1] ~= ARGV[1] then return -1 end
if tonumber(lease[2] or '0') < tonumber(ARGV[2]) - 1 then return -2 end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[4], 'data', ARGV[5])
redis.call('PUBLISH', KEYS[3], id .. '\\n' .. ARGV[4] .. '\\n' .. ARGV[5])
redis.call('HSET', KEYS[4], 'status', ARGV[6], 'result', ARGV[7])
redis.call('EXPIRE', KEYS[4], ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[5], ARGV[10])
redis.call('ZREM', KEYS[6], ARGV[10])
return 1
""",
)

SCRIPTS: Final = (ADMIT, CANCEL, START, RENEW, RELEASE, LAPSED, REAP, APPEND, FINISH)


class Admission(NamedTuple):
    """What admission needs beyond the chat itself: the caller's limits and the deployment's."""

    max_queue: int
    chats_per_minute: int
    max_running: int
    deadline_ms: int
    result_ttl: int


def admit(
    chat_id: str,
    owner: str,
    credential_id: str,
    *,
    created_at: str,
    request: bytes,
    job: bytes,
    job_expires_ms: int,
    limits: Admission,
    idempotency_key: str | None = None,
    idempotency_ttl: int = 86_400,
    replay: bool = True,
    trace: str = "",
) -> Call:
    """``replay``: the key's chat answers a request that repeats it; when false, the key only
    records this chat (for a later request that says it is a retry). ``trace``: the chat's W3C
    trace context (``shared.trace.encode``), kept beside the request (not in it: a retry under the
    same ``Idempotency-Key`` carries a new one, and must still be the same request)."""
    k = [
        keys.credential(credential_id),
        keys.queue(),
        keys.rate(owner),
        keys.active(owner),
        keys.chat(chat_id),
        keys.job(chat_id),
        keys.wake(),
    ]
    if idempotency_key is not None:
        k.append(keys.idempotency(owner, idempotency_key))
    args: list[str | bytes] = [chat_id, owner, created_at, request, job, str(job_expires_ms)]
    args += [str(limits.max_queue), str(limits.chats_per_minute), str(limits.max_running)]
    args += [str(limits.deadline_ms), str(limits.result_ttl), hashlib.sha256(request).hexdigest()]
    args += [str(idempotency_ttl), "replay" if replay else "record", trace]
    return Call(ADMIT, k, args)


def cancel(chat_id: str, owner: str, *, result: bytes, stream_ttl: int) -> Call:
    k = [keys.chat(chat_id), keys.events(chat_id), keys.notify(chat_id), keys.cancels()]
    k += [keys.queue(), keys.job(chat_id), keys.active(owner)]
    return Call(CANCEL, k, [result, str(stream_ttl), chat_id])


def start(chat_id: str, token: str, ttl_ms: int) -> Call:
    k = [keys.queue(), keys.job(chat_id), keys.chat(chat_id), keys.lease(chat_id), keys.running()]
    return Call(START, k, [chat_id, token, str(ttl_ms)])


def renew(chat_id: str, token: str, ttl_ms: int) -> Call:
    return Call(RENEW, [keys.lease(chat_id), keys.running(), keys.chat(chat_id)], [token, str(ttl_ms), chat_id])


def release(chat_id: str, token: str) -> Call:
    return Call(RELEASE, [keys.lease(chat_id), keys.running()], [token, chat_id])


def lapsed(limit: int = 100) -> Call:
    return Call(LAPSED, [keys.running()], [str(limit)])


def reap(chat_id: str, *, job: bytes, job_expires_ms: int) -> Call:
    k = [keys.chat(chat_id), keys.lease(chat_id), keys.running(), keys.queue(), keys.job(chat_id), keys.wake()]
    return Call(REAP, k, [chat_id, job, str(job_expires_ms)])


def append_keys(chat_id: str) -> list[str]:
    return [keys.events(chat_id), keys.lease(chat_id), keys.notify(chat_id), keys.chat(chat_id)]


def finish_keys(chat_id: str, owner: str) -> list[str]:
    return [*append_keys(chat_id), keys.running(), keys.active(owner)]
