"""The most a request can cost, before it runs: what a spend budget reserves (``inferpool.state.budgets``).

Prompt tokens are bounded by the prompt's UTF-8 bytes (a byte-level BPE token is at least one byte; a
SentencePiece one at least one character) plus a chat template's tokens (``TEMPLATE_TOKENS`` per message and
per request) and ``IMAGE_TOKENS`` per image; completion tokens by ``max_tokens`` (else the model's largest
output), per choice and per prompt. So the reservation holds more than the request will spend (about 4x the
prompt's cost for English text, and its whole ``max_tokens``) until its answer settles it.
"""

from __future__ import annotations

import math

from inferpool.model_registry.spec import ModelSpec, Pricing
from inferpool.wire import AnyRequest, ChatRequest, CompletionRequest

TEMPLATE_TOKENS = 16
IMAGE_TOKENS = 4096


def max_tokens(spec: ModelSpec, request: AnyRequest) -> tuple[int, int]:
    """(most prompt tokens, most completion tokens) ``request`` can take on ``spec``."""
    if isinstance(request, ChatRequest):
        prompt = sum(len(message.text().encode()) + TEMPLATE_TOKENS for message in request.messages)
        prompt += TEMPLATE_TOKENS + IMAGE_TOKENS * sum(_images(message) for message in request.messages)
        output = (request.output_limit() or spec.capabilities.max_output_tokens) * request.n
        return prompt, output
    if isinstance(request, CompletionRequest):
        prompts = request.prompts()
        prompt = sum(len(text.encode()) + TEMPLATE_TOKENS for text in prompts)
        output = (request.output_limit() or spec.capabilities.max_output_tokens) * request.n * len(prompts)
        return prompt, output
    inputs = request.inputs()
    return sum(len(item.encode()) if isinstance(item, str) else len(item) for item in inputs), 0


def max_cost_nanos(spec: ModelSpec, request: AnyRequest, pricing: Pricing | None = None) -> int:
    """The most ``request`` can cost on ``spec`` at ``pricing`` (default: the model's), in nano-USD, rounded up."""
    price = pricing or spec.pricing
    prompt, output = max_tokens(spec, request)
    return math.ceil((prompt * price.input_per_mtok + output * price.output_per_mtok) * 1000)  # $/Mtok -> nano-USD


def line_costs(spec: ModelSpec, request: AnyRequest) -> str:
    """What a batch line stores for its budget: the most it can cost at the real-time price, and at the batch price
    when the model may use its provider's Batch API (``REALTIME,BATCH``), in nano-USD."""
    realtime = max_cost_nanos(spec, request)
    if spec.batch_api is None or not spec.batch_api.enabled:
        return str(realtime)
    return f"{realtime},{max_cost_nanos(spec, request, spec.batch_api.price(spec.pricing))}"


def _images(message: object) -> int:
    content = getattr(message, "content", None)
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if getattr(part, "type", None) == "image_url"
               or (isinstance(part, dict) and part.get("type") == "image_url"))  # fmt: skip
