"""Worker heartbeats: who is alive, per model, without scanning the keyspace.

A worker announces itself in two places, in one script call: its own key (the heartbeat's JSON, which
expires by itself) and the model's sorted set of workers scored by when that heartbeat expires. Counting
a model's live workers is then one ``ZCOUNT`` from now, whatever the size of the keyspace. Times are
Redis server time (``TIME``), so hosts with skewed clocks agree; expired members are pruned on each beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

from inferpool.constants import worker_heartbeat_key, worker_heartbeats_key
from inferpool.plumbing.redis_connection import decode_text

# KEYS: the worker's heartbeat key, the model's heartbeat set. ARGV: worker id, ttl (s), payload JSON.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[3], 'EX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('EXPIRE', KEYS[2], ttl * 4)
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


def beat(client: redis.Redis, model: str, worker_id: str, ttl_s: int, payload: str) -> None:
    """Announce ``worker_id`` as serving ``model`` for the next ``ttl_s`` seconds."""
    client.eval(_BEAT, 2, worker_heartbeat_key(model, worker_id), worker_heartbeats_key(model), worker_id, ttl_s,
                payload)  # fmt: skip


def withdraw(client: redis.Redis, model: str, worker_id: str) -> None:
    """Remove a worker's heartbeat at once (a clean shutdown)."""
    pipe = client.pipeline()
    pipe.delete(worker_heartbeat_key(model, worker_id))
    pipe.zrem(worker_heartbeats_key(model), worker_id)
    pipe.execute()


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


async def count_live_workers_async(client: redis.asyncio.Redis, models: Sequence[str]) -> dict[str, int]:
    """``count_live_workers_many`` on an asyncio client (the gateway)."""
    if not models:
        return {}
    counts: Any = await client.eval(_COUNT, len(models), *(worker_heartbeats_key(model) for model in models))
    return {model: int(count) for model, count in zip(models, counts, strict=True)}
