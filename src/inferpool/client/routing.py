"""Routing: which model, and so which queue, serves a request.

A request names a model (or an alias, or ``model:adapter``), or says ``model: "auto"`` with routing
hints: then the router picks, among models that have every required capability and a live worker, the
least loaded (then cheapest), the cheapest, or the fastest. Deprecated models are rewritten to their
replacement with a warning. A prompt that cannot fit a model's window (a safe lower bound of its tokens,
before any tokenizer runs) goes to a larger-window fallback of that model, or is refused before queueing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from redis.exceptions import RedisError

from inferpool._exceptions import CapabilityMismatch, ContextLengthExceeded, RequestError
from inferpool.constants import queue_name, split_adapter
from inferpool.model_registry.capability import KIND_NAMES, check_request_fits, serves_kind
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.state.load import ModelLoad
from inferpool.wire import AUTO_MODEL, AnyRequest, ChatRequest, CompletionRequest, RoutingHints

#: No tokenizer makes fewer tokens than characters / this, so a prompt over the window by this estimate
#: can be refused (or sent to a larger model) before it reaches a worker.
CHARS_PER_TOKEN_MAX = 32

#: Reads the pool's live view: per model, live workers, queued tasks, requests in flight.
LoadReader = Callable[[list[str]], list[ModelLoad]]


@dataclass(frozen=True)
class Route:
    """Where a request goes: the model that serves it, its queue, the ``model`` value the request
    carries from here on (the canonical name, plus ``:adapter``), and warnings for its result."""

    spec: ModelSpec
    queue: str
    model: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Live:
    loads: Mapping[str, ModelLoad]
    p50_latency_s: Mapping[str, float]


class Router:
    """Resolves a request's model and checks the model can serve it."""

    def __init__(
        self,
        registry: Registry,
        load_reader: LoadReader | None = None,
        latency_reader: Callable[[], Mapping[str, float]] | None = None,
        *,
        cache_s: float = 2.0,
    ) -> None:
        self.registry = registry
        self._load_reader = load_reader
        self._latency_reader = latency_reader
        self._cache_s = cache_s
        self._live: _Live | None = None
        self._live_at = 0.0
        self._named: dict[str, Route] = {}  # requested name -> route before the per-request checks
        self._served: dict[tuple[str, int], ModelSpec] = {}  # (model, detected window) -> its spec as served

    def needs_live_read(self) -> bool:
        """Whether the next ``route`` reads the pool's live view from Redis (it is older than ``cache_s``): an
        asyncio caller then routes in a thread, so its event loop never waits on Redis."""
        return self._load_reader is not None and (self._live is None or
                                                  time.monotonic() - self._live_at > self._cache_s)  # fmt: skip

    def attach_live_view(self, load_reader: LoadReader, latency_reader: Callable[[], Mapping[str, float]]) -> None:
        """Let ``model: "auto"`` see live workers, load and latency (a client does this once connected)."""
        self._load_reader, self._latency_reader = load_reader, latency_reader

    def route(self, request: AnyRequest, allowed: Collection[str] | None = None) -> Route:
        """The route for ``request``; raises ``ModelNotFound``, ``CapabilityMismatch``,
        ``ContextLengthExceeded`` or ``InvalidRequest`` before anything is queued. ``allowed``: the only
        models ``model: "auto"`` may choose (a gateway key's), None: any."""
        if request.model == AUTO_MODEL:
            return self._route_auto(request, allowed)
        route = self._named.get(request.model)
        if route is None:  # the registry never changes under a router: resolve each name once
            route = self._named[request.model] = self._resolve(request.model)
        if not serves_kind(route.spec, request.kind):
            self._wrong_kind(route.spec, request)
        serving = self._as_served(route.spec)
        if serving is not route.spec:
            route = Route(spec=serving, queue=route.queue, model=route.model, warnings=route.warnings)
        check_request_fits(route.spec, request)
        if not _may_fit(route.spec, request):
            larger = self._larger_fallback(route.spec, request)
            note = f"the prompt is too long for model {route.spec.name!r}; sent to its fallback {larger.name!r}"
            return Route(spec=larger, queue=queue_name(larger.name), model=larger.name,
                         warnings=(*route.warnings, note))  # fmt: skip
        return route

    def _wrong_kind(self, spec: ModelSpec, request: AnyRequest) -> None:
        """``CapabilityMismatch`` for a model asked for a kind it does not serve, naming models that do."""
        able = [other.name for other in self.registry if serves_kind(other, request.kind) and other.deprecation is None]
        where = f"models that do: {', '.join(able)}" if able else "no registered model does"
        served = ", ".join(spec.capabilities.kinds()) or "nothing"
        raise CapabilityMismatch(f"model {spec.name!r} does not serve {KIND_NAMES[request.kind]} (it serves {served}); "
                                 f"{where}")  # fmt: skip

    def _resolve(self, name: str) -> Route:
        """A name's route: alias and deprecation resolved, adapter kept (``ModelNotFound`` if unknown)."""
        spec = self.registry.get(name)
        adapter = split_adapter(name)[1]
        warnings: list[str] = []
        while spec.deprecation is not None:
            deprecation = spec.deprecation
            since = f" since {deprecation.since.isoformat()}" if deprecation.since else ""
            note = f" ({deprecation.note})" if deprecation.note else ""
            if deprecation.replacement is None:
                warnings.append(f"model {spec.name!r} is deprecated{since} and will be removed{note}")
                break
            replacement = self.registry.get(deprecation.replacement)
            warnings.append(f"model {spec.name!r} is deprecated{since}; {replacement.name!r} served this request{note}")
            spec, adapter = replacement, None  # an adapter belongs to the model it was trained for
        model = f"{spec.name}:{adapter}" if adapter else spec.name
        return Route(spec=spec, queue=queue_name(spec.name), model=model, warnings=tuple(warnings))

    def _as_served(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with the window its live workers' engines accept, when they detected a smaller one than the
        registry's (a vLLM started with a shorter ``max_model_len``, a provider's real limit)."""
        if self._load_reader is None:
            return spec
        try:
            live = self._live_view([spec.name])
        except RedisError:  # routing by the registry alone beats refusing to route
            return spec
        load = live.loads.get(spec.name) if live is not None else None
        window = load.context_window if load is not None else None
        if window is None or window >= spec.capabilities.context_window:
            return spec
        key = (spec.name, window)
        served = self._served.get(key)
        if served is None:
            caps = spec.capabilities
            output = min(caps.max_output_tokens, window)
            narrowed = caps.model_copy(update={"context_window": window, "max_output_tokens": output,
                                               "default_max_tokens": min(caps.default_max_tokens, output)})  # fmt: skip
            served = self._served[key] = spec.model_copy(update={"capabilities": narrowed})
        return served

    def _larger_fallback(self, spec: ModelSpec, request: AnyRequest) -> ModelSpec:
        for name in spec.fallbacks:
            candidate = self._as_served(self.registry.get(name))
            if candidate.capabilities.context_window > spec.capabilities.context_window and _may_fit(
                candidate, request
            ):
                check_request_fits(candidate, request)
                return candidate
        asked = request.output_limit() or 0
        raise ContextLengthExceeded(
            f"the prompt is at least {_min_prompt_tokens(request)} tokens and max_tokens is {asked}, "
            f"more than model {spec.name!r}'s context window of {spec.capabilities.context_window}"
            f"{_detected_note(self.registry, spec)}, and it has no larger fallback; shorten the prompt or lower "
            "max_tokens"
        )

    # -- model: "auto" ---------------------------------------------------------------------------------

    def _route_auto(self, request: AnyRequest, allowed: Collection[str] | None = None) -> Route:
        hints = request.routing or RoutingHints()
        candidates: list[ModelSpec] = []
        misses: list[str] = []
        for registered in self.registry:
            if registered.deprecation is not None or (allowed is not None and registered.name not in allowed):
                continue
            spec = self._as_served(registered)
            missing = _missing(spec, request, hints)
            if missing:
                misses.append(f"{spec.name} ({', '.join(missing)})")
            else:
                candidates.append(spec)
        if not candidates:
            needs = ", ".join([*hints.require, *([f"context >= {hints.min_context}"] if hints.min_context else [])])
            raise CapabilityMismatch(
                f"no registered model can serve this request (it needs: {needs or KIND_NAMES[request.kind]}); "
                f"what each lacks: {'; '.join(misses)}"
            )
        live = self._live_view([spec.name for spec in candidates])
        if live is not None:
            serving = [spec for spec in candidates if live.loads[spec.name].live_workers > 0]
            if not serving:
                names = ", ".join(spec.name for spec in candidates)
                raise CapabilityMismatch(
                    f"models that can serve this request ({names}) have no live worker; "
                    f"start one with `inferpool worker --model {candidates[0].name}`"
                )
            candidates = serving
        chosen = min(candidates, key=lambda spec: _preference(spec, hints, live))
        return Route(spec=chosen, queue=queue_name(chosen.name), model=chosen.name)

    def refresh_live_view(self) -> None:
        """Read the pool's live view now (blocking: an asyncio caller runs it in a thread, one at a time)."""
        self._live_view([], force=True)

    def _live_view(self, models: list[str], *, force: bool = False) -> _Live | None:
        if self._load_reader is None:
            return None
        now = time.monotonic()
        if force or self._live is None or now - self._live_at > self._cache_s or any(
                m not in self._live.loads for m in models):  # fmt: skip
            names = [spec.name for spec in self.registry]
            loads = {load.model: load for load in self._load_reader(names)}
            latencies = self._latency_reader() if self._latency_reader is not None else {}
            self._live, self._live_at = _Live(loads, latencies), now
        return self._live


def _detected_note(registry: Registry, spec: ModelSpec) -> str:
    """`` (its engines accept 2048; the registry says 8192)`` when the window was narrowed by detection."""
    registered = registry.get(spec.name).capabilities.context_window
    if registered == spec.capabilities.context_window:
        return ""
    return f" (what its serving engines accept, as they detected it; the registry says {registered})"


def _min_prompt_tokens(request: AnyRequest) -> int:
    """The fewest tokens the longest prompt can be: a chat's messages, a completion's or embedding's longest input."""
    if isinstance(request, ChatRequest):
        chars = sum(len(message.text()) for message in request.messages)
    elif isinstance(request, CompletionRequest):
        chars = max(len(prompt) for prompt in request.prompts())
    else:
        chars = max((len(item) for item in request.inputs() if isinstance(item, str)), default=0)
    return chars // CHARS_PER_TOKEN_MAX


def _may_fit(spec: ModelSpec, request: AnyRequest) -> bool:
    """False only when the prompt (at its fewest possible tokens) plus the max_tokens asked for cannot fit;
    the worker checks exactly, with the model's tokenizer."""
    return _min_prompt_tokens(request) + (request.output_limit() or 0) <= spec.capabilities.context_window


def _missing(spec: ModelSpec, request: AnyRequest, hints: RoutingHints) -> list[str]:
    """What ``spec`` lacks to serve ``request`` under ``hints`` (empty: it can)."""
    caps = spec.capabilities
    missing: list[str] = [capability for capability in hints.require if not getattr(caps, capability)]
    if hints.min_context is not None and caps.context_window < hints.min_context:
        missing.append(f"context {caps.context_window} < {hints.min_context}")
    try:
        check_request_fits(spec, request)
    except RequestError as exc:  # CapabilityMismatch / InvalidRequest: the message says what is missing
        missing.append(str(exc))
    if not missing and not _may_fit(spec, request):
        missing.append(f"context {caps.context_window} too small for this prompt")
    return missing


def _preference(spec: ModelSpec, hints: RoutingHints, live: _Live | None) -> tuple[float, ...]:
    """Sort key: smaller is better."""
    price = spec.pricing.input_per_mtok + spec.pricing.output_per_mtok
    load = 0.0
    latency = float("inf")
    if live is not None:
        current = live.loads[spec.name]
        queued = current.queue_depth * spec.serving.chunk_size + current.in_flight
        load = queued / max(1, current.live_workers * spec.serving.concurrency)
        latency = live.p50_latency_s.get(spec.name, float("inf"))
    if hints.prefer == "cheapest":
        return (price, load)
    if hints.prefer == "fastest":
        return (latency, load, price)
    return (load, price)
