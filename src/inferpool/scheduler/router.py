"""Routing: which model, and so which queue, serves a request."""

from __future__ import annotations

from dataclasses import dataclass

from inferpool.constants import queue_name, split_adapter
from inferpool.model_registry.capability import check_request_fits
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.wire import ChatRequest


@dataclass(frozen=True)
class Route:
    """Where a request goes: the model that serves it, its queue, the ``model`` value the request
    carries from here on (the canonical name, plus ``:adapter``), and warnings for its result."""

    spec: ModelSpec
    queue: str
    model: str
    warnings: tuple[str, ...] = ()


class Router:
    """Resolves a request's model (name or alias) and checks the model can serve it."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def route(self, request: ChatRequest) -> Route:
        """The route for ``request``; raises ``ModelNotFound``, ``CapabilityMismatch`` or ``InvalidRequest``.

        A deprecated model's requests go to its replacement (following the chain), with a warning.
        """
        spec = self.registry.get(request.model)
        adapter = split_adapter(request.model)[1]
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
        check_request_fits(spec, request)
        model = f"{spec.name}:{adapter}" if adapter else spec.name
        return Route(spec=spec, queue=queue_name(spec.name), model=model, warnings=tuple(warnings))
