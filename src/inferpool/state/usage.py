"""Usage per model: tokens, cost, latency and time to first token, from a job's or a day's Redis counters.

Latency and time-to-first-token (TTFT) percentiles come from fixed histograms (bucket upper bounds below),
so a 100k-request job keeps a few dozen numbers, not 100k latencies; they are accurate to the bucket.
TTFT is counted only for answers whose backend could observe it (see ``Generation.first_token_at``).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterable, Mapping

import redis

from inferpool.constants import (
    usage_day_key,
)
from inferpool.plumbing.redis_connection import decode_text
from inferpool.wire import ModelUsage

#: Upper bounds, in seconds, of the latency histogram buckets ("inf" catches the rest).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)


def latency_bucket(seconds: float) -> str:
    """The histogram bucket (its upper bound, as text) that ``seconds`` falls in."""
    index = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
    return "inf" if index == len(LATENCY_BUCKETS_S) else repr(LATENCY_BUCKETS_S[index])


def histogram_percentile(histogram: Mapping[float, int], q: float) -> float | None:
    total = sum(histogram.values())
    if total == 0:
        return None
    seen = 0
    for bound in sorted(histogram):
        seen += histogram[bound]
        if seen >= q * total:
            return bound
    return max(histogram)


#: The histograms kept per model: counter ``<kind>|<bucket bound>``, plus ``<kind>_sum``.
_HISTOGRAMS = ("latency", "ttft")


def usage_from_counters(counters: Mapping[str, str], *, by_tenant: bool = False) -> list[ModelUsage]:
    """Usage rows from a counters hash: ``<model>|<counter>`` (a job's), or with ``by_tenant``
    ``<tenant>|<model>|<counter>`` (a day's); see ``inferpool.state.results``."""
    rows: dict[tuple[str | None, str], ModelUsage] = {}
    histograms: dict[tuple[str, str | None, str], dict[float, int]] = {}
    for field, value in counters.items():
        tenant: str | None = None
        if by_tenant:
            tenant, _, field = field.partition("|")
        model, _, counter = field.partition("|")
        key = (tenant, model)
        row = rows.setdefault(key, ModelUsage(model=model, tenant=tenant))
        kind, _, bound = counter.partition("|")
        if kind in _HISTOGRAMS and bound:
            histograms.setdefault((kind, tenant, model), {})[float(bound)] = int(value)
        elif counter in ("cost_usd", "saved_usd"):
            setattr(row, counter, float(value))
        elif counter in ("latency_sum", "ttft_sum"):
            setattr(row, f"{counter}_s", float(value))
        elif counter in ("retried", "cache_hits", "prefix_cached_tokens") or counter in (
            "requests",
            "errors",
            "prompt_tokens",
            "completion_tokens",
        ):
            setattr(row, counter, int(value))
    for (kind, tenant, model), histogram in histograms.items():
        row = rows[(tenant, model)]
        setattr(row, f"{kind}_histogram", dict(sorted(histogram.items())))
        setattr(row, f"{kind}_p50_s", histogram_percentile(histogram, 0.50))
        setattr(row, f"{kind}_p95_s", histogram_percentile(histogram, 0.95))
    return sorted(rows.values(), key=lambda r: (r.tenant or "", r.model))


def merge_usage(rows: Iterable[ModelUsage]) -> list[ModelUsage]:
    """Add up rows of the same (tenant, model), e.g. several days. Percentiles are not additive: the
    merged row keeps the largest p50/p95 of its parts (an upper bound)."""
    merged: dict[tuple[str | None, str], ModelUsage] = {}
    for row in rows:
        key = (row.tenant, row.model)
        if key not in merged:
            merged[key] = row.model_copy(
                update={"latency_histogram": dict(row.latency_histogram), "ttft_histogram": dict(row.ttft_histogram)}
            )
            continue
        total = merged[key]
        for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "retried",
                     "cache_hits", "saved_usd", "latency_sum_s", "ttft_sum_s", "prefix_cached_tokens"):  # fmt: skip
            setattr(total, name, getattr(total, name) + getattr(row, name))
        for kind in _HISTOGRAMS:
            histogram: dict[float, int] = getattr(total, f"{kind}_histogram")
            for bound, count in getattr(row, f"{kind}_histogram").items():
                histogram[bound] = histogram.get(bound, 0) + count
            for name in (f"{kind}_p50_s", f"{kind}_p95_s"):
                values = [v for v in (getattr(total, name), getattr(row, name)) if v is not None]
                setattr(total, name, max(values) if values else None)
    return sorted(merged.values(), key=lambda r: (r.tenant or "", r.model))


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
