"""The chat's state machine: every change to a chat's state is one of the Lua scripts here.

::

            CREATE+ADMIT              CLAIM (+TAKE)               FINISH
      (none) ──────────▶ queued ────────────────▶ running ─────────────────▶ complete | failed
                          │  ▲                     │   │                      | cancelled
                  CANCEL  │  │ REQUEUE (its worker │   │ CANCEL: flags it; its worker FINISHes `cancelled`
                          ▼  │ died, or handed it  │   │
                   cancelled └─ back) ◀────────────┘   └ APPEND (fenced by the lease) adds events

Two Redis hold the state. A chat's own keys (hash, events, lease, notification channel) are on
the **streams** Redis, under one hash tag (``shared.keys``), so on a Redis Cluster each script
over them runs on one node. The cross-chat keys (arq's queue and job records, the wake list,
credentials, limits, the workers' heartbeats and their chats) are on the **control** Redis. No
script touches both: a transition that changes both is two calls, ordered so that the chat's hash
(the truth: its status and its lease) changes first where a crash between the two must not lose
the chat, and every half left behind by a process's crash is finished by whoever next looks (a
worker's start, its audit, or a reaper); no two attempts ever append (the lease's token fences
them). What a Redis's own crash can lose is in docs/guarantees.md:

- Admission creates the hash (CREATE), then the job (ADMIT); a refused or crashed admission leaves
  a hash no job points to, whose id was never answered, and which expires.
- A start lists the chat as its worker's (LIST, control; refused while the worker's heartbeat has
  lapsed), claims its lease (CLAIM, streams), then takes its job off the queue (control). A crash
  after the listing leaves the chat in a dead worker's list: a reaper puts it back. A chat leaves a
  list only with its attempt's token (UNLIST), so a later attempt of the same worker stays listed.
- A worker's liveness is its heartbeat (``keys.workers``: one write per worker per beat, not one per
  chat), not a TTL on each lease: a lease holds until a reaper ends it (REQUEUE), so a streams
  Redis failover of a few seconds lapses no chat. A dead worker's chats go back to the queue first
  (ENQUEUE, control), then their status and lease (REQUEUE, streams), then off its list; one
  reaper at a time per dead worker (two interleaved could queue a chat again that another worker
  had meanwhile started).
- A finish ends the chat (FINISH, streams), then drops it from its worker's list and its owner's
  active set (control). A queued chat's cancel ends it (CANCEL, streams), then drops its job
  (control): a worker that finds the job meanwhile finds the chat ended, and drops it too.

Invariants the scripts keep, each in one atomic call:

- while an attempt lives, the chat's lease holds its token and only that attempt may append; its
  worker lists the chat beside that token.
- A terminal status ⇔ the stream holds exactly one terminal event. Nothing leaves a terminal status.
- ``attempts`` only grows (an attempt's ``started`` event records it, in APPEND).

Every script is safe to run twice (a client that lost the reply sends it again): a replay finds
its own work done and answers as the first run did. Every key a script touches comes in ``KEYS``;
none is built inside Lua. Time comes from Redis (``TIME``), never a host's clock, so hosts whose
clocks disagree still agree on heartbeats, deadlines and windows. The scripts that announce
entries take the publish command as an argument: ``PUBLISH`` on one Redis, ``SPUBLISH`` (sharded
Pub/Sub, to the chat's slot's node alone) on a cluster.

Each script, its keys (``KEYS[n]``), the Redis it runs on and who runs it:

=========  =========================================================  ========  ======
CREATE     chat                                                       streams   api
ADMIT      credential, queue, rate, active(owner), job, wake, [idem]  control   api
CANCEL     chat, events, notify                                       streams   api
CLAIM      chat, lease                                                streams   worker
HEARTBEAT  workers                                                    control   worker
LIST       workers, worker's chats                                    control   worker
UNLIST     worker's chats, [workers]                                  control   worker
DEAD       workers, [worker's chats]                                  control   worker (reaper)
ENQUEUE    job, queue, wake                                           control   worker (reaper)
REQUEUE    chat, lease                                                streams   worker (reaper)
APPEND     events, lease, notify, chat                                streams   worker (sink)
FINISH     events, lease, notify, chat                                streams   worker (sink)
=========  =========================================================  ========  ======
"""

from __future__ import annotations

import hashlib
from typing import Any, Final, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from streambridge.shared import keys

#: a client of either Redis: the control one is always a plain Redis; the streams one may be a cluster
Store = Redis | RedisCluster


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


async def call(redis: Store, c: Call) -> Any:
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


# A chat's hash, before its job exists (ADMIT): a worker that finds the job finds the chat. 0 if
# it exists already (a re-send). ARGV: owner, created_at, request, result TTL (s), the chat's trace
# (``shared.trace``; may be empty).
CREATE: Final = define(
    "CREATE",
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'created_at', ARGV[2], 'created_ms', now_ms(), 'status', 'queued',
  'attempts', 0, 'request', ARGV[3], 'queued_us', string.format('%d', now_us()))
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'trace', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
""",
)

# Admission. Refusals come before anything is written, so a refused chat counts for nothing.
# ARGV: chat id, job record, job expiry (ms), queue depth limit, chats per minute, chats running
# at once, deadline (ms from now), request's SHA-256, idempotency record's TTL (s), replay or record.
ADMIT: Final = define(
    "ADMIT",
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'revoked'} end
local idem = KEYS[7]
if idem and ARGV[10] == 'replay' then
  local first = redis.call('HMGET', idem, 'chat', 'request')
  if first[1] then
    if first[2] ~= ARGV[8] then return {'reused'} end
    return {'replay', first[1]}
  end
end
-- a re-send: the chat counts among its owner's until it ends
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then return {'ok'} end
-- a refused request's retry must not find an earlier request's chat under a recording key
local function refuse(answer)
  if idem and ARGV[10] == 'record' then redis.call('DEL', idem) end
  return answer
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return refuse({'queue'}) end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[6]) then return refuse({'running'}) end
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[5]) then
  return refuse({'rate', redis.call('PTTL', KEYS[3])})
end
if redis.call('INCR', KEYS[3]) == 1 or redis.call('PTTL', KEYS[3]) < 0 then
  redis.call('PEXPIRE', KEYS[3], 60000)
end
local deadline = now + tonumber(ARGV[7])
redis.call('ZADD', KEYS[4], deadline, ARGV[1])
redis.call('PEXPIREAT', KEYS[4], deadline)
enqueue(KEYS[5], KEYS[2], KEYS[6], ARGV[1], ARGV[2], ARGV[3], now, false)
if idem then
  redis.call('HSET', idem, 'chat', ARGV[1], 'request', ARGV[8])
  redis.call('EXPIRE', idem, ARGV[9])
end
return {'ok'}
""",
)

# A queued chat is cancelled here (its caller then drops its job, on the control Redis); a running
# one is flagged (its caller tells its worker, through Pub/Sub), and its worker ends it
# ``cancelled``. ARGV: the result, stream TTL (s), publish command. Answers the status it found; a
# queued chat it cancelled, ``{'cancelled', its age (ms)}``: no worker ends that one, so its caller
# counts its end (by Redis's clock, as a worker would).
CANCEL: Final = define(
    "CANCEL",
    """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  local data = '{"type":"cancelled"}'
  local id = redis.call('XADD', KEYS[2], '*', 'type', 'cancelled', 'data', data)
  redis.call(ARGV[3], KEYS[3], id .. '\\n' .. 'cancelled' .. '\\n' .. data)
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'result', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  local created = tonumber(redis.call('HGET', KEYS[1], 'created_ms') or '')
  return {'cancelled', created and math.max(0, now_ms() - created) or 0}
end
if status == 'running' then redis.call('HSET', KEYS[1], 'cancel', '1') end
return status
""",
)

# A worker claims a queued chat's lease (it registered the chat with its worker first, and takes
# the job off the queue after). Answers ``{'claimed', now (ms), the chat's fields...}``, or why
# not: ``busy`` (another attempt holds the lease), ``missing``, or a terminal status. A chat
# ``running`` without a lease (Redis lost it) is claimed again. ``pickup_ms``: admitted → started
# (whole ms); ``pickup_us``: the same in µs. ARGV: the attempt's token.
CLAIM: Final = define(
    "CLAIM",
    """
local function claimed(now)
  local chat = redis.call('HGETALL', KEYS[1])
  table.insert(chat, 1, now)
  table.insert(chat, 1, 'claimed')
  return chat
end
local now = now_ms()
local held = redis.call('HGET', KEYS[2], 'token')
if held == ARGV[1] then return claimed(now) end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status ~= 'queued' and status ~= 'running' then return {status} end
if held then return {'busy'} end
redis.call('HSET', KEYS[2], 'token', ARGV[1], 'seq', 0)
local created = tonumber(redis.call('HGET', KEYS[1], 'created_ms') or now)
redis.call('HSET', KEYS[1], 'status', 'running', 'pickup_ms', math.max(0, now - created))
local queued_us = redis.call('HGET', KEYS[1], 'queued_us')
if queued_us then
  redis.call('HSET', KEYS[1], 'pickup_us', string.format('%d', math.max(0, now_us() - tonumber(queued_us))))
end
return claimed(now)
""",
)

# A worker's heartbeat: its chats are its own until this lapses. Answers 1 if it had lapsed (or a
# reaper had forgotten the worker): its chats may be running elsewhere now. ARGV: worker id, TTL (ms).
HEARTBEAT: Final = define(
    "HEARTBEAT",
    """
local now = now_ms()
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if ARGV[3] == 'first' then return 0 end
if not due or tonumber(due) < now then return 1 end
return 0
""",
)

# A chat on a worker's list, with its attempt's token, before the attempt claims it: only while the
# worker's heartbeat holds (a worker a reaper took for dead, and forgot, must beat again first: else
# its chat would be on a list no reaper reads). 1 listed, 0 refused. ARGV: worker id, chat id, token.
LIST: Final = define(
    "LIST",
    """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) <= now_ms() then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
""",
)

# A chat off a worker's list, if it is there with this attempt's token: a later attempt of the same
# worker (woken again while this one let go) stays listed. A reaper's (with ``workers`` and the
# worker's id) only while the worker is still taken for dead: a worker that came back may have
# listed the chat again, and claimed it, since the reaper read it. ARGV: chat id, token, [worker id].
UNLIST: Final = define(
    "UNLIST",
    """
if KEYS[2] then
  local due = redis.call('ZSCORE', KEYS[2], ARGV[3])
  if due and tonumber(due) > now_ms() then return 0 end
end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
""",
)

# Workers whose heartbeat lapsed, by Redis's clock. ARGV: at most this many.
DEAD: Final = define("DEAD", "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, ARGV[1])")

# A dead worker whose chats were all put back is forgotten, unless it came back meanwhile.
# ARGV: worker id.
FORGET: Final = define(
    "FORGET",
    """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > now_ms() or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
""",
)

# A chat back on the queue, at its front (it was accepted before every chat waiting behind it,
# and its reader is mid-answer): the first half of a recovery, before REQUEUE. Sent twice, it
# leaves one job. ARGV: chat id, job record, job expiry (ms), the chat's created_ms (its score).
ENQUEUE: Final = define(
    "ENQUEUE",
    """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
enqueue(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), true)
return 1
""",
)

# The second half: the attempt holding ``token`` lets go, and the chat is queued again. Answers
# the recovery's number; 0 if another attempt holds the lease (the chat is running there); or
# the status it found, if not running (a re-send finds ``queued``). ARGV: the attempt's token.
REQUEUE: Final = define(
    "REQUEUE",
    """
local held = redis.call('HGET', KEYS[2], 'token')
if held and held ~= ARGV[1] then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return status or 'missing' end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'status', 'queued')
return redis.call('HINCRBY', KEYS[1], 'recoveries', 1)
""",
)

# A batch of events, fenced by the lease: -1 the lease is another attempt's; 0 this batch is in
# already (a re-send); -2 an earlier batch is missing (Redis lost it: the attempt must restart);
# 1 appended, and announced in one notification ``id\\ntype\\ndata`` per entry. With an
# attempt's ``started`` event, the attempt's number is recorded on the chat.
# ARGV: token, the batch's sequence number, MAXLEN, attempt ('' if none starts), publish command,
# then type, data, ...
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
for i = 6, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
  notice[#notice + 1] = id .. '\\n' .. ARGV[i] .. '\\n' .. ARGV[i + 1]
end
if #notice > 0 then redis.call(ARGV[5], KEYS[3], table.concat(notice, '\\n')) end
redis.call('HSET', KEYS[2], 'seq', ARGV[2])
return 1
""",
)

# The terminal event and the chat's final state in one step: the stream never holds a terminal
# event while the chat still looks runnable. Answers as APPEND, or 0 once the chat has ended.
# ARGV: token, seq, MAXLEN, type, data, status, result, result TTL (s), stream TTL (s), publish command.
FINISH: Final = define(
    "FINISH",
    """
local status = redis.call('HGET', KEYS[4], 'status')
if status == 'complete' or status == 'failed' or status == 'cancelled' then return 0 end
local lease = redis.call('HMGET', KEYS[2], 'token', 'seq')
if lease[1] ~= ARGV[1] then return -1 end
if tonumber(lease[2] or '0') < tonumber(ARGV[2]) - 1 then return -2 end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[4], 'data', ARGV[5])
redis.call(ARGV[10], KEYS[3], id .. '\\n' .. ARGV[4] .. '\\n' .. ARGV[5])
redis.call('HSET', KEYS[4], 'status', ARGV[6], 'result', ARGV[7])
redis.call('EXPIRE', KEYS[4], ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('DEL', KEYS[2])
return 1
""",
)

SCRIPTS: Final = (CREATE, ADMIT, CANCEL, CLAIM, HEARTBEAT, LIST, UNLIST, DEAD, FORGET, ENQUEUE, REQUEUE, APPEND, FINISH)

#: the publish command of the scripts that announce entries, by whether the streams Redis is a cluster
PUBLISH: Final = "PUBLISH"
SPUBLISH: Final = "SPUBLISH"


def publish_command(streams: Store) -> str:
    return SPUBLISH if isinstance(streams, RedisCluster) else PUBLISH


class Admission(NamedTuple):
    """What admission needs beyond the chat itself: the caller's limits and the deployment's."""

    max_queue: int
    chats_per_minute: int
    max_running: int
    deadline_ms: int
    result_ttl: int


def create(chat_id: str, owner: str, *, created_at: str, request: bytes, result_ttl: int, trace: str = "") -> Call:
    """``trace``: the chat's W3C trace context (``shared.trace.encode``), kept beside the request
    (not in it: a retry under the same ``Idempotency-Key`` carries a new one, and must still be the
    same request)."""
    return Call(CREATE, [keys.chat(chat_id)], [owner, created_at, request, str(result_ttl), trace])


def admit(
    chat_id: str,
    owner: str,
    credential_id: str,
    *,
    request: bytes,
    job: bytes,
    job_expires_ms: int,
    limits: Admission,
    idempotency_key: str | None = None,
    idempotency_ttl: int = 86_400,
    replay: bool = True,
) -> Call:
    """``replay``: the key's chat answers a request that repeats it; when false, the key only
    records this chat (for a later request that says it is a retry)."""
    k = [keys.credential(credential_id), keys.queue(), keys.rate(owner), keys.active(owner)]
    k += [keys.job(chat_id), keys.wake()]
    if idempotency_key is not None:
        k.append(keys.idempotency(owner, idempotency_key))
    args: list[str | bytes] = [chat_id, job, str(job_expires_ms)]
    args += [str(limits.max_queue), str(limits.chats_per_minute), str(limits.max_running)]
    args += [str(limits.deadline_ms), hashlib.sha256(request).hexdigest()]
    args += [str(idempotency_ttl), "replay" if replay else "record"]
    return Call(ADMIT, k, args)


def cancel(chat_id: str, *, result: bytes, stream_ttl: int, publish: str = PUBLISH) -> Call:
    k = [keys.chat(chat_id), keys.events(chat_id), keys.notify(chat_id)]
    return Call(CANCEL, k, [result, str(stream_ttl), publish])


def claim(chat_id: str, token: str) -> Call:
    return Call(CLAIM, [keys.chat(chat_id), keys.lease(chat_id)], [token])


def heartbeat(worker_id: str, ttl_ms: int, *, first: bool = False) -> Call:
    return Call(HEARTBEAT, [keys.workers()], [worker_id, str(ttl_ms), "first" if first else ""])


def listing(worker_id: str, chat_id: str, token: str) -> Call:
    return Call(LIST, [keys.workers(), keys.worker_chats(worker_id)], [worker_id, chat_id, token])


def unlisting(worker_id: str, chat_id: str, token: str, *, reaped: bool = False) -> Call:
    """``reaped``: by a reaper, for a worker taken for dead (refused if it came back)."""
    if reaped:
        return Call(UNLIST, [keys.worker_chats(worker_id), keys.workers()], [chat_id, token, worker_id])
    return Call(UNLIST, [keys.worker_chats(worker_id)], [chat_id, token])


def dead(limit: int = 100) -> Call:
    return Call(DEAD, [keys.workers()], [str(limit)])


def forget(worker_id: str) -> Call:
    return Call(FORGET, [keys.workers(), keys.worker_chats(worker_id)], [worker_id])


def enqueue(chat_id: str, *, job: bytes, job_expires_ms: int, created_ms: int) -> Call:
    k = [keys.job(chat_id), keys.queue(), keys.wake()]
    return Call(ENQUEUE, k, [chat_id, job, str(job_expires_ms), str(created_ms)])


def requeue(chat_id: str, token: str) -> Call:
    return Call(REQUEUE, [keys.chat(chat_id), keys.lease(chat_id)], [token])


def append_keys(chat_id: str) -> list[str]:
    return [keys.events(chat_id), keys.lease(chat_id), keys.notify(chat_id), keys.chat(chat_id)]
