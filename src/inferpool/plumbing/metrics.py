"""Prometheus metrics for the whole pool, read from Redis at each scrape.

Served by one process (the scheduler, with ``--metrics-port``), never by Celery children: every number
comes from Redis, where workers count each request once (``inferpool.state.results``), so any number of
worker processes report through one endpoint without per-process registries. Tokens per second and
cost per hour are ``rate()`` of the counters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from inferpool.constants import (
    JOBS_ACTIVE_KEY,
    USAGE_TOTAL_KEY,
)
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.redis_connection import decode_text
from inferpool.state.budgets import NANOS, Budgets
from inferpool.state.heartbeats import live_heartbeats, model_state
from inferpool.state.load import read_model_load
from inferpool.state.usage import merge_usage, usage_from_counters
from inferpool.wire import ModelUsage

_COUNTERS = (
    ("requests", "inferpool_requests", "Requests answered or failed, counted once each."),
    ("errors", "inferpool_request_errors", "Requests that ended with an error."),
    ("retried", "inferpool_requests_retried", "Requests that needed more than one attempt."),
    ("prompt_tokens", "inferpool_prompt_tokens", "Prompt tokens."),
    ("completion_tokens", "inferpool_completion_tokens", "Completion tokens."),
    ("cost_usd", "inferpool_cost_usd", "Cost in USD, from the registry's prices."),
    ("cache_hits", "inferpool_cache_hits", "Requests answered from the response cache (or an identical request)."),
    ("saved_usd", "inferpool_cache_saved_usd", "Cost the response cache saved, in USD."),
    (
        "prefix_cached_tokens",
        "inferpool_prompt_tokens_prefix_cached",
        "Prompt tokens the engines found in their prefix caches (their prefill was skipped).",
    ),
)


def _cumulative(histogram: dict[float, int]) -> list[tuple[str, float]]:
    """Prometheus histogram buckets (cumulative counts, ending in +Inf) from per-bucket counts."""
    cumulative, buckets = 0, []
    for bound, count in sorted(histogram.items()):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
    if not buckets or buckets[-1][0] != "+Inf":
        buckets.append(("+Inf", float(cumulative)))
    return buckets


#: The label under which tenants past the cap are summed.
OTHER_TENANTS = "other"


def cap_tenants(rows: list[ModelUsage], max_tenants: int) -> list[ModelUsage]:
    """Rows of the ``max_tenants`` tenants with the most requests; the others' rows summed per model under
    ``other``, so the label set stays bounded however many tenants there are."""
    totals: dict[str, int] = defaultdict(int)
    for row in rows:
        totals[row.tenant or ""] += row.requests
    if len(totals) <= max_tenants:
        return rows
    kept = set(sorted(totals, key=lambda tenant: (-totals[tenant], tenant))[:max_tenants])
    folded = [row.model_copy(update={"tenant": OTHER_TENANTS}) for row in rows if (row.tenant or "") not in kept]
    return [row for row in rows if (row.tenant or "") in kept] + merge_usage(folded)


class PoolCollector(Collector):
    """Collects the pool's metrics from Redis on every scrape."""

    def __init__(self, client: redis.Redis, registry: Registry, max_tenants: int = 50) -> None:
        self._redis = client
        self._registry = registry
        self._max_tenants = max_tenants

    def collect(self) -> Iterator[Metric]:
        counters = {decode_text(k): decode_text(v) for k, v in self._redis.hgetall(USAGE_TOTAL_KEY).items()}
        rows = cap_tenants(usage_from_counters(counters, by_tenant=True), self._max_tenants)
        labels = ["tenant", "model"]
        for field, name, documentation in _COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=labels)
            for row in rows:
                family.add_metric([row.tenant or "", row.model], float(getattr(row, field)))
            yield family
        latency = HistogramMetricFamily(
            "inferpool_request_latency_seconds", "Processing time per request (start to result).", labels=labels
        )
        ttft = HistogramMetricFamily(
            "inferpool_time_to_first_token_seconds",
            "Start of processing to first output token, for backends that can observe it.",
            labels=labels,
        )
        for row in rows:
            row_labels = [row.tenant or "", row.model]
            latency.add_metric(row_labels, _cumulative(row.latency_histogram), row.latency_sum_s)
            if row.ttft_histogram:
                ttft.add_metric(row_labels, _cumulative(row.ttft_histogram), row.ttft_sum_s)
        yield latency
        yield ttft
        yield from self._gauges()

    def _gauges(self) -> Iterator[Metric]:
        loads = read_model_load(self._redis, [spec.name for spec in self._registry])
        queue = GaugeMetricFamily(
            "inferpool_queue_depth", "Chunk tasks waiting in the model's queues (all priorities).", labels=["model"]
        )
        flight = GaugeMetricFamily(
            "inferpool_in_flight", "Batch requests dispatched, not yet answered.", labels=["model"]
        )
        workers = GaugeMetricFamily("inferpool_live_workers", "Workers with a live heartbeat.", labels=["model"])
        for load in loads:
            queue.add_metric([load.model], float(load.queue_depth))
            flight.add_metric([load.model], float(load.in_flight))
            workers.add_metric([load.model], float(load.live_workers))
        yield queue
        yield flight
        yield workers
        beats = {spec.name: live_heartbeats(self._redis, spec.name) for spec in self._registry}
        yield from self._engine_prefix_caches(beats)
        yield from self._residency(beats)
        yield GaugeMetricFamily("inferpool_batch_jobs_active", "Batch jobs not yet final.",
                                value=float(self._redis.zcard(JOBS_ACTIVE_KEY)))  # fmt: skip
        yield from self._budgets()

    def _budgets(self) -> Iterator[Metric]:
        """Each spend budget (operators set them: a bounded label set) and its current window's spend."""
        store = Budgets(self._redis)
        families = [GaugeMetricFamily(name, doc, labels=["scope"]) for name, doc in (
            ("inferpool_budget_usd", "A tenant's or key's spend budget for its window (USD)."),
            ("inferpool_budget_spent_usd", "Spent in the budget's current window (USD, settled results)."),
            ("inferpool_budget_held_usd", "Reserved by requests not yet answered (USD)."))]  # fmt: skip
        for scope, budget in sorted(store.all().items()):
            spent, held = store.spend(scope, budget)
            for family, value in zip(families, (budget.usd, spent / NANOS, held / NANOS), strict=True):
                family.add_metric([scope], value)
        yield from families

    def _engine_prefix_caches(self, beats_by_model: dict[str, dict[str, dict[str, Any]]]) -> Iterator[Metric]:
        """Each live worker's engine prefix-cache counters (prompt tokens looked up and found), from its heartbeat."""
        labels = ["model", "worker"]
        queries = CounterMetricFamily(
            "inferpool_engine_prefix_cache_queries_tokens",
            "Prompt tokens the worker's engine looked up in its prefix cache.",
            labels=labels,
        )
        hits = CounterMetricFamily(
            "inferpool_engine_prefix_cache_hits_tokens",
            "Prompt tokens the worker's engine found in its prefix cache.",
            labels=labels,
        )
        for model, beats in beats_by_model.items():
            for worker, fields in beats.items():
                stats = fields.get("prefix_cache")  # only engines with a prefix cache report one
                if isinstance(stats, dict):
                    queries.add_metric([model, worker], float(stats.get("queries", 0)))
                    hits.add_metric([model, worker], float(stats.get("hits", 0)))
        yield queries
        yield hits

    def _residency(self, beats_by_model: dict[str, dict[str, dict[str, Any]]]) -> Iterator[Metric]:
        """Where each model is warm, and what workers holding several models have loaded and unloaded."""
        warm = GaugeMetricFamily("inferpool_warm_workers", "Live workers holding the model loaded (warm).",
                                 labels=["model"])  # fmt: skip
        counters = {field: CounterMetricFamily(f"inferpool_worker_model_{name}", text, labels=["worker"])
                    for field, name, text in _RESIDENCY_COUNTERS}  # fmt: skip
        budgeted: dict[str, dict[str, Any]] = {}
        for model, beats in beats_by_model.items():
            warm.add_metric([model], float(sum(model_state(b) == "warm" for b in beats.values())))
            budgeted.update({worker: b for worker, b in beats.items() if "loads" in b})
        for worker, beat in sorted(budgeted.items()):
            for field, family in counters.items():
                family.add_metric([worker], float(beat.get(field, 0)))
        yield warm
        yield from counters.values()


#: Heartbeat field, metric name (inferpool_worker_model_*), help: what budgeted workers count.
_RESIDENCY_COUNTERS = [
    ("loads", "loads", "Models a budgeted worker loaded."),
    ("evictions", "evictions", "Models a budgeted worker let go to make room or after their keep-alive."),
    ("load_s", "load_seconds", "Seconds a budgeted worker spent loading models."),
    ("sleeps", "sleeps", "Models a budgeted worker put to sleep (host RAM) instead of unloading them."),
    ("wakes", "wakes", "Sleeping models a budgeted worker woke instead of loading them."),
    ("wake_s", "wake_seconds", "Seconds a budgeted worker spent waking models."),
]


def serve_metrics(
    port: int, client: redis.Redis, registry: Registry, addr: str = "127.0.0.1", *, max_tenants: int = 50
) -> None:
    """Serve ``/metrics`` on ``addr:port`` from a background thread."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(PoolCollector(client, registry, max_tenants))
    start_http_server(port, addr=addr, registry=collectors)
