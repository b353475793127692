"""Summing usage over results: tokens, cost (registry prices) and latency, per model."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from pydantic import BaseModel

from inferpool.model_registry.registry import Registry
from inferpool.wire import RequestResult


class ModelUsage(BaseModel):
    model: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize_usage(results: Iterable[RequestResult], registry: Registry) -> list[ModelUsage]:
    """Per-model usage over ``results`` (errors without a model are grouped under ``-``)."""
    rows: dict[str, ModelUsage] = {}
    latencies: dict[str, list[float]] = {}
    for result in results:
        model = result.stats.model if result.stats else "-"
        row = rows.setdefault(model, ModelUsage(model=model))
        row.requests += 1
        if result.stats:
            latencies.setdefault(model, []).append(result.stats.latency_s)
        usage = result.usage
        if usage is None:
            row.errors += 1
            continue
        row.prompt_tokens += usage.prompt_tokens
        row.completion_tokens += usage.completion_tokens
        if model in registry:
            row.cost_usd += registry.get(model).pricing.cost(usage.prompt_tokens, usage.completion_tokens)
    for model, values in latencies.items():
        rows[model].latency_p50_s = _percentile(values, 50)
        rows[model].latency_p95_s = _percentile(values, 95)
    return sorted(rows.values(), key=lambda r: r.model)
