"""What ``Client`` and ``AsyncClient`` share: settings, routing, building tasks and sending them to Celery."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from pydantic import TypeAdapter, ValidationError

from inferpool._exceptions import ConfigurationError, InvalidRequest
from inferpool.client.affinity import SingleRequestAffinity
from inferpool.client.keys import KeyGate
from inferpool.client.routing import Route, Router
from inferpool.constants import Priority
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.publisher import ChunkPublisher
from inferpool.plumbing.redis_connection import connect_redis
from inferpool.plumbing.settings import Settings
from inferpool.state.load import read_latency_p50, read_model_load
from inferpool.wire import (
    TENANT_NAME,
    AnyRequest,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    InferenceRequest,
    TaskChunk,
    TaskItem,
    check_tenant,
    describe_validation_error,
    new_id,
)

RequestLike = AnyRequest | Mapping[str, Any]
MessagesLike = Sequence[ChatMessage | Mapping[str, Any]]


def parse_priority(value: Priority | str) -> Priority:
    """``value`` as a ``Priority``, or ``InvalidRequest`` naming the choices."""
    try:
        return Priority(value)
    except ValueError:
        choices = ", ".join(p.value for p in Priority)
        raise InvalidRequest(f"priority {value!r} is not one of {choices}") from None


_ANY_REQUEST: TypeAdapter[AnyRequest] = TypeAdapter(InferenceRequest)


def build_request(request: RequestLike, kind: type[AnyRequest] | None = None) -> AnyRequest:
    """A validated request from a model or an OpenAI-style dict (chat, completion or embeddings, as its fields
    say, or ``kind``); ``InvalidRequest`` says what is wrong."""
    if isinstance(request, ChatRequest | CompletionRequest | EmbeddingRequest):
        return request
    try:
        if kind is not None:
            return kind.model_validate(dict(request))
        return _ANY_REQUEST.validate_python(dict(request))
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from exc
    except RecursionError as exc:
        raise InvalidRequest("the request is nested too deeply to read") from exc


def build_chat_request(model: str, messages: MessagesLike, params: Mapping[str, Any]) -> AnyRequest:
    body: dict[str, Any] = {
        "model": model,
        "messages": [m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else dict(m) for m in messages],
        **params,
    }
    return build_request(body, ChatRequest)


class ClientBase:
    """Settings, registry and router shared by the sync and async clients."""

    #: Publishes single requests' chunks in one round trip each, on the client's blocking Redis pool (the sync
    #: client's own; the async client's, which its threads share).
    publisher: ChunkPublisher

    def __init__(
        self, redis_url: str | None, settings: Settings | None, registry: Registry | None, tenant: str | None = None
    ) -> None:
        settings = settings or Settings()
        if redis_url is not None:
            settings = settings.with_redis_url(redis_url)
        if check_tenant(tenant) is not None:
            settings = settings.model_copy(update={"tenant": tenant})
        self.settings = settings
        self.redis_url = settings.require_redis_url()
        self.registry = registry or Registry.from_settings(settings)
        self.router = Router(self.registry)
        self.key_gate: KeyGate | None = None

    def use_key(self, client: redis.Redis, api_key: str | None) -> KeyGate | None:
        """Apply an API key (``inferpool keys create``): its tenant becomes the client's, and its models, rates and
        budget hold for every request (``inferpool.client.keys``)."""
        if api_key is None:
            return None
        gate = KeyGate(self.registry, client, api_key)
        tenant = gate.info.tenant
        if self.settings.tenant and self.settings.tenant != tenant:
            raise ConfigurationError(f"the API key belongs to tenant {tenant!r}, not {self.settings.tenant!r}; give "
                                     "one or the other")  # fmt: skip
        self.settings = self.settings.model_copy(update={"tenant": tenant})
        self.key_gate = gate
        return gate

    def key_id(self) -> str | None:
        return self.key_gate.info.key_id if self.key_gate is not None else None

    @functools.cached_property
    def affinity(self) -> SingleRequestAffinity:
        """Prefix affinity for single requests of prefix-routed models (its Redis client made on first use)."""
        return SingleRequestAffinity(connect_redis(self.redis_url))

    def publish(self, chunk: TaskChunk) -> None:
        """Send a single request's chunk to its model's queue, or to the worker holding its prompt's prefix."""
        worker = None
        if len(chunk.items) == 1:
            spec = self.registry.get(chunk.model)
            if spec.routing == "prefix":
                worker = self.affinity.worker_for(spec, chunk.items[0].request)
        self.publisher.publish(chunk, worker)

    def attach_live_view(self, client: redis.Redis) -> None:
        """Route ``model: "auto"`` with the pool's live workers, load and latency, read through ``client``."""
        self.router.attach_live_view(lambda models: read_model_load(client, models), lambda: read_latency_p50(client))

    def tenant_for(self, request: AnyRequest) -> str | None:
        """The client's tenant; else the request's ``user`` where ``INFERPOOL_USER_TENANTS`` allows it (off by
        default: a line must not bill another tenant, nor grow the usage keys and metric labels at will)."""
        if self.settings.tenant:
            return self.settings.tenant
        user = request.user
        return user if user and TENANT_NAME.match(user) and self.settings.user_may_be_tenant(user) else None

    def chunk_size(self, model: str) -> int:
        return self.registry.get(model).serving.chunk_size

    def route(self, request: AnyRequest) -> Route:
        return self.router.route(request)

    def single_chunk(
        self,
        request: RequestLike,
        custom_id: str | None,
        priority: Priority | str,
        tenant: str | None,
        route: Route | None,
    ) -> TaskChunk:
        """The one-request task ``submit`` publishes; ``route`` is the caller's own routing of the same
        request (the gateway routes first to check for a live worker), else it is routed here."""
        chat_request = build_request(request)
        route = route or self.router.route(chat_request, self.key_gate.allowed() if self.key_gate else None)
        chat_request = chat_request.model_copy(update={"model": route.model})
        return self.make_chunk(route.spec, [(chat_request, custom_id)], warnings=route.warnings,
                               priority=parse_priority(priority), tenant=check_tenant(tenant))  # fmt: skip

    def make_chunk(
        self,
        spec: ModelSpec,
        requests: Sequence[tuple[AnyRequest, str | None]],
        *,
        job_id: str | None = None,
        warnings: Sequence[str] = (),
        priority: Priority = Priority.NORMAL,
        tenant: str | None = None,
    ) -> TaskChunk:
        """One task carrying ``requests`` (each with its optional custom_id) for model ``spec``; usage is
        counted for ``tenant`` if given (a gateway serving many tenants), else as ``tenant_for`` says."""
        items = [
            TaskItem(request_id=new_id("req"), custom_id=cid, tenant=tenant or self.tenant_for(req), request=req,
                     warnings=list(warnings) or None)
            for req, cid in requests
        ]  # fmt: skip
        return TaskChunk(job_id=job_id, model=spec.name, items=items, result_ttl_s=self.settings.result_ttl_s,
                         priority=priority)  # fmt: skip
