"""The ``Backend`` protocol every model runner implements, and how backends are found.

A backend answers chat with ``generate``; it may also answer text completions (``complete``, one prompt per
request) and embeddings (``embed``): optional methods beside the protocol's, which ``inferpool.workers.kinds``
calls (a backend without them refuses that kind with ``capability_mismatch``).

Built-in backends (echo, transformers) register through the same entry-point group as third-party
ones (``inferpool.backends``): a package adds a backend by declaring, in its pyproject.toml::

    [project.entry-points."inferpool.backends"]
    mybackend = "mypackage.backend:MyBackend"

where ``MyBackend(spec, settings)`` builds a ready-to-serve backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

from pydantic import BaseModel, ValidationError

from inferpool._exceptions import ConfigurationError, ModelLoadError, ProviderError, RequestError
from inferpool.constants import BACKEND_ENTRY_POINT_GROUP
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings
from inferpool.wire import ChatRequest, FinishReason


@dataclass(frozen=True)
class ExtraChoice:
    """Choices 1..n-1 of a request with ``n > 1`` (choice 0 is the ``Generation`` itself)."""

    text: str
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None = None


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """One tool call in OpenAI's shape (``arguments``: JSON text)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass(frozen=True)
class Generation:
    """One request's answer, as a backend produced it.

    ``first_token_at`` is the wall-clock time (``time.time()``) the first output token existed, for
    time-to-first-token; None where the backend cannot know it (a non-streaming provider call).
    ``completion_tokens`` counts the tokens of every choice. ``tool_calls`` are the functions the model
    asked for, in OpenAI's shape (``{"id", "type": "function", "function": {"name", "arguments"}}``).
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    attempts: int = 1
    first_token_at: float | None = field(default=None, compare=False)
    logprobs: dict[str, Any] | None = None
    extra_choices: tuple[ExtraChoice, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()
    #: Prompt tokens the engine found in its prefix cache (None: it does not say).
    cached_prompt_tokens: int | None = None


@dataclass(frozen=True)
class Embeddings:
    """One embeddings request's answer: a vector per input, in input order, each packed (``wire.pack_vector``:
    base64 of little-endian float32, as stored). The other fields let every outcome be counted alike."""

    vectors: tuple[str, ...]
    prompt_tokens: int
    attempts: int = 1
    completion_tokens: int = 0
    first_token_at: float | None = field(default=None, compare=False)
    cached_prompt_tokens: int | None = None


#: A backend answers each request with a ``Generation`` or the ``RequestError`` that stopped it.
GenerationOutcome = Generation | RequestError
#: ``embed``'s answer to each request.
EmbeddingOutcome = Embeddings | RequestError
#: Any request's outcome, whatever its kind.
Outcome = Generation | Embeddings | RequestError


log = logging.getLogger(__name__)


_O = TypeVar("_O", bound=Generation | Embeddings | RequestError)


async def gather_outcomes(backend: str, answers: Iterable[Awaitable[_O]]) -> list[_O | ProviderError]:
    """Await every request's answer; one that raises becomes that request's ``ProviderError`` alone,
    never its chunk-mates'."""
    outcomes: list[_O | ProviderError] = []
    for result in await asyncio.gather(*answers, return_exceptions=True):
        if isinstance(result, Generation | Embeddings | RequestError):
            outcomes.append(cast(_O, result))
        elif isinstance(result, Exception):
            log.error("backend %s failed on a request", backend, exc_info=result)
            outcomes.append(ProviderError(f"backend {backend!r} failed: {type(result).__name__}: {result}"))
        else:
            raise result  # cancellation, KeyboardInterrupt: not a request's failure
    return outcomes


@runtime_checkable
class Backend(Protocol):
    """Runs one model. Built once per worker process, then fed many requests, possibly concurrently."""

    name: str

    async def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationOutcome]:
        """Answer every request, in order. A request the model cannot serve gets a ``RequestError``."""
        ...

    async def aclose(self) -> None:
        """Release the model (GPU memory, engine processes)."""
        ...


class PrefixCacheStats(BaseModel):
    """An engine's own prefix-cache counters since it started, in prompt tokens (vLLM's
    ``prefix_cache_queries`` and ``prefix_cache_hits``): hits are prompt tokens whose prefill was skipped."""

    queries: int = 0
    hits: int = 0


def prefix_cache_stats(backend: Backend) -> PrefixCacheStats | None:
    """The backend's prefix-cache counters, if it keeps a prefix cache (an optional method,
    ``prefix_cache_stats()``, beside the protocol's two); None otherwise or if reading them fails."""
    read = getattr(backend, "prefix_cache_stats", None)
    if not callable(read):
        return None
    try:
        stats = read()
    except Exception as exc:  # statistics never stop a heartbeat
        log.debug("backend %s: prefix cache stats unavailable: %s", backend.name, exc)
        return None
    return stats if isinstance(stats, PrefixCacheStats) else None


def memory_footprint(backend: Backend) -> int | None:
    """Bytes the loaded model takes, if the backend can say (an optional method, ``memory_bytes()``): its weights
    and caches, wherever they live (vLLM's engine runs in a process of its own); None otherwise."""
    read = getattr(backend, "memory_bytes", None)
    if not callable(read):
        return None
    try:
        value = read()
    except Exception as exc:
        log.debug("backend %s: memory footprint unavailable: %s", backend.name, exc)
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def backend_can_sleep(backend: Backend) -> bool:
    """Whether the backend can put its model to sleep and wake it (optional methods ``can_sleep()``, ``async
    sleep()`` and ``async wake()``; vLLM's sleep mode on a GPU): a budgeted worker then parks an idle model in
    host RAM instead of unloading it."""
    read = getattr(backend, "can_sleep", None)
    try:
        return bool(callable(read) and read())
    except Exception as exc:
        log.debug("backend %s: cannot tell whether it sleeps: %s", backend.name, exc)
        return False


async def sleep_backend(backend: Backend) -> None:
    """Put the backend's model to sleep (its weights off the accelerator, its caches dropped)."""
    await backend.sleep()  # type: ignore[attr-defined]


async def wake_backend(backend: Backend) -> None:
    """Wake the backend's model (after ``sleep_backend``): it serves again."""
    await backend.wake()  # type: ignore[attr-defined]


ParamsT = TypeVar("ParamsT", bound=BaseModel)


def parse_params(params_model: type[ParamsT], spec: ModelSpec, backend: str) -> ParamsT:
    """A registry entry's ``params`` as ``params_model``, or a ``ModelLoadError`` naming model and backend."""
    try:
        return params_model.model_validate(spec.params)
    except ValidationError as exc:
        raise ModelLoadError(f"model {spec.name!r}: invalid {backend} params: {exc}") from exc


class BackendFactory(Protocol):
    def __call__(self, spec: ModelSpec, settings: Settings) -> Backend: ...


def available_backends() -> dict[str, str]:
    """Backend names and the objects they point to, from installed entry points."""
    return {ep.name: ep.value for ep in entry_points(group=BACKEND_ENTRY_POINT_GROUP)}


def load_backend_factory(name: str) -> BackendFactory:
    """The factory registered under ``name``, or a clear error listing the installed backends."""
    for ep in entry_points(group=BACKEND_ENTRY_POINT_GROUP):
        if ep.name == name:
            factory: BackendFactory = ep.load()
            return factory
    installed = ", ".join(sorted(available_backends())) or "(none; is inferpool installed with pip?)"
    raise ConfigurationError(f"no backend named {name!r} is installed; installed backends: {installed}")


def preload_backend(name: str) -> None:
    """Import backend ``name``'s engine libraries now (an optional ``preload()`` on its factory), so that a worker
    that loads models later, on demand, pays the import once at start and not inside its first load. A failure
    is only logged: the model's load reports it."""
    try:
        preload = getattr(load_backend_factory(name), "preload", None)
        if callable(preload):
            preload()
    except Exception as exc:
        log.warning("backend %s: preloading its libraries failed (%s); its first load will say why", name, exc)


def create_backend(spec: ModelSpec, settings: Settings) -> Backend:
    """Build the backend that serves ``spec`` (loading its model)."""
    return load_backend_factory(spec.backend)(spec, settings)
