"""Usage as clients read it: one row per model (and tenant), with tokens, cost and latency percentiles."""

from __future__ import annotations

from pydantic import BaseModel


class ModelUsage(BaseModel):
    model: str
    tenant: str | None = None
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    retried: int = 0
    cache_hits: int = 0
    saved_usd: float = 0.0
    prefix_cached_tokens: int = 0  # prompt tokens the engines found in their prefix caches
    latency_sum_s: float = 0.0
    latency_histogram: dict[float, int] = {}
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    ttft_sum_s: float = 0.0
    ttft_histogram: dict[float, int] = {}

    @property
    def ttft_count(self) -> int:
        """Answers whose time to first token was measured."""
        return sum(self.ttft_histogram.values())

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """The share of prompt tokens whose prefill the engines skipped (None before any prompt token)."""
        return self.prefix_cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
