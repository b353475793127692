"""Models their provider says do not exist (for the key in use): recorded by the workers that detected it, read
by ``inferpool models`` and the gateway. Such a worker stops its heartbeat, so routing sees no live worker."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis

from inferpool.constants import model_availability_key
from inferpool.state.heartbeats import withdraw


def mark_unavailable(client: redis.Redis, model: str, record: dict[str, Any], ttl_s: int) -> None:
    """Say ``model`` is unavailable (why, by which detector, when) for ``ttl_s`` unless said again."""
    client.set(model_availability_key(model), json.dumps(record), ex=ttl_s)


def mark_available(client: redis.Redis, model: str) -> None:
    client.delete(model_availability_key(model))


def publish_availability(client: redis.Redis, model: str, worker_id: str, available: bool) -> None:
    """A worker's detection flipped: available again clears the record (its next beat rejoins routing);
    unavailable ends its heartbeat at once (its beats then renew only the record of why)."""
    if available:
        mark_available(client, model)
    else:
        withdraw(client, model, worker_id)


def read_unavailable(client: redis.Redis, models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The unavailable ones among ``models``, with their record, in one round trip."""
    if not models:
        return {}
    raw: Any = client.mget([model_availability_key(model) for model in models])
    found: dict[str, dict[str, Any]] = {}
    for model, value in zip(models, raw, strict=True):
        if value is None:
            continue
        try:
            record = json.loads(value)
        except ValueError:
            continue
        if isinstance(record, dict):
            found[model] = record
    return found
