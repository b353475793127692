"""Worker heartbeats: who is alive, per model, without scanning the keyspace.

A worker announces itself in two places, in one script call: its own key (the heartbeat's JSON, which
expires by itself) and the model's sorted set of workers scored by when that heartbeat expires. Counting
a model's live workers is then one ``ZCOUNT`` from now, whatever the size of the keyspace. Times are
Redis server time (``TIME``), so hosts with skewed clocks agree. An expired member stays in the set for a
grace period (the broker's visibility timeout): the model's live workers hand the work left in a gone worker's own
queues to the model's shared queues (``inferpool.state.worker_queues``) until nothing more can come back
to them; members older than that are pruned on each beat.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

from inferpool.constants import detected_windows_key, worker_heartbeat_key, worker_heartbeats_key
from inferpool.plumbing.redis_connection import decode_text

# KEYS: the worker's heartbeat key, the model's heartbeat set, its detected windows. ARGV: worker id, ttl (s),
# payload JSON, grace (s), the window its engine accepts ('' when not detected).
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
local grace = tonumber(ARGV[4])
redis.call('SET', KEYS[1], ARGV[3], 'EX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
local forgotten = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - grace)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - grace)
for _, id in ipairs(forgotten) do redis.call('HDEL', KEYS[3], id) end
redis.call('EXPIRE', KEYS[2], math.ceil(ttl * 4 + grace))
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
  redis.call('EXPIRE', KEYS[3], math.ceil(ttl * 4 + grace))
else
  redis.call('HDEL', KEYS[3], ARGV[1])
end
"""

# KEYS: pairs of (heartbeat set, detected windows). Returns, per pair, the smallest window a live worker
# reported, or -1 when none did.
_WINDOWS = """
local t = redis.call('TIME')
local now = string.format('(%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
local out = {}
for i = 1, #KEYS, 2 do
  local smallest = -1
  local ids = redis.call('ZRANGEBYSCORE', KEYS[i], now, '+inf')
  if #ids > 0 then
    for _, value in ipairs(redis.call('HMGET', KEYS[i + 1], unpack(ids))) do
      local n = tonumber(value)
      if n and (smallest < 0 or n < smallest) then smallest = n end
    end
  end
  out[#out + 1] = smallest
end
return out
"""

# KEYS: heartbeat sets. Returns, for each, how many members have not expired.
_COUNT = """
local t = redis.call('TIME')
local now = string.format('(%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
local counts = {}
for i, key in ipairs(KEYS) do
  counts[i] = redis.call('ZCOUNT', key, now, '+inf')
end
return counts
"""

# KEYS: a heartbeat set. Returns the ids of its live workers.
_LIVE = """
local t = redis.call('TIME')
local now = string.format('(%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""

# KEYS: a heartbeat set. Returns the ids of the workers whose heartbeat has expired (kept for the grace).
_GONE = """
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
"""


def beat(client: redis.Redis, model: str, worker_id: str, ttl_s: int, payload: str, grace_s: float = 0.0,
         window: int | None = None) -> None:  # fmt: skip
    """Announce ``worker_id`` as serving ``model`` for the next ``ttl_s`` seconds, with the context window its
    engine accepts if it detected one; workers gone for longer than ``grace_s`` are forgotten."""
    client.eval(_BEAT, 3, worker_heartbeat_key(model, worker_id), worker_heartbeats_key(model),
                detected_windows_key(model), worker_id, ttl_s, payload, grace_s,
                "" if window is None else str(window))  # fmt: skip


def detected_windows(client: redis.Redis, models: Sequence[str]) -> dict[str, int | None]:
    """Per model, the smallest context window its live workers detected (None: none reported one), in one call."""
    if not models:
        return {}
    keys = [key for model in models for key in (worker_heartbeats_key(model), detected_windows_key(model))]
    smallest: Any = client.eval(_WINDOWS, len(keys), *keys)
    return {model: (int(value) if int(value) > 0 else None) for model, value in zip(models, smallest, strict=True)}


# KEYS: the worker's heartbeat key, the model's heartbeat set. ARGV: worker id.
_RETIRE = """
local t = redis.call('TIME')
redis.call('DEL', KEYS[1])
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
end
"""


def withdraw(client: redis.Redis, model: str, worker_id: str) -> None:
    """End a worker's heartbeat at once (it drains or stops): nobody routes to it any more, and it counts as
    gone, so what is left in its own queues is handed over (``inferpool.state.worker_queues``)."""
    client.eval(_RETIRE, 2, worker_heartbeat_key(model, worker_id), worker_heartbeats_key(model), worker_id)


def count_live_workers_many(client: redis.Redis, models: Sequence[str]) -> dict[str, int]:
    """Live workers of each of ``models``, in one round trip."""
    if not models:
        return {}
    counts: Any = client.eval(_COUNT, len(models), *(worker_heartbeats_key(model) for model in models))
    return {model: int(count) for model, count in zip(models, counts, strict=True)}


def count_live_workers(client: redis.Redis, model: str) -> int:
    """Workers of ``model`` whose heartbeat has not expired."""
    return count_live_workers_many(client, [model])[model]


def live_worker_ids(client: redis.Redis, model: str) -> list[str]:
    """Ids of the workers of ``model`` whose heartbeat has not expired."""
    ids: Any = client.eval(_LIVE, 1, worker_heartbeats_key(model))
    return [decode_text(worker_id) for worker_id in ids]


def gone_worker_ids(client: redis.Redis, model: str) -> list[str]:
    """Ids of the workers of ``model`` whose heartbeat expired within the grace period."""
    ids: Any = client.eval(_GONE, 1, worker_heartbeats_key(model))
    return [decode_text(worker_id) for worker_id in ids]


def read_heartbeats(client: redis.Redis, model: str, worker_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The heartbeat payloads of ``worker_ids`` (those still there), in one round trip."""
    if not worker_ids:
        return {}
    raw: Any = client.mget([worker_heartbeat_key(model, worker_id) for worker_id in worker_ids])
    beats = {}
    for worker_id, payload in zip(worker_ids, raw, strict=True):
        if payload is not None:
            try:
                beats[worker_id] = json.loads(payload)
            except ValueError:
                continue
    return beats


def live_heartbeats(client: redis.Redis, model: str) -> dict[str, dict[str, Any]]:
    """The heartbeat payloads of ``model``'s live workers, by worker id."""
    return read_heartbeats(client, model, live_worker_ids(client, model))


def model_state(beat: dict[str, Any]) -> str:
    """The model's state on the worker that sent ``beat``: warm, loading or cold (a worker holding several models,
    ``inferpool.residency``); a single-model worker's model is always warm."""
    return str(beat.get("state", "warm"))


async def count_live_workers_async(client: redis.asyncio.Redis, models: Sequence[str]) -> dict[str, int]:
    """``count_live_workers_many`` on an asyncio client (the gateway)."""
    if not models:
        return {}
    counts: Any = await client.eval(_COUNT, len(models), *(worker_heartbeats_key(model) for model in models))
    return {model: int(count) for model, count in zip(models, counts, strict=True)}
