"""What the local-model backends (transformers, vLLM) share: where the checkpoint comes from, the chat
prompt, the context-window check and LoRA adapter selection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inferpool._exceptions import ContextLengthExceeded, InvalidRequest
from inferpool.constants import split_adapter
from inferpool.model_registry.spec import ModelSpec
from inferpool.wire import AnyRequest, ChatMessage, ChatRequest, CompletionRequest
from inferpool.workers.local_tools import tools_prompt


def torch_device(requested: str, torch: Any) -> str:
    """The device a model loads on: ``auto`` is CUDA where there is one, else the CPU."""
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def module_bytes(model: Any) -> int:
    """What a loaded torch module holds on its device: its weights and buffers (adapters included)."""
    return int(sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())))


def chat_prompt_ids(tokenizer: Any, request: ChatRequest) -> list[int]:
    """The request's messages through the model's chat template, ending with the assistant's turn. An
    assistant's tool calls are shown as their JSON; tools go to templates that render them, else into a
    first system message."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
                for m in request.messages]  # fmt: skip
    extra: dict[str, Any] = {}
    if request.tools and request.tool_choice != "none":
        if "tools" in str(getattr(tokenizer, "chat_template", "") or ""):
            extra["tools"] = request.tools
        else:
            messages.insert(0, {"role": "system", "content": tools_prompt(request)})
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    except Exception as exc:  # jinja template errors carry the useful message
        raise InvalidRequest(f"the model's chat template rejected these messages: {exc}") from exc
    ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids


def _message_text(message: ChatMessage) -> str:
    if message.role == "assistant" and message.tool_calls and not message.text():
        return json.dumps([call.get("function") for call in message.tool_calls])
    return message.text()


def output_budget(spec: ModelSpec, request: ChatRequest | CompletionRequest, prompt_tokens: int,
                  context_window: int) -> int:  # fmt: skip
    """The request's max new tokens, or ``ContextLengthExceeded`` if prompt plus output cannot fit."""
    max_new = request.output_limit() or spec.capabilities.default_max_tokens
    if prompt_tokens + max_new > context_window:
        raise ContextLengthExceeded(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {max_new}, more than model "
            f"{spec.name!r}'s context window of {context_window}; shorten the prompt or lower max_tokens"
        )
    return max_new


def requested_adapter(spec: ModelSpec, request: AnyRequest) -> tuple[str, Path] | None:
    """The LoRA adapter (name, path) a request selects with ``model: "<model>:<adapter>"``, or None."""
    adapter = split_adapter(request.model)[1]
    if adapter is None:
        return None
    path = spec.lora_adapters.get(adapter)
    if path is None:
        known = ", ".join(sorted(spec.lora_adapters)) or "(none)"
        raise InvalidRequest(f"model {spec.name!r} has no LoRA adapter {adapter!r}; its adapters: {known}")
    return adapter, path
