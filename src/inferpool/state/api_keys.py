"""API keys: one tenant per key, only the key's SHA-256 stored (``inferpool keys``).

A key is ``ipk-`` and 43 URL-safe characters (256 random bits). It is shown once, when created; Redis
keeps ``sha256(key) -> {key_id, tenant, created_at, limits}``, so a leaked Redis dump holds no usable key.
Keys are revoked, and their limits changed, by their ``key_id`` (shown by ``keys list``), which is not secret.
A key's limits (the models it may use, requests and tokens per minute, requests in flight) are read with the key
(gateways keep what they read until a change is announced: ``inferpool.gateway.key_cache``), so a change made
here applies at once (one made in Redis by hand does not reach the gateways' caches); the gateway enforces them
all (``inferpool.gateway.key_limits``), the client library, given a key, all but requests in flight
(``inferpool.client.keys``).
"""

from __future__ import annotations

import hashlib
import secrets
import time

import redis
import redis.asyncio
from pydantic import BaseModel, ConfigDict, Field

from inferpool.constants import API_KEYS_CHANGED_CHANNEL, API_KEYS_KEY
from inferpool.wire import check_tenant, new_id

KEY_PREFIX = "ipk-"


class KeyLimits(BaseModel):
    """What one key may do; None: no limit."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] | None = Field(default=None, description="Models (or aliases) it may use; others are 404.")
    rpm: int | None = Field(default=None, gt=0, description="Requests accepted per sliding minute.")
    tpm: int | None = Field(default=None, gt=0, description="Tokens per sliding minute (prompt estimate + max).")
    max_in_flight: int | None = Field(default=None, gt=0, description="Requests open at once, across gateways.")

    def describe(self) -> str:
        parts = [f"models {','.join(self.models)}" if self.models is not None else "",
                 f"{self.rpm} rpm" if self.rpm else "", f"{self.tpm} tpm" if self.tpm else "",
                 f"{self.max_in_flight} in flight" if self.max_in_flight else ""]  # fmt: skip
        return ", ".join(part for part in parts if part) or "none"


class ApiKeyInfo(BaseModel):
    """What is stored about a key (never the key)."""

    key_id: str
    tenant: str
    created_at: int
    limits: KeyLimits = Field(default_factory=KeyLimits)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Creating, listing and revoking keys (the ``inferpool keys`` commands)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def create(self, tenant: str, limits: KeyLimits | None = None) -> tuple[str, ApiKeyInfo]:
        """A new key for ``tenant``: (the key, shown once; what is stored)."""
        check_tenant(tenant)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        info = ApiKeyInfo(key_id=new_id("key")[:20], tenant=tenant, created_at=int(time.time()),
                          limits=limits or KeyLimits())  # fmt: skip
        self._redis.hset(API_KEYS_KEY, key_hash(key), info.model_dump_json())
        return key, info

    def set_limits(self, key_id: str, limits: KeyLimits) -> ApiKeyInfo | None:
        """Replace the limits of the key with ``key_id`` (gateways apply them from their next request)."""
        for digest, raw in self._redis.hgetall(API_KEYS_KEY).items():
            info = ApiKeyInfo.model_validate_json(raw)
            if info.key_id == key_id:
                updated = info.model_copy(update={"limits": limits})
                self._redis.hset(API_KEYS_KEY, digest, updated.model_dump_json())
                self._redis.publish(API_KEYS_CHANGED_CHANNEL, key_id)  # gateways' caches: after the write
                return updated
        return None

    def list(self) -> list[ApiKeyInfo]:
        infos = [ApiKeyInfo.model_validate_json(raw) for raw in self._redis.hvals(API_KEYS_KEY)]
        return sorted(infos, key=lambda info: (info.tenant, info.created_at))

    def revoke(self, key_id: str) -> ApiKeyInfo | None:
        """Remove the key with ``key_id``; returns what it was, or None if there is none."""
        for digest, raw in self._redis.hgetall(API_KEYS_KEY).items():
            info = ApiKeyInfo.model_validate_json(raw)
            if info.key_id == key_id:
                self._redis.hdel(API_KEYS_KEY, digest)
                self._redis.publish(API_KEYS_CHANGED_CHANNEL, key_id)  # gateways' caches: after the write
                return info
        return None


async def key_info(client: redis.asyncio.Redis, key: str) -> ApiKeyInfo | None:
    """What is stored about ``key`` (tenant, limits), or None if it is no (longer a) valid key. One ``HGET``:
    revocation and changed limits apply at once."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    raw = await client.hget(API_KEYS_KEY, key_hash(key))
    return None if raw is None else ApiKeyInfo.model_validate_json(raw)


def key_info_sync(client: redis.Redis, key: str) -> ApiKeyInfo | None:
    """``key_info`` on a sync client (the client library given a key)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    raw: bytes | None = client.hget(API_KEYS_KEY, key_hash(key))  # type: ignore[assignment]
    return None if raw is None else ApiKeyInfo.model_validate_json(raw)
