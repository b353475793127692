"""Rate limits shared by every worker through Redis: a GCRA bucket per provider key, plus a pause.

Each limit (requests, tokens) is a Generic Cell Rate Algorithm bucket kept as one Redis key holding the
"theoretical arrival time", updated atomically by a Lua script on Redis's clock: each caller reserves the
next slot and sleeps until it, so any number of worker processes on any number of hosts together stay
under the limit, with requests evenly spaced (no bursts). A provider's own signal (429 with
``Retry-After``, or ``x-ratelimit-remaining-*: 0``) sets a shared pause that every worker honours.
Requests are spaced over each window plus a little slack (``window_slack_s``) to absorb jitter between
Redis and the provider, so the pool runs a few percent under the configured limit.
"""

from __future__ import annotations

import asyncio
import hashlib

import redis.asyncio
from pydantic import BaseModel, ConfigDict, Field

from inferpool.constants import KEY_PREFIX


def window_slack_s(per_s: float) -> float:
    """Slack added to a limit's window (2%, at least 0.25 s), so network and scheduling jitter between
    Redis and the provider never packs one request too many into one of the provider's windows."""
    return max(0.02 * per_s, 0.25)


# KEYS[1]: the bucket, KEYS[2]: the shared pause. ARGV: ms per unit, units wanted.
# Returns {1, ms}: a slot is reserved ms from now (0: go now), or {0, ms}: paused, ask again in ms.
# Reserving (rather than answering "not yet" and letting callers poll) keeps strict spacing without a
# thundering herd of waiters re-asking Redis every time a slot frees.
_ACQUIRE = """
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then
  return {0, pause}
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + tonumber(ARGV[1]) * tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 60000)
return {1, math.ceil(tat - now)}
"""


class RateLimitSpec(BaseModel):
    """Limits of one provider key: requests and/or tokens per window of ``per_s`` seconds."""

    model_config = ConfigDict(extra="forbid")
    requests: int | None = Field(default=None, gt=0)
    tokens: int | None = Field(default=None, gt=0)
    per_s: float = Field(default=60.0, gt=0)


def limit_group(provider: str, base_url: str | None, api_key: str) -> str:
    """A stable name for one provider key that does not reveal the key."""
    digest = hashlib.sha256(f"{provider}|{base_url or ''}|{api_key}".encode()).hexdigest()[:16]
    return f"{provider}-{digest}"


class SharedRateLimiter:
    """Waits for a slot under the limits of one provider key, shared through Redis."""

    def __init__(self, client: redis.asyncio.Redis, group: str, spec: RateLimitSpec) -> None:
        self._client = client
        self._spec = spec
        self._script = client.register_script(_ACQUIRE)
        prefix = f"{KEY_PREFIX}ratelimit:{group}"
        self._pause_key = f"{prefix}:pause"
        self._buckets: list[tuple[str, float, bool]] = []  # (key, ms per unit, charged by tokens?)
        window_ms = (spec.per_s + window_slack_s(spec.per_s)) * 1000
        if spec.requests:
            self._buckets.append((f"{prefix}:requests", window_ms / spec.requests, False))
        if spec.tokens:
            self._buckets.append((f"{prefix}:tokens", window_ms / spec.tokens, True))

    async def acquire(self, tokens: int) -> None:
        """Return once a request of about ``tokens`` tokens may be sent."""
        for key, ms_per_unit, by_tokens in self._buckets:
            units = max(1, tokens) if by_tokens else 1
            while True:
                reserved, wait_ms = await self._script(keys=[key, self._pause_key], args=[ms_per_unit, units])
                if int(wait_ms) > 0:
                    await asyncio.sleep(int(wait_ms) / 1000)
                if int(reserved):
                    break

    async def pause(self, seconds: float) -> None:
        """Hold every worker of this key for ``seconds`` (a provider said it is over its limit)."""
        if seconds > 0:
            await self._client.set(self._pause_key, "1", px=max(1, int(seconds * 1000)))
