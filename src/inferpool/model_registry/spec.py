"""The registry's data model: what a model is, what it can do, what it costs and how it is served."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class EmbeddingCapability(BaseModel):
    """What a model that makes embeddings (``/v1/embeddings``) makes, and takes."""

    model_config = _STRICT
    dimensions: int = Field(gt=0, description="Size of its vectors.")
    max_input_tokens: int = Field(gt=0, description="Longest input, in tokens (longer: context_length_exceeded).")
    max_inputs: int = Field(default=2048, ge=1, le=2048, description="Most inputs one request may carry.")
    shorter_dimensions: bool = Field(
        default=False,
        description="Serves ``dimensions`` below its size (vectors cut and renormalised; models trained for it, "
        "like OpenAI's text-embedding-3).",
    )


class Capabilities(BaseModel):
    """What requests a model can serve: chat, text completions (``/v1/completions``), embeddings."""

    model_config = _STRICT
    chat: bool = True
    completions: bool = Field(default=False, description="Serves /v1/completions (a raw prompt, no chat template).")
    embeddings: EmbeddingCapability | None = Field(default=None, description="Serves /v1/embeddings.")
    suffix: bool = Field(default=False, description="Serves a completion's suffix (insert mode).")
    vision: bool = False
    tools: bool = False
    json_mode: bool = False
    logprobs: bool = Field(default=False, description="Can return token logprobs (logprobs/top_logprobs).")
    streaming: bool = Field(default=False, description="Its backend sees tokens as they come (time to first token).")
    max_n: int = Field(default=1, ge=1, le=128, description="Largest n (choices per request) it serves.")
    context_window: int = Field(gt=0, description="Prompt plus output tokens the model accepts.")
    max_output_tokens: int = Field(gt=0, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(default=256, gt=0, description="Used when a request sets none.")

    @model_validator(mode="before")
    @classmethod
    def _embedding_models_need_no_window(cls, data: Any) -> Any:
        """A model that only makes embeddings generates nothing: its window is its longest input."""
        only_embeds = isinstance(data, dict) and data.get("chat") is False and not data.get("completions")
        if only_embeds and isinstance(data.get("embeddings"), dict):
            data = {"context_window": data["embeddings"].get("max_input_tokens"), "max_output_tokens": 1,
                    "default_max_tokens": 1, **data}  # fmt: skip
        return data

    def kinds(self) -> list[str]:
        """The request kinds it serves (``chat``, ``completions``, ``embeddings``)."""
        served = {"chat": self.chat, "completions": self.completions, "embeddings": self.embeddings is not None}
        return [kind for kind, ok in served.items() if ok]


class Pricing(BaseModel):
    """USD per million tokens."""

    model_config = _STRICT
    input_per_mtok: float = Field(default=0.0, ge=0.0)
    output_per_mtok: float = Field(default=0.0, ge=0.0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class Deprecation(BaseModel):
    """A model on its way out: requests for it are served by ``replacement`` (if given), with a warning."""

    model_config = _STRICT
    since: dt.date | None = Field(default=None, description="When it was deprecated.")
    replacement: str | None = Field(default=None, description="The model that serves its requests from now on.")
    note: str = Field(default="", description="Said in the warning, e.g. why or what to do.")


#: A routing policy: by prompt prefix (engine cache affinity) or by load alone.
Routing = Literal["load", "prefix"]
#: Backends whose engine keeps a prefix cache across requests: prefix routing is their default.
PREFIX_CACHING_BACKENDS = frozenset({"vllm"})


class ServingSpec(BaseModel):
    """How workers for this model run and how requests are grouped for them."""

    model_config = _STRICT
    concurrency: int = Field(default=1, ge=1, description="Chunks one worker process handles at once.")
    chunk_size: int = Field(default=8, ge=1, description="Requests carried by one Celery task.")
    in_flight_per_worker: int | None = Field(
        default=None,
        ge=1,
        description="Batch requests the scheduler keeps dispatched per live worker (default: 2 x chunk_size x "
        "concurrency). Bounds Redis and Flower whatever the job size.",
    )

    routing: Routing | None = Field(
        default=None,
        description="How batch lines and single requests pick a worker: 'prefix' sends requests that share a "
        "prompt prefix to the worker whose engine holds it (inferpool.affinity), 'load' to whichever worker "
        "is free. Default: prefix for vLLM models (automatic prefix caching), load for the rest (API providers "
        "cache on their side). A batch job may override it (--routing).",
    )

    def window_per_worker(self) -> int:
        return self.in_flight_per_worker or 2 * self.chunk_size * self.concurrency


class CacheSpec(BaseModel):
    """A model's response cache: answers to identical requests are reused for ``ttl_s``."""

    model_config = _STRICT
    ttl_s: int = Field(default=7 * 24 * 3600, gt=0, description="How long a cached answer is reused.")
    any_temperature: bool = Field(
        default=False, description="Also cache requests that sample (no temperature 0, no seed)."
    )
    shared_across_tenants: bool = Field(
        default=False,
        description="Reuse one tenant's answers for another's identical requests. Off by default: a shared "
        "entry lets a tenant learn, by timing or a zero-cost hit, that another sent exactly that request.",
    )


class BatchApiSpec(BaseModel):
    """A model's use of its provider's own Batch API (OpenAI Batch, Anthropic Message Batches).

    Answers come within the provider's 24 h window at its batch price; a batch job takes this path per
    model (``--via auto``, the default, or ``provider-batch``): see ``inferpool.provider_batch``.
    """

    model_config = _STRICT
    enabled: bool = Field(default=False, description="Allow batch jobs to use the provider's Batch API.")
    min_lines: int = Field(default=100, ge=1, description="--via auto: fewer lines of a job than this run real-time.")
    pricing: Pricing | None = Field(default=None, description="USD per million tokens (default: half the model's).")
    on_expiry: Literal["fail", "realtime"] = Field(
        default="fail",
        description="Lines a provider batch left unprocessed when it expired: batch_expired errors, or re-sent "
        "through the real-time API.",
    )
    max_requests: int | None = Field(default=None, ge=1, description="Split above this many lines (default: the "
                                     "provider's limit, 50,000 OpenAI, 100,000 Anthropic).")  # fmt: skip
    max_bytes: int | None = Field(default=None, ge=1024, description="Split above this many bytes of provider input "
                                  "(default: 200 MB OpenAI, 256 MB Anthropic).")  # fmt: skip

    def price(self, realtime: Pricing) -> Pricing:
        """The batch price: the one given, or half the real-time one."""
        if self.pricing is not None:
            return self.pricing
        return Pricing(input_per_mtok=realtime.input_per_mtok / 2, output_per_mtok=realtime.output_per_mtok / 2)


class HookSpec(BaseModel):
    """A hook a model's requests go through: its entry-point name and its params."""

    model_config = _STRICT
    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


def _hook_specs(value: Any) -> Any:
    """``hooks: [name, {name, params}]``: a bare name is a hook without params."""
    if isinstance(value, list):
        return [{"name": item} if isinstance(item, str) else item for item in value]
    return value


class ProviderSpec(BaseModel):
    """Where a family of models runs: a cloud API (with its endpoint, key and shared limits) or local.

    A model that names the provider gets its backend from ``kind`` and these settings as defaults for
    its own ``params``.
    """

    model_config = _STRICT
    kind: Literal["openai", "openai-compatible", "anthropic", "local"]
    base_url: str | None = Field(default=None, description="Required for openai-compatible.")
    api_key_env: str | None = None
    api_key_file: Path | None = None
    rate_limit: dict[str, Any] | None = Field(default=None, description="Shared by all its models (see API params).")
    backend: str = Field(default="transformers", description="For kind local: the backend (transformers, vllm).")
    params: dict[str, Any] = Field(default_factory=dict, description="More defaults for its models' params.")
    hooks: list[HookSpec] = Field(default_factory=list, description="Hooks of all its models (theirs run after).")
    batch_api: BatchApiSpec | None = Field(default=None, description="Default Batch API use of its models.")

    _hooks_by_name = field_validator("hooks", mode="before")(_hook_specs)

    @model_validator(mode="after")
    def _compatible_needs_url(self) -> ProviderSpec:
        if self.kind == "openai-compatible" and not self.base_url:
            raise ValueError("an openai-compatible provider needs base_url")
        return self

    def backend_name(self) -> str:
        return {"openai": "openai", "openai-compatible": "openai", "anthropic": "anthropic"}.get(
            self.kind, self.backend
        )

    def default_params(self) -> dict[str, Any]:
        defaults: dict[str, Any] = dict(self.params)
        for name in ("base_url", "api_key_env", "api_key_file", "rate_limit"):
            value = getattr(self, name)
            if value is not None:
                defaults[name] = str(value) if isinstance(value, Path) else value
        return defaults


class DetectedFrom(BaseModel):
    """Where a registry entry's detected fields came from (written by ``inferpool models detect --write``): the
    fields named here are the detector's, the rest the registry's own."""

    model_config = _STRICT
    detector: str
    source: str = Field(description="The URL or path asked (never a key).")
    at: dt.datetime
    fields: list[str] = Field(default_factory=list, description="Capabilities whose value was detected.")


class ModelSpec(BaseModel):
    """One servable model."""

    model_config = _STRICT
    name: str
    aliases: list[str] = Field(default_factory=list)
    backend: str = Field(default="", description="Name of the backend entry point (echo, transformers, ...).")
    provider: str | None = Field(default=None, description="A provider of the registry's providers section.")
    params: dict[str, Any] = Field(default_factory=dict, description="Backend-specific parameters.")
    capabilities: Capabilities
    pricing: Pricing = Field(default_factory=Pricing)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    lora_adapters: dict[str, Path] = Field(
        default_factory=dict,
        description="LoRA adapters (name -> PEFT adapter directory) a request selects with model '<name>:<adapter>'.",
    )
    deprecation: Deprecation | None = None
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Models tried in order when this one fails a request after its retries, or cannot fit its "
        "prompt (then only larger-context ones).",
    )
    hooks: list[HookSpec] = Field(
        default_factory=list, description="Hooks (inferpool.hooks entry points) its requests and answers go through."
    )
    cache: CacheSpec | None = Field(default=None, description="Reuse answers to identical requests (opt-in).")
    batch_api: BatchApiSpec | None = Field(
        default=None, description="Use the provider's own Batch API for batch jobs (opt-in; default: the provider's)."
    )
    description: str = ""
    detector: str | None = Field(
        default=None,
        description="What finds its real capabilities (inferpool models detect, and its workers at start): an "
        "inferpool.detectors entry point (openai, anthropic, ollama, checkpoint) or an import path "
        "'package.module:Class'; none: never. Default: its backend's (openai, anthropic, checkpoint for local "
        "engines).",
    )
    detected: DetectedFrom | None = Field(default=None, description="Which fields were detected, by what, when.")
    memory_gb: float | None = Field(
        default=None, gt=0,
        description="Memory the loaded model takes (GiB of GPU memory, or of RAM on CPU), for workers that hold "
        "several models within a budget (inferpool worker --models). Unset: measured at its first load.",
    )  # fmt: skip

    _hooks_by_name = field_validator("hooks", mode="before")(_hook_specs)

    @property
    def routing(self) -> Routing:
        """The model's routing policy (``serving.routing``, else its backend's default)."""
        if self.serving.routing is not None:
            return self.serving.routing
        return "prefix" if self.backend in PREFIX_CACHING_BACKENDS else "load"

    @field_validator("lora_adapters")
    @classmethod
    def _valid_adapter_names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a valid adapter name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("name", "aliases")
    @classmethod
    def _valid_names(cls, value: str | list[str]) -> str | list[str]:
        for name in [value] if isinstance(value, str) else value:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a valid model name (letters, digits, '.', '_', '-')")
        return value


class DiscoverSpec(BaseModel):
    """A registry file's ``discover`` entry: register the models found in ``path``."""

    model_config = _STRICT
    path: Path
    backend: str = Field(default="transformers", description="Backend serving what is found (transformers, vllm).")
    prefix: str = Field(default="", description="Prepended to each discovered model's name.")
    serving: ServingSpec = Field(default_factory=ServingSpec)
    max_output_tokens: int = Field(default=2048, gt=0)


class RegistryFile(BaseModel):
    """The top level of a registry YAML file."""

    model_config = _STRICT
    providers: dict[str, ProviderSpec] = Field(default_factory=dict)
    models: list[ModelSpec] = Field(default_factory=list)
    discover: list[DiscoverSpec] = Field(
        default_factory=list, description="Directories whose checkpoints and GGUF files become models."
    )
