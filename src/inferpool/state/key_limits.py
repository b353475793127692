"""A gateway key's rate limits, shared by every gateway process through Redis.

Requests and tokens per minute are sliding-window logs (a sorted set of what was admitted in the last 60 s,
by Redis time): exact, so a key limited to N requests per minute never has more than N admitted in any 60 s,
whatever the concurrency or the number of gateways, and a refusal says exactly when a slot frees
(``Retry-After``). Requests in flight are a sorted set of open requests scored by when their slot lapses,
so a gateway that dies holding slots gives them back by itself. One script call admits or refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from inferpool.constants import key_limit_keys
from inferpool.plumbing.redis_connection import decode_text

WINDOW_MS = 60_000

# KEYS: requests log, tokens log, in-flight set. ARGV: rpm, tpm, max in flight (0: none), tokens, member id,
# in-flight slot lifetime (ms). Returns {1, '', 0} (admitted, recorded) or {0, which limit, ms to wait}.
_ADMIT = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = """
    + str(WINDOW_MS)
    + """
local rpm, tpm, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, member, slot_ms = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= most then return {0, 'max_in_flight', 1000} end
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, 'rpm', math.max(1, tonumber(oldest[2]) + window - now)}
  end
end
if tpm > 0 then
  if tokens > tpm then return {0, 'tpm_request', 0} end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], '|(%d+)$')) end
  if used + tokens > tpm then
    local freed = 0
    for i = 1, #entries, 2 do
      freed = freed + tonumber(string.match(entries[i], '|(%d+)$'))
      if used - freed + tokens <= tpm then return {0, 'tpm', math.max(1, tonumber(entries[i + 1]) + window - now)} end
    end
  end
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, member)
  redis.call('PEXPIRE', KEYS[1], window + 1000)
end
if tpm > 0 then
  redis.call('ZADD', KEYS[2], now, member .. '|' .. tokens)
  redis.call('PEXPIRE', KEYS[2], window + 1000)
end
if most > 0 then
  redis.call('ZADD', KEYS[3], now + slot_ms, member)
  redis.call('PEXPIRE', KEYS[3], slot_ms + 1000)
end
return {1, '', 0}
"""
)


@dataclass(frozen=True)
class Refusal:
    """Which limit refused (``rpm``, ``tpm``, ``tpm_request``: one request over the whole minute,
    ``max_in_flight``) and how long until it would admit."""

    limit: str
    retry_after_ms: int


def _args(rpm: int | None, tpm: int | None, max_in_flight: int | None, tokens: int, member: str,
          slot_s: float) -> list[int | str]:  # fmt: skip
    return [rpm or 0, tpm or 0, max_in_flight or 0, max(1, tokens), member, int(slot_s * 1000)]


def _refusal(answer: Any) -> Refusal | None:
    admitted, which, wait_ms = answer
    if int(admitted):
        return None
    return Refusal(decode_text(which), int(wait_ms))


class KeyLimitStore:
    """Admits requests under a key's limits, and frees their in-flight slots (the gateway's asyncio client)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._admit = client.register_script(_ADMIT)

    async def admit(self, key_id: str, *, rpm: int | None, tpm: int | None, max_in_flight: int | None, tokens: int,
                    member: str, slot_s: float) -> Refusal | None:  # fmt: skip
        """None if admitted (and recorded), else the ``Refusal``."""
        keys = list(key_limit_keys(key_id))
        return _refusal(await self._admit(keys=keys, args=_args(rpm, tpm, max_in_flight, tokens, member, slot_s)))

    async def release(self, key_id: str, member: str) -> None:
        """Free the in-flight slot ``member`` held (no-op if the key has no such limit)."""
        await self._client.zrem(key_limit_keys(key_id)[2], member)


class SyncKeyLimitStore:
    """``KeyLimitStore.admit`` on a sync client (the client library given a key: rates only, no in-flight cap)."""

    def __init__(self, client: redis.Redis) -> None:
        self._admit = client.register_script(_ADMIT)

    def admit(self, key_id: str, *, rpm: int | None, tpm: int | None, tokens: int, member: str) -> Refusal | None:
        return _refusal(self._admit(keys=list(key_limit_keys(key_id)), args=_args(rpm, tpm, None, tokens, member, 1)))
