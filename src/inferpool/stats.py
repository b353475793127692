"""Reading usage aggregates: per UTC day, tenant and model (and per job, in ``jobstore``)."""

from __future__ import annotations

import datetime as dt

import redis

from inferpool.constants import usage_day_key
from inferpool.redis_connection import decode_text
from inferpool.usage import ModelUsage, merge_usage, usage_from_counters


def read_usage(
    client: redis.Redis,
    since: dt.date,
    until: dt.date | None = None,
    *,
    model: str | None = None,
    tenant: str | None = None,
) -> list[ModelUsage]:
    """Usage from ``since`` to ``until`` (UTC days, inclusive; default today), one row per tenant and model."""
    until = until or dt.datetime.now(dt.UTC).date()
    days = [since + dt.timedelta(days=n) for n in range((until - since).days + 1)]
    pipe = client.pipeline(transaction=False)
    for day in days:
        pipe.hgetall(usage_day_key(day.isoformat()))
    rows: list[ModelUsage] = []
    for counters in pipe.execute():
        decoded = {decode_text(k): decode_text(v) for k, v in counters.items()}
        rows.extend(usage_from_counters(decoded, by_tenant=True))
    rows = [r for r in rows if (model is None or r.model == model) and (tenant is None or r.tenant == tenant)]
    return merge_usage(rows)
