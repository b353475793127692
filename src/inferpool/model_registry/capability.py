"""Checking a request against what a model can do, before it is queued and again on the worker."""

from __future__ import annotations

from inferpool._exceptions import CapabilityMismatch, InvalidRequest
from inferpool.model_registry.spec import ModelSpec
from inferpool.wire import ChatRequest


def check_request_fits(spec: ModelSpec, request: ChatRequest) -> None:
    """Raise ``CapabilityMismatch`` or ``InvalidRequest`` if ``spec`` cannot serve ``request``.

    The context-window check needs the model's tokenizer, so the backend makes it.
    """
    caps = spec.capabilities
    if not caps.vision and any(message.has_images() for message in request.messages):
        raise CapabilityMismatch(f"model {spec.name!r} does not accept images (capability 'vision' is missing)")
    if request.tools and not caps.tools:
        raise CapabilityMismatch(f"model {spec.name!r} does not support tools (capability 'tools' is missing)")
    if request.response_format and request.response_format.get("type", "text") != "text" and not caps.json_mode:
        raise CapabilityMismatch(
            f"model {spec.name!r} does not support response_format (capability 'json_mode' is missing)"
        )
    if request.logprobs and not caps.logprobs:
        raise CapabilityMismatch(f"model {spec.name!r} does not return logprobs (capability 'logprobs' is missing)")
    if request.n > caps.max_n:
        raise InvalidRequest(f"n={request.n} is more than model {spec.name!r} serves (max_n={caps.max_n}); lower n")
    limit = request.output_limit()
    if limit is not None and limit > caps.max_output_tokens:
        raise InvalidRequest(
            f"max_tokens={limit} is larger than model {spec.name!r} allows ({caps.max_output_tokens}); lower it"
        )
