"""Checking a request against what a model can do, before it is queued and again on the worker."""

from __future__ import annotations

from inferpool._exceptions import CapabilityMismatch, InvalidRequest
from inferpool.model_registry.spec import ModelSpec
from inferpool.wire import AnyRequest, ChatRequest, CompletionRequest, EmbeddingRequest

#: How each kind is named in messages.
KIND_NAMES = {"chat": "chat completions", "completions": "text completions (/v1/completions)",
              "embeddings": "embeddings (/v1/embeddings)"}  # fmt: skip


def serves_kind(spec: ModelSpec, kind: str) -> bool:
    return kind in spec.capabilities.kinds()


def check_request_fits(spec: ModelSpec, request: AnyRequest) -> None:
    """Raise ``CapabilityMismatch`` or ``InvalidRequest`` if ``spec`` cannot serve ``request``.

    The context-window check needs the model's tokenizer, so the backend makes it.
    """
    if not serves_kind(spec, request.kind):
        served = ", ".join(KIND_NAMES[kind] for kind in spec.capabilities.kinds()) or "nothing"
        raise CapabilityMismatch(f"model {spec.name!r} does not serve {KIND_NAMES[request.kind]} (it serves: "
                                 f"{served})")  # fmt: skip
    if isinstance(request, ChatRequest | CompletionRequest) and request.ignore_eos and spec.backend != "vllm":
        raise InvalidRequest(f"ignore_eos is vLLM's extension; model {spec.name!r} runs on {spec.backend!r}: remove "
                             "it")  # fmt: skip
    if isinstance(request, ChatRequest):
        _check_chat(spec, request)
    elif isinstance(request, CompletionRequest):
        _check_completion(spec, request)
    else:
        _check_embedding(spec, request)


def _check_chat(spec: ModelSpec, request: ChatRequest) -> None:
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
    _check_n_and_limit(spec, request.n, request.output_limit())


def _check_completion(spec: ModelSpec, request: CompletionRequest) -> None:
    caps = spec.capabilities
    if request.suffix is not None and not caps.suffix:
        raise InvalidRequest(f"model {spec.name!r} does not serve suffix (insert mode); remove it")
    if request.logprobs is not None and not caps.logprobs:
        raise CapabilityMismatch(f"model {spec.name!r} does not return logprobs (capability 'logprobs' is missing)")
    if request.best_of is not None and request.best_of > request.n:
        raise InvalidRequest(f"best_of={request.best_of} (more candidates than the n returned) is not served; use "
                             "n alone")  # fmt: skip
    if request.logit_bias:
        raise InvalidRequest(f"model {spec.name!r} does not serve logit_bias; remove it")
    _check_n_and_limit(spec, request.n, request.output_limit())


def _check_n_and_limit(spec: ModelSpec, n: int, limit: int | None) -> None:
    caps = spec.capabilities
    if n > caps.max_n:
        raise InvalidRequest(f"n={n} is more than model {spec.name!r} serves (max_n={caps.max_n}); lower n")
    if limit is not None and limit > caps.max_output_tokens:
        raise InvalidRequest(
            f"max_tokens={limit} is larger than model {spec.name!r} allows ({caps.max_output_tokens}); lower it"
        )


def _check_embedding(spec: ModelSpec, request: EmbeddingRequest) -> None:
    caps = spec.capabilities.embeddings
    assert caps is not None  # serves_kind said so
    count = len(request.inputs())
    if count > caps.max_inputs:
        raise InvalidRequest(f"{count} inputs in one request; model {spec.name!r} takes at most {caps.max_inputs}: "
                             "split them")  # fmt: skip
    wanted = request.dimensions
    if wanted is not None and wanted != caps.dimensions:
        if not caps.shorter_dimensions:
            raise InvalidRequest(f"model {spec.name!r} makes {caps.dimensions}-dimensional vectors and cannot change "
                                 "their size; remove dimensions")  # fmt: skip
        if wanted > caps.dimensions:
            raise InvalidRequest(f"dimensions={wanted} is more than model {spec.name!r} makes ({caps.dimensions})")
