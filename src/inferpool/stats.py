"""Reading usage aggregates: per UTC day, tenant and model (and per job, in ``jobstore``)."""

from __future__ import annotations

import datetime as dt

import redis
from pydantic import BaseModel

from inferpool.constants import (
    MODEL_INFLIGHT_KEY,
    MODEL_LATENCY_KEY,
    model_queues,
    usage_day_key,
)
from inferpool.heartbeats import count_live_workers_many
from inferpool.redis_connection import decode_text
from inferpool.usage import ModelUsage, histogram_percentile, merge_usage, usage_from_counters


class ModelLoad(BaseModel):
    """What a model has waiting and running now, and who serves it."""

    model: str
    queue_depth: int = 0
    in_flight: int = 0
    live_workers: int = 0


def read_latency_p50(client: redis.Redis) -> dict[str, float]:
    """Each model's all-time p50 latency (s, a histogram bucket bound), over every tenant: one small hash
    (models x buckets), never the tenants' usage."""
    histograms: dict[str, dict[float, int]] = {}
    for field, count in client.hgetall(MODEL_LATENCY_KEY).items():
        model, _, bucket = decode_text(field).rpartition("|")
        try:
            bound = float(bucket)
        except ValueError:
            continue
        histograms.setdefault(model, {})[bound] = int(count)
    p50 = {model: histogram_percentile(histogram, 0.5) for model, histogram in histograms.items()}
    return {model: value for model, value in p50.items() if value is not None}


def read_model_load(client: redis.Redis, models: list[str]) -> list[ModelLoad]:
    """Per model: chunk tasks waiting in its queues (all priorities), batch requests dispatched and not
    yet answered, and workers whose heartbeat has not expired."""
    pipe = client.pipeline(transaction=False)
    for model in models:
        for queue in model_queues(model):
            pipe.llen(queue)
    lengths = pipe.execute()
    per_model = len(lengths) // len(models) if models else 0
    inflight = {decode_text(k): int(v) for k, v in client.hgetall(MODEL_INFLIGHT_KEY).items()}
    live = count_live_workers_many(client, models)
    return [
        ModelLoad(
            model=model,
            queue_depth=sum(lengths[index * per_model : (index + 1) * per_model]),
            in_flight=inflight.get(model, 0),
            live_workers=live[model],
        )
        for index, model in enumerate(models)
    ]


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
