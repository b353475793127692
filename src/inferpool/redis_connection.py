"""Connecting to Redis with one clear error when it is not there."""

from __future__ import annotations

import re
from typing import Any

import redis
import redis.asyncio

from inferpool._exceptions import RedisUnavailable

_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def _unavailable(url: str, exc: Exception) -> RedisUnavailable:
    return RedisUnavailable(
        f"cannot connect to Redis at {redact_url(url)} ({exc}). Start Redis there, point REDIS_URL at a running "
        "one, or run `inferpool batch run --local` to start a private Redis and workers."
    )


def decode_text(value: Any) -> str:
    """A Redis reply (bytes, or already str) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def redact_url(url: str) -> str:
    """``url`` with any password (``user:PASSWORD@`` or ``?password=``) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if sep:
        netloc, slash, path = rest.partition("/")
        credentials, at, host = netloc.rpartition("@")
        if at and ":" in credentials:
            netloc = f"{credentials.partition(':')[0]}:***@{host}"
        url = f"{scheme}{sep}{netloc}{slash}{path}"
    return _QUERY_PASSWORD.sub(r"\1***", url)


def connect_redis(url: str) -> redis.Redis:
    """A client for ``url``, checked with a ``PING``; raises ``RedisUnavailable`` if it does not answer."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        client.close()
        raise _unavailable(url, exc) from exc
    return client


async def connect_redis_async(url: str) -> redis.asyncio.Redis:
    """The asyncio twin of ``connect_redis``."""
    # Every concurrent waiter holds a connection while it blocks (BLPOP/XREAD, up to 1 s): a gateway at a few
    # hundred requests in flight needs that many; redis-py's default cap raised MaxConnectionsError at ~100.
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30,
                                          max_connections=4096)  # fmt: skip
    try:
        await client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        await client.aclose()
        raise _unavailable(url, exc) from exc
    return client
