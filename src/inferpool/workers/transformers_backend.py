"""The Hugging Face transformers backend.

The model is loaded once, in the process that serves it, and every ``generate`` call runs on one
dedicated thread (a transformers model is not safe to call from several threads at once). Requests that
arrive together are grouped by sampling settings, left-padded and generated in one batch; per-request
``max_tokens`` and stop sequences are applied to each row afterwards.
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferpool._exceptions import ContextLengthExceeded, InvalidRequest, ModelLoadError, RequestError
from inferpool.model_registry.checkpoints import ensure_hf_checkpoint, package_file
from inferpool.model_registry.spec import ModelSpec
from inferpool.settings import Settings
from inferpool.wire import ChatRequest, FinishReason
from inferpool.workers.backend import Generation, GenerationOutcome


class TransformersParams(BaseModel):
    """Registry ``params`` for the transformers backend: a checkpoint directory, or a GGUF file to convert."""

    model_config = ConfigDict(extra="forbid")
    path: Path | None = Field(default=None, description="A Hugging Face checkpoint directory.")
    gguf_path: Path | None = Field(default=None, description="A GGUF file, converted once into the cache.")
    gguf_package: str | None = Field(default=None, description="Python package that ships the GGUF file.")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside gguf_package.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field(default="auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'...")
    max_batch_size: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> TransformersParams:
        sources = [self.path is not None, self.gguf_path is not None, self.gguf_package is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one of path, gguf_path or gguf_package (+ gguf_file)")
        if self.gguf_package is not None and not self.gguf_file:
            raise ValueError("gguf_package needs gguf_file")
        return self

    def checkpoint_dir(self, cache_dir: Path) -> Path:
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


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float
    seed: int | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class _Prepared:
    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    stops: list[str]
    sampling: _Sampling


class TransformersBackend:
    name = "transformers"

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.spec = spec
        try:
            self.params = TransformersParams.model_validate(spec.params)
        except ValueError as exc:
            raise ModelLoadError(f"model {spec.name!r}: invalid transformers params: {exc}") from exc
        checkpoint = self.params.checkpoint_dir(settings.cache_dir)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        device = self.params.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = self.params.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(checkpoint)
            model: Any = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype_name))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {spec.name!r}: cannot load checkpoint {checkpoint}: {exc}") from exc
        self.model: Any = model.to(device).eval()
        self.device = device
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self._eos_ids = {int(e) for e in eos_ids if e is not None} | {int(self.tokenizer.eos_token_id)}
        model_window = getattr(self.model.config, "max_position_embeddings", None) or spec.capabilities.context_window
        self.context_window = min(spec.capabilities.context_window, int(model_window))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"generate-{spec.name}")

    async def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationOutcome]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._generate_blocking, list(requests))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True)

    # -- blocking part, always on the backend's single generate thread --------------------------------

    def _generate_blocking(self, requests: list[ChatRequest]) -> list[GenerationOutcome]:
        outcomes: dict[int, GenerationOutcome] = {}
        groups: dict[_Sampling, list[_Prepared]] = defaultdict(list)
        for index, request in enumerate(requests):
            try:
                prepared = self._prepare(index, request)
            except RequestError as exc:
                outcomes[index] = exc
                continue
            groups[prepared.sampling].append(prepared)
        size = self.params.max_batch_size
        for members in groups.values():
            for start in range(0, len(members), size):
                outcomes.update(self._run_batch(members[start : start + size]))
        return [outcomes[i] for i in range(len(requests))]

    def _prepare(self, index: int, request: ChatRequest) -> _Prepared:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(request, name):
                raise InvalidRequest(f"{name} is not supported by the transformers backend; leave it out or set 0")
        if request.logprobs:
            raise InvalidRequest("logprobs are not supported by the transformers backend; leave them out")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
        ]
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja template errors carry the useful message
            raise InvalidRequest(f"the model's chat template rejected these messages: {exc}") from exc
        prompt_ids: list[int] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        max_new = request.output_limit() or self.spec.capabilities.default_max_tokens
        if len(prompt_ids) + max_new > self.context_window:
            raise ContextLengthExceeded(
                f"the prompt is {len(prompt_ids)} tokens and max_tokens is {max_new}, more than model "
                f"{self.spec.name!r}'s context window of {self.context_window}; shorten the prompt or lower max_tokens"
            )
        temperature = 1.0 if request.temperature is None else request.temperature
        sampling = _Sampling(temperature=temperature, top_p=request.top_p or 1.0, seed=request.seed)
        return _Prepared(index, prompt_ids, max_new, request.stop_sequences(), sampling)

    def _run_batch(self, batch: list[_Prepared]) -> dict[int, GenerationOutcome]:
        torch = self._torch
        width = max(len(p.prompt_ids) for p in batch)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.tensor([[pad] * (width - len(p.prompt_ids)) + p.prompt_ids for p in batch])
        mask = torch.tensor([[0] * (width - len(p.prompt_ids)) + [1] * len(p.prompt_ids) for p in batch])
        sampling = batch[0].sampling
        kwargs: dict[str, Any] = {"max_new_tokens": max(p.max_new_tokens for p in batch), "pad_token_id": pad}
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            )
        new_tokens = output[:, width:].tolist()
        return {p.index: self._finish(p, tokens) for p, tokens in zip(batch, new_tokens, strict=True)}

    def _finish(self, prepared: _Prepared, tokens: list[int]) -> Generation:
        tokens = tokens[: prepared.max_new_tokens]
        finish: FinishReason = "length"
        for position, token in enumerate(tokens):
            if token in self._eos_ids:
                tokens, finish = tokens[: position + 1], "stop"
                break
        text: str = self.tokenizer.decode(tokens, skip_special_tokens=True)
        completion_tokens = len(tokens)
        cuts = [text.find(stop) for stop in prepared.stops if stop in text]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
            completion_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Generation(
            text=text,
            finish_reason=finish,
            prompt_tokens=len(prepared.prompt_ids),
            completion_tokens=completion_tokens,
        )
