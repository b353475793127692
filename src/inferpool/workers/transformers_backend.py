"""The Hugging Face transformers backend, with a dynamic batcher.

The model is loaded once, in the process that serves it. It serves chat (the prompt through the model's chat
template) and text completions (the prompt's tokens as they are). Every request, whichever chunk or thread it
came from, goes through one ``DynamicBatcher``: requests that arrive together (each within ``gap_ms`` of
the last, for at most ``max_wait_ms``, up to ``max_batch_size``) and share sampling settings and LoRA
adapter are left-padded and generated in one ``generate`` call. Inside a batch each row stops on its own
(its ``max_tokens``, its stop sequences, end of sequence) through a per-row stopping criterion, and the
batch ends when every row has stopped.
The first call of that criterion is the moment the batch's first tokens exist: time to first token.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from inferpool._exceptions import CapabilityMismatch, InvalidRequest, ModelLoadError, RequestError
from inferpool.model_registry.checkpoints import CheckpointParams
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings
from inferpool.wire import ChatRequest, CompletionRequest, FinishReason
from inferpool.workers.backend import Generation, GenerationOutcome, gather_outcomes, parse_params
from inferpool.workers.batcher import DynamicBatcher
from inferpool.workers.local_model import (
    chat_prompt_ids,
    module_bytes,
    output_budget,
    requested_adapter,
    torch_device,
)

log = logging.getLogger(__name__)


class TransformersParams(CheckpointParams):
    """Registry ``params`` for the transformers backend."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field(default="auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'...")
    max_batch_size: int = Field(default=8, ge=1, description="Most requests generated together.")
    max_wait_ms: float = Field(default=50.0, ge=0.0, description="Longest wait to fill a batch while requests arrive.")
    gap_ms: float = Field(default=5.0, ge=0.0, description="A batch starts when no request came for this long.")


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
    prompt_ids: list[int]
    max_new_tokens: int
    stops: list[str]
    sampling: _Sampling
    adapter: str | None

    @property
    def batch_key(self) -> tuple[_Sampling, str | None]:
        return self.sampling, self.adapter


class TransformersBackend:
    name = "transformers"

    @staticmethod
    def preload() -> None:
        """Import torch and transformers' model classes (seconds on a CPU) before the first load needs them."""
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.spec = spec
        self.params = parse_params(TransformersParams, spec, self.name)
        checkpoint = self.params.checkpoint_dir(settings.cache_dir)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        device = torch_device(self.params.device, torch)
        dtype_name = self.params.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(checkpoint)
            model: Any = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype_name))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {spec.name!r}: cannot load checkpoint {checkpoint}: {exc}") from exc
        self.model: Any = self._with_adapters(model.to(device)).eval()
        self._memory_bytes = module_bytes(self.model)
        self.device = device
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self._eos_ids = {int(e) for e in eos_ids if e is not None} | {int(self.tokenizer.eos_token_id)}
        model_window = getattr(self.model.config, "max_position_embeddings", None) or spec.capabilities.context_window
        self.context_window = min(spec.capabilities.context_window, int(model_window))
        self.batcher: DynamicBatcher[_Prepared, Generation] = DynamicBatcher(
            self._run_batch,
            key=lambda prepared: prepared.batch_key,
            max_batch_size=self.params.max_batch_size,
            max_wait_s=self.params.max_wait_ms / 1000,
            gap_s=self.params.gap_ms / 1000,
            name=f"generate-{spec.name}",
        )

    def _with_adapters(self, model: Any) -> Any:
        """Wrap ``model`` with the registry's LoRA adapters (peft), if it lists any."""
        if not self.spec.lora_adapters:
            return model
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise ModelLoadError(f"model {self.spec.name!r} lists LoRA adapters; install peft to serve them") from exc
        wrapped: Any = None
        for name, path in self.spec.lora_adapters.items():
            if not Path(path).is_dir():
                raise ModelLoadError(f"model {self.spec.name!r}: LoRA adapter {name!r}: {path} is not a directory")
            if wrapped is None:
                wrapped = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            else:
                wrapped.load_adapter(str(path), adapter_name=name)
        return wrapped

    def memory_bytes(self) -> int:
        """The model's weights and buffers, in bytes (for workers holding several models in a budget)."""
        return int(self._memory_bytes)

    async def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationOutcome]:
        return await gather_outcomes(self.name, (self._generate_one(request) for request in requests))

    async def complete(self, requests: Sequence[CompletionRequest]) -> list[GenerationOutcome]:
        """Text completions: one prompt each (``workers.kinds`` splits lists), tokenized as it is."""
        return await gather_outcomes(self.name, (self._generate_one(request) for request in requests))

    async def _generate_one(self, request: ChatRequest | CompletionRequest) -> GenerationOutcome:
        try:
            prepared = self._prepare(request)
        except RequestError as exc:
            return exc
        return await self.batcher.submit(prepared)

    async def aclose(self) -> None:
        self.batcher.close()

    def _prepare(self, request: ChatRequest | CompletionRequest) -> _Prepared:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(request, name):
                raise InvalidRequest(f"{name} is not supported by the transformers backend; leave it out or set 0")
        if isinstance(request, CompletionRequest):
            return self._prepared(request, self.tokenizer(request.prompt_text())["input_ids"])
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise InvalidRequest("response_format is not supported by the transformers backend; leave it out")
        if request.tools and request.tool_choice != "none":
            raise CapabilityMismatch("tool calls are not supported by the transformers backend; serve the model "
                                     "with vLLM, or send the request without tools")  # fmt: skip
        return self._prepared(request, chat_prompt_ids(self.tokenizer, request))

    def _prepared(self, request: ChatRequest | CompletionRequest, prompt_ids: list[int]) -> _Prepared:
        adapter = requested_adapter(self.spec, request)
        max_new = output_budget(self.spec, request, len(prompt_ids), self.context_window)
        temperature = 1.0 if request.temperature is None else request.temperature
        sampling = _Sampling(temperature=temperature, top_p=request.top_p or 1.0, seed=request.seed)
        return _Prepared(prompt_ids, max_new, request.stop_sequences(), sampling, adapter[0] if adapter else None)

    # -- on the batcher's thread -----------------------------------------------------------------------

    def _run_batch(self, batch: list[_Prepared]) -> list[Generation]:
        torch = self._torch
        width = max(len(p.prompt_ids) for p in batch)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.tensor([[pad] * (width - len(p.prompt_ids)) + p.prompt_ids for p in batch])
        mask = torch.tensor([[0] * (width - len(p.prompt_ids)) + [1] * len(p.prompt_ids) for p in batch])
        sampling, adapter = batch[0].batch_key
        rows = _RowStops(batch, width, self.tokenizer, torch)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(p.max_new_tokens for p in batch),
            "pad_token_id": pad,
            "stopping_criteria": [rows],
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        started = time.perf_counter()
        with torch.inference_mode(), self._adapter(adapter):
            output = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            )
        new_tokens = output[:, width:].tolist()
        log.info("generated a batch of %d (%d x %d tokens) in %.2f s", len(batch), len(batch), len(new_tokens[0]),
                 time.perf_counter() - started)  # fmt: skip
        return [self._finish(p, tokens, rows.first_token_at) for p, tokens in zip(batch, new_tokens, strict=True)]

    def _adapter(self, adapter: str | None) -> Any:
        """A context in which the model runs with ``adapter`` (None: the base model)."""
        if not self.spec.lora_adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _finish(self, prepared: _Prepared, tokens: list[int], first_token_at: float | None) -> Generation:
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
            first_token_at=first_token_at,
        )


class _RowStops:
    """A per-row stopping criterion: row i is done at its own max_tokens or stop sequence.

    transformers calls it after every generated token with the whole sequences; it answers one bool per
    row, and ``generate`` pads finished rows and returns once all are done (end of sequence is handled by
    transformers itself).
    """

    def __init__(self, batch: list[_Prepared], width: int, tokenizer: Any, torch: Any) -> None:
        self._batch = batch
        self._width = width
        self._tokenizer = tokenizer
        self._torch = torch
        self._done = [False] * len(batch)
        # A stop string of n characters spans at most n tokens; one more covers a token cut at its start.
        self._tail = [max((len(s) for s in p.stops), default=0) + 1 for p in batch]
        self.first_token_at: float | None = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        if self.first_token_at is None:
            self.first_token_at = time.time()
        generated = input_ids.shape[1] - self._width
        for row, prepared in enumerate(self._batch):
            if self._done[row]:
                continue
            if generated >= prepared.max_new_tokens:
                self._done[row] = True
            elif prepared.stops:
                tail = input_ids[row, max(self._width, input_ids.shape[1] - self._tail[row]) :].tolist()
                text = self._tokenizer.decode(tail, skip_special_tokens=True)
                self._done[row] = any(stop in text for stop in prepared.stops)
        return self._torch.tensor(self._done, dtype=self._torch.bool, device=input_ids.device)
