"""Which path a batch job's lines for a model take: the real-time API, or the provider's own Batch API.

A job asks with ``via`` (``--via``): ``realtime``; ``provider-batch`` (lines of a model that cannot use it
end with ``provider_batch_unavailable``); or ``auto`` (the default), which takes the Batch API only where
the registry enables it for the model (``batch_api.enabled``), the job's completion window is at least the
providers' 24 h, and the job has at least ``batch_api.min_lines`` lines for the model. The choice and its
reason are recorded on the job per model and shown by ``inferpool batch status``.
"""

from __future__ import annotations

from inferpool.model_registry.spec import ModelSpec
from inferpool.wire import ViaChoice

#: The providers' own limits per batch: (requests, bytes of input).
PROVIDER_LIMITS: dict[str, tuple[int, int]] = {
    "openai": (50_000, 200 * 1024 * 1024),
    "anthropic": (100_000, 256 * 1024 * 1024),
}
_DAY_S = 24 * 3600


def batch_provider(spec: ModelSpec) -> str | None:
    """The provider whose Batch API serves the model (``openai``, ``anthropic``), if any."""
    return spec.backend if spec.backend in PROVIDER_LIMITS else None


def batch_limits(spec: ModelSpec) -> tuple[int, int]:
    """(requests, bytes) one provider batch of the model may hold: the provider's, or lower if the registry
    says so."""
    requests, size = PROVIDER_LIMITS[batch_provider(spec) or "openai"]
    api = spec.batch_api
    if api is not None:
        requests = min(requests, api.max_requests or requests)
        size = min(size, api.max_bytes or size)
    return requests, size


def unavailable_reason(spec: ModelSpec) -> str | None:
    """Why the model cannot use a provider Batch API (None: it can)."""
    if batch_provider(spec) is None:
        return f"its backend {spec.backend!r} has no provider Batch API (OpenAI and Anthropic models have)"
    if spec.batch_api is None or not spec.batch_api.enabled:
        return "the registry does not enable it for this model (batch_api: {enabled: true})"
    return None


def waits_for_upload(spec: ModelSpec, via: str) -> bool:
    """Whether a job's lines for the model wait for its upload to end before their path is chosen: where
    they may go to the provider's Batch API (``auto`` needs the line count, and batches are formed whole)."""
    return via != "realtime" and unavailable_reason(spec) is None


def choose_via(spec: ModelSpec, via: str, window_s: float, lines: int) -> ViaChoice:
    """The path of ``lines`` lines of a job for ``spec``."""
    if via == "realtime":
        return ViaChoice(via="realtime", reason="asked for (--via realtime)")
    why_not = unavailable_reason(spec)
    if via == "provider-batch":
        if why_not is not None:
            return ViaChoice(via="unavailable", reason=f"model {spec.name!r} cannot use its provider's Batch API: "
                              f"{why_not}; submit the job with --via auto or --via realtime")  # fmt: skip
        return ViaChoice(via="provider-batch", reason=f"asked for (--via provider-batch); {_prices(spec)}")
    if why_not is not None:
        return ViaChoice(via="realtime", reason=f"auto: {why_not}")
    assert spec.batch_api is not None
    if window_s < _DAY_S:
        return ViaChoice(via="realtime", reason=f"auto: the job's completion window ({window_s / 3600:g} h) is "
                          "shorter than the providers' 24 h batch window")  # fmt: skip
    if lines < spec.batch_api.min_lines:
        return ViaChoice(via="realtime", reason=f"auto: {lines} lines, fewer than the model's batch_api.min_lines "
                          f"({spec.batch_api.min_lines})")  # fmt: skip
    return ViaChoice(via="provider-batch", reason=f"auto: {lines} lines, a 24 h window; {_prices(spec)}")


def _prices(spec: ModelSpec) -> str:
    assert spec.batch_api is not None
    batch, realtime = spec.batch_api.price(spec.pricing), spec.pricing
    return (f"batch price ${batch.input_per_mtok:g}/${batch.output_per_mtok:g} per Mtok in/out against "
            f"${realtime.input_per_mtok:g}/${realtime.output_per_mtok:g} real-time")  # fmt: skip
