"""What the local-model backends (transformers, vLLM) share: where the checkpoint comes from, the chat
prompt, the context-window check and LoRA adapter selection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferpool._exceptions import ContextLengthExceeded, InvalidRequest, ModelLoadError
from inferpool.constants import split_adapter
from inferpool.model_registry.checkpoints import ensure_hf_checkpoint, package_dir, package_file
from inferpool.model_registry.spec import ModelSpec
from inferpool.wire import AnyRequest, ChatMessage, ChatRequest, CompletionRequest
from inferpool.workers.local_tools import tools_prompt


class CheckpointParams(BaseModel):
    """Registry ``params`` naming a local model: a checkpoint directory (or one a Python package ships), or a
    GGUF file to convert once."""

    model_config = ConfigDict(extra="forbid")
    path: Path | None = Field(default=None, description="A Hugging Face checkpoint directory.")
    package: str | None = Field(default=None, description="A Python package that ships a checkpoint directory.")
    package_dir: str = Field(default="model", description="The checkpoint's directory inside ``package``.")
    gguf_path: Path | None = Field(default=None, description="A GGUF file, converted once into the cache.")
    gguf_package: str | None = Field(default=None, description="Python package that ships the GGUF file.")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside gguf_package.")

    @model_validator(mode="after")
    def _one_source(self) -> CheckpointParams:
        sources = [self.path, self.package, self.gguf_path, self.gguf_package]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("give exactly one of path, package (+ package_dir), gguf_path or gguf_package "
                             "(+ gguf_file)")  # fmt: skip
        if self.gguf_package is not None and not self.gguf_file:
            raise ValueError("gguf_package needs gguf_file")
        return self

    def checkpoint_dir(self, cache_dir: Path) -> Path:
        if self.package is not None:
            return package_dir(self.package, self.package_dir)
        if self.path is not None:
            if not self.path.is_dir():
                raise ModelLoadError(f"checkpoint directory {self.path} does not exist")
            return self.path
        gguf = self.gguf_path
        if gguf is None:
            assert self.gguf_package is not None
            assert self.gguf_file is not None
            gguf = package_file(self.gguf_package, self.gguf_file)
        elif not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} does not exist")
        return ensure_hf_checkpoint(gguf, cache_dir)


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
