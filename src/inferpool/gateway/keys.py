"""API keys for the gateway: one tenant per key, only the key's SHA-256 stored (``inferpool keys``).

A key is ``ipk-`` and 43 URL-safe characters (256 random bits). It is shown once, when created; Redis
keeps ``sha256(key) -> {key_id, tenant, created_at}``, so a leaked Redis dump holds no usable key. Keys
are revoked by their ``key_id`` (shown by ``keys list``), which is not secret.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import redis
import redis.asyncio
from pydantic import BaseModel

from inferpool.client._base import check_tenant
from inferpool.constants import API_KEYS_KEY
from inferpool.wire import new_id

KEY_PREFIX = "ipk-"


class ApiKeyInfo(BaseModel):
    """What is stored about a key (never the key)."""

    key_id: str
    tenant: str
    created_at: int


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Creating, listing and revoking keys (the ``inferpool keys`` commands)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def create(self, tenant: str) -> tuple[str, ApiKeyInfo]:
        """A new key for ``tenant``: (the key, shown once; what is stored)."""
        check_tenant(tenant)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        info = ApiKeyInfo(key_id=new_id("key")[:20], tenant=tenant, created_at=int(time.time()))
        self._redis.hset(API_KEYS_KEY, key_hash(key), info.model_dump_json())
        return key, info

    def list(self) -> list[ApiKeyInfo]:
        infos = [ApiKeyInfo.model_validate_json(raw) for raw in self._redis.hvals(API_KEYS_KEY)]
        return sorted(infos, key=lambda info: (info.tenant, info.created_at))

    def revoke(self, key_id: str) -> ApiKeyInfo | None:
        """Remove the key with ``key_id``; returns what it was, or None if there is none."""
        for digest, raw in self._redis.hgetall(API_KEYS_KEY).items():
            info = ApiKeyInfo.model_validate_json(raw)
            if info.key_id == key_id:
                self._redis.hdel(API_KEYS_KEY, digest)
                return info
        return None


async def tenant_of_key(client: redis.asyncio.Redis, key: str) -> str | None:
    """The tenant of ``key``, or None if it is no (longer a) valid key. One ``HGET``: revocation is immediate."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    raw = await client.hget(API_KEYS_KEY, key_hash(key))
    if raw is None:
        return None
    tenant: str = json.loads(raw)["tenant"]
    return tenant
