"""What each model has waiting, running and serving it now, and how fast it answers: the live view routing reads."""

from __future__ import annotations

import redis
from pydantic import BaseModel

from inferpool.constants import (
    MODEL_INFLIGHT_KEY,
    MODEL_LATENCY_KEY,
    model_queues,
)
from inferpool.plumbing.redis_connection import decode_text
from inferpool.state.heartbeats import count_live_workers_many, detected_windows
from inferpool.state.usage import histogram_percentile


class ModelLoad(BaseModel):
    """What a model has waiting and running now, and who serves it."""

    model: str
    queue_depth: int = 0
    in_flight: int = 0
    live_workers: int = 0
    context_window: int | None = None  # the smallest window the live workers' engines accept, as they detected


def _latency_histograms(client: redis.Redis) -> dict[str, dict[float, int]]:
    """Each model's all-time latency histogram over every tenant: one small hash (models x buckets), never the
    tenants' usage."""
    histograms: dict[str, dict[float, int]] = {}
    for field, count in client.hgetall(MODEL_LATENCY_KEY).items():
        model, _, bucket = decode_text(field).rpartition("|")
        try:
            bound = float(bucket)
        except ValueError:
            continue
        histograms.setdefault(model, {})[bound] = int(count)
    return histograms


def read_answered(client: redis.Redis) -> dict[str, int]:
    """Each model's all-time count of results (its latency histogram's total): sampled twice, a service rate."""
    return {model: sum(histogram.values()) for model, histogram in _latency_histograms(client).items()}


def read_latency_p50(client: redis.Redis) -> dict[str, float]:
    """Each model's all-time p50 latency (s, a histogram bucket bound)."""
    histograms = _latency_histograms(client)
    p50 = {model: histogram_percentile(histogram, 0.5) for model, histogram in histograms.items()}
    return {model: value for model, value in p50.items() if value is not None}


def read_model_load(client: redis.Redis, models: list[str]) -> list[ModelLoad]:
    """Per model: chunk tasks waiting in its queues (all priorities), batch requests dispatched and not
    yet answered, workers whose heartbeat has not expired, and the smallest window their engines accept."""
    pipe = client.pipeline(transaction=False)
    for model in models:
        for queue in model_queues(model):
            pipe.llen(queue)
    lengths = pipe.execute()
    per_model = len(lengths) // len(models) if models else 0
    inflight = {decode_text(k): int(v) for k, v in client.hgetall(MODEL_INFLIGHT_KEY).items()}
    live = count_live_workers_many(client, models)
    windows = detected_windows(client, models)
    return [
        ModelLoad(
            model=model,
            queue_depth=sum(lengths[index * per_model : (index + 1) * per_model]),
            in_flight=inflight.get(model, 0),
            live_workers=live[model],
            context_window=windows[model],
        )
        for index, model in enumerate(models)
    ]
