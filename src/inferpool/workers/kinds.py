"""Calling a backend for any request kind: chat (``generate``), text completions (``complete``) and
embeddings (``embed``), and what every backend would otherwise do again for the last two.

- A completion with several prompts reaches the backend as one request per prompt; their answers are joined
  back into one, choices indexed prompt by prompt (``prompt_index * n + choice``), as OpenAI does. ``echo``
  puts each prompt in front of its choices' text (and, streamed, first on the stream).
- Embedding vectors longer than the request's ``dimensions`` are cut and renormalised (what OpenAI does for
  models trained for it; the registry allows it only for those).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from inferpool._exceptions import CapabilityMismatch, ProviderError, RequestError
from inferpool.state.streams import current_delta_sink
from inferpool.wire import AnyRequest, ChatRequest, CompletionRequest, EmbeddingRequest, pack_vector, unpack_vector
from inferpool.workers.backend import Backend, Embeddings, ExtraChoice, Generation, GenerationOutcome, Outcome


def serves(backend: Backend, kind: str) -> bool:
    """Whether ``backend`` has the method that answers ``kind``."""
    method = {"chat": "generate", "completions": "complete", "embeddings": "embed"}[kind]
    return callable(getattr(backend, method, None))


async def answer(backend: Backend, requests: Sequence[AnyRequest]) -> list[Outcome]:
    """Every request's outcome, in order; the requests may be of different kinds (one backend call per kind,
    run together)."""
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.kind, []).append(index)
    replies = await asyncio.gather(*(_answer_kind(backend, kind, [requests[i] for i in positions])
                                     for kind, positions in groups.items()))  # fmt: skip
    outcomes: list[Outcome | None] = [None] * len(requests)
    for positions, reply in zip(groups.values(), replies, strict=True):
        if len(reply) != len(positions):
            raise ProviderError(f"backend {backend.name!r} returned {len(reply)} answers for {len(positions)}")
        for index, outcome in zip(positions, reply, strict=True):
            outcomes[index] = outcome
    return [outcome for outcome in outcomes if outcome is not None]


async def _answer_kind(backend: Backend, kind: str, requests: list[AnyRequest]) -> Sequence[Outcome]:
    if not serves(backend, kind):
        return [CapabilityMismatch(f"backend {backend.name!r} does not serve {kind}")] * len(requests)
    if kind == "chat":
        return await backend.generate([r for r in requests if isinstance(r, ChatRequest)])
    if kind == "completions":
        return await _complete(backend, [r for r in requests if isinstance(r, CompletionRequest)])
    return await _embed(backend, [r for r in requests if isinstance(r, EmbeddingRequest)])


async def _complete(backend: Backend, requests: list[CompletionRequest]) -> list[Outcome]:
    """One backend request per prompt, joined back per request."""
    single = [request.model_copy(update={"prompt": prompt, "echo": None}) for request in requests
              for prompt in request.prompts()]  # fmt: skip
    sink = current_delta_sink()
    if sink is not None and len(requests) == 1 and requests[0].echo:
        sink.emit(requests[0].prompts()[0])  # the stream shows what the answer will: the prompt first
    replies: list[GenerationOutcome] = await backend.complete(single)  # type: ignore[attr-defined]
    if len(replies) != len(single):
        raise ProviderError(f"backend {backend.name!r} returned {len(replies)} answers for {len(single)}")
    joined: list[Outcome] = []
    position = 0
    for request in requests:
        prompts = request.prompts()
        parts = replies[position : position + len(prompts)]
        position += len(prompts)
        joined.append(_join(request, prompts, parts))
    return joined


def _join(request: CompletionRequest, prompts: list[str], parts: Sequence[GenerationOutcome]) -> GenerationOutcome:
    """One completion's answer from its prompts' answers (the first error, if any, is the request's)."""
    for part in parts:
        if isinstance(part, RequestError):
            return part
    generations = [part for part in parts if isinstance(part, Generation)]
    if len(generations) == 1 and not request.echo:
        return generations[0]
    choices: list[ExtraChoice] = []
    for prompt, generation in zip(prompts, generations, strict=True):
        lead = prompt if request.echo else ""
        choices.append(ExtraChoice(lead + generation.text, generation.finish_reason, generation.logprobs))
        choices.extend(ExtraChoice(lead + extra.text, extra.finish_reason, extra.logprobs)
                       for extra in generation.extra_choices)  # fmt: skip
    first = generations[0]
    cached = [g.cached_prompt_tokens for g in generations if g.cached_prompt_tokens is not None]
    return Generation(
        text=choices[0].text,
        finish_reason=choices[0].finish_reason,
        prompt_tokens=sum(g.prompt_tokens for g in generations),
        completion_tokens=sum(g.completion_tokens for g in generations),
        attempts=max(g.attempts for g in generations),
        first_token_at=first.first_token_at,
        logprobs=choices[0].logprobs,
        extra_choices=tuple(choices[1:]),
        cached_prompt_tokens=sum(cached) if cached else None,
    )


async def _embed(backend: Backend, requests: list[EmbeddingRequest]) -> list[Outcome]:
    replies: list[Outcome] = await backend.embed(requests)  # type: ignore[attr-defined]
    return [_shortened(request, reply) if isinstance(reply, Embeddings) else reply
            for request, reply in zip(requests, replies, strict=False)]  # fmt: skip


def _shortened(request: EmbeddingRequest, embeddings: Embeddings) -> Outcome:
    if len(embeddings.vectors) != len(request.inputs()):
        return ProviderError(f"the model returned {len(embeddings.vectors)} vectors for {len(request.inputs())} "
                             "inputs")  # fmt: skip
    wanted = request.dimensions
    if wanted is None:
        return embeddings
    vectors = []
    for packed in embeddings.vectors:
        values = unpack_vector(packed)
        if len(values) <= wanted:
            vectors.append(packed)
            continue
        cut = values[:wanted]
        norm = math.sqrt(sum(v * v for v in cut)) or 1.0
        vectors.append(pack_vector([v / norm for v in cut]))
    return Embeddings(tuple(vectors), embeddings.prompt_tokens, embeddings.attempts)


def completion_response(generation: Generation, model: str, created: int, response_id: str) -> dict[str, Any]:
    """The ``text_completion`` object of a completion's answer."""
    choices: tuple[Generation | ExtraChoice, ...] = (generation, *generation.extra_choices)
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": choice.text, "finish_reason": choice.finish_reason,
                         "logprobs": choice.logprobs} for index, choice in enumerate(choices)]}  # fmt: skip


def embeddings_response(embeddings: Embeddings, model: str, requested_format: str) -> dict[str, Any]:
    """The embeddings ``list`` object as stored: vectors packed, the format asked for remembered."""
    return {"object": "list", "model": model, "requested_format": requested_format,
            "data": [{"object": "embedding", "index": index, "embedding": vector}
                     for index, vector in enumerate(embeddings.vectors)],
            "usage": {"prompt_tokens": embeddings.prompt_tokens,
                      "total_tokens": embeddings.prompt_tokens}}  # fmt: skip
