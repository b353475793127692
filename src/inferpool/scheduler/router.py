"""Routing: which model, and so which queue, serves a request."""

from __future__ import annotations

from dataclasses import dataclass

from inferpool.constants import queue_name
from inferpool.model_registry.capability import check_request_fits
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.wire import ChatRequest


@dataclass(frozen=True)
class Route:
    spec: ModelSpec
    queue: str


class Router:
    """Resolves a request's model (name or alias) and checks the model can serve it."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def route(self, request: ChatRequest) -> Route:
        """The route for ``request``; raises ``ModelNotFound``, ``CapabilityMismatch`` or ``InvalidRequest``."""
        spec = self.registry.get(request.model)
        check_request_fits(spec, request)
        return Route(spec=spec, queue=queue_name(spec.name))
