"""The emulator server (aiohttp, on a background thread of the process that starts it)."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from inferpool.emulators.answers import answer_pieces, anthropic_answer, openai_answer, openai_deltas
from inferpool.emulators.batches import BatchEndpoints
from inferpool.emulators.completions import completion_stream_events, completions_answer, embeddings_answer
from inferpool.emulators.models import EmulatedModel, ModelEndpoints, default_models
from inferpool.emulators.tools import (
    anthropic_tool_events,
)

FAULTS = ("429", "500", "timeout", "garbage")


class WindowLimit(BaseModel):
    """At most ``requests`` accepted per sliding window of ``per_s`` seconds, per requested model."""

    requests: int = Field(gt=0)
    per_s: float = Field(default=60.0, gt=0)


class EmulatorConfig(BaseModel):
    latency_s: float = Field(default=0.0, ge=0, description="Wait before answering (before the first token).")
    token_latency_s: float = Field(default=0.0, ge=0, description="Wait between streamed tokens (stream: true).")
    faults: dict[str, float] = Field(default_factory=dict, description="fault -> probability, faults in FAULTS")
    timeout_sleep_s: float = Field(default=30.0, description="How long a 'timeout' fault keeps the request.")
    limits: dict[str, WindowLimit] = Field(default_factory=dict, description="requested model -> limit")
    api_keys: list[str] = Field(default_factory=list, description="When set, requests must carry one of these.")
    batch_delay_s: float = Field(default=0.5, ge=0, description="How long a provider batch takes to finish.")
    batch_failure_rate: float = Field(default=0.0, ge=0, le=1, description="Share of batch lines that fail.")
    batch_expire_s: float | None = Field(
        default=None, gt=0, description="A batch older than this expires (if it has not finished by then)."
    )
    seed: int = 0
    models: list[EmulatedModel] = Field(default_factory=default_models, description="What the models endpoints list.")
    models_body: bytes | None = Field(default=None, description="Answer every models endpoint with these bytes.")


class ProviderEmulator:
    """Serves ``/v1/chat/completions``, ``/v1/embeddings`` and ``/v1/completions`` (OpenAI) and ``/v1/messages``
    (Anthropic), their batch APIs (``inferpool.emulators.batches``) and their models endpoints, Ollama's too
    (``inferpool.emulators.models``)."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self._rng = random.Random(self.config.seed)
        self._lock = threading.Lock()
        self._accepted: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.counts: collections.Counter[str] = collections.Counter()
        self.max_in_window: dict[str, int] = collections.defaultdict(int)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._host = "127.0.0.1"
        self.batch_endpoints = BatchEndpoints(self)
        self.model_endpoints = ModelEndpoints(self)

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, port: int = 0, host: str = "127.0.0.1") -> ProviderEmulator:
        """Serve on ``host``:``port`` (0: a free one) in a background thread."""
        self.port, self._host = port, host
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="provider-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the emulator did not start")
        return self

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        # Batch input files and Anthropic batch bodies go up to the providers' limits (200 MB, 256 MB); aiohttp
        # refuses bodies over 1 MiB by default.
        app = web.Application(client_max_size=300 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/embeddings", self._openai_embeddings)
        app.router.add_post("/v1/completions", self._openai_completions)
        app.router.add_post("/v1/messages", self._anthropic)
        self.batch_endpoints.add_routes(app)
        self.model_endpoints.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self._host, self.port)
        self._loop.run_until_complete(site.start())
        server: Any = site._server  # aiohttp exposes the bound port only through the asyncio server
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def configure(self, **changes: Any) -> None:
        """Change the config while serving (e.g. turn faults on for one test)."""
        with self._lock:
            self.config = self.config.model_copy(update=changes)

    def count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.max_in_window.clear()
            self._accepted.clear()

    # -- request handling ------------------------------------------------------------------------------

    def _admit(self, model: str) -> float | None:
        """Count the request against its model's limit; seconds to wait if over it, else None."""
        limit = self.config.limits.get(model)
        if limit is None:
            return None
        now = time.monotonic()
        with self._lock:
            window = self._accepted[model]
            while window and window[0] <= now - limit.per_s:
                window.popleft()
            if len(window) >= limit.requests:
                self.counts["limit_exceeded"] += 1
                return window[0] + limit.per_s - now
            window.append(now)
            self.max_in_window[model] = max(self.max_in_window[model], len(window))
        return None

    def _pick_fault(self) -> str | None:
        with self._lock:
            roll = self._rng.random()
        for fault in FAULTS:
            chance = self.config.faults.get(fault, 0.0)
            if roll < chance:
                return fault
            roll -= chance
        return None

    async def _common(self, request: web.Request, key: str | None, body: dict[str, Any]) -> web.StreamResponse | None:
        """Auth, limits, faults and latency; a response to send instead of the answer, or None."""
        with self._lock:
            self.counts["received"] += 1
        if self.config.api_keys and key not in self.config.api_keys:
            self.counts["unauthorized"] += 1
            return web.json_response({"error": {"type": "authentication_error", "message": "invalid api key"}},
                                     status=401)  # fmt: skip
        wait = self._admit(str(body.get("model", "")))
        if wait is not None:
            headers = {"Retry-After": str(max(1, math.ceil(wait))), "x-ratelimit-remaining-requests": "0"}
            return web.json_response({"error": {"type": "rate_limit_error", "message": "rate limit exceeded"}},
                                     status=429, headers=headers)  # fmt: skip
        fault = self._pick_fault()
        if fault is not None:
            with self._lock:
                self.counts[f"fault_{fault}"] += 1
        if fault == "429":
            return web.json_response({"error": {"type": "rate_limit_error", "message": "injected 429"}}, status=429,
                                     headers={"Retry-After": "1"})  # fmt: skip
        if fault == "500":
            return web.json_response({"error": {"type": "api_error", "message": "injected 500"}}, status=500)
        if fault == "timeout":
            await asyncio.sleep(self.config.timeout_sleep_s)
        if self.config.latency_s:
            await asyncio.sleep(self.config.latency_s)
        if fault == "garbage":
            return web.Response(status=200, text='{"id": "garbage", "choi', content_type="application/json")
        if fault is None:  # a timed-out request is still answered, late, but not counted as answered
            with self._lock:
                self.counts["answered"] += 1
        return None

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        auth = request.headers.get("Authorization", "")
        early = await self._common(request, auth.removeprefix("Bearer ") or None, body)
        if early is not None:
            return early
        answer = openai_answer(body, self.counts["received"])
        if isinstance(answer, str):
            return web.json_response({"error": {"type": "invalid_request_error", "message": answer,
                                                "param": "messages", "code": None}}, status=400)  # fmt: skip
        headers = {"x-ratelimit-remaining-requests": "1000"}
        if body.get("stream"):
            events = [{**answer.head, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
                      for delta, reason in openai_deltas(answer.text, answer.finish, answer.calls)]  # fmt: skip
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({**answer.head, "object": "chat.completion.chunk", "choices": [], "usage": answer.usage})
            return await self._stream(request, [(None, e) for e in events], headers, done_marker=True)
        return web.json_response(answer.completion(), headers=headers)

    async def _openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._openai_other(request, "input", embeddings_answer)

    async def _openai_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai_other(
            request, "prompt", lambda body: completions_answer(body, self.counts["received"])
        )

    async def _openai_other(
        self, request: web.Request, param: str, answer_of: Callable[[dict[str, Any]], dict[str, Any] | str]
    ) -> web.StreamResponse:
        """``/v1/embeddings`` and ``/v1/completions``: the same auth, limits, faults and latency as chat."""
        body = await request.json()
        auth = request.headers.get("Authorization", "")
        early = await self._common(request, auth.removeprefix("Bearer ") or None, body)
        if early is not None:
            return early
        answer = answer_of(body)
        if isinstance(answer, str):
            return web.json_response({"error": {"type": "invalid_request_error", "message": answer,
                                                "param": param, "code": None}}, status=400)  # fmt: skip
        headers = {"x-ratelimit-remaining-requests": "1000"}
        if body.get("stream") and answer.get("object") == "text_completion":
            events: list[tuple[str | None, dict[str, Any]]] = [(None, e) for e in completion_stream_events(answer)]
            return await self._stream(request, events, headers, done_marker=True)
        return web.json_response(answer, headers=headers)

    async def _stream(self, request: web.Request, events: list[tuple[str | None, dict[str, Any]]],
                      headers: dict[str, str], *, done_marker: bool = False) -> web.StreamResponse:  # fmt: skip
        """Server-sent events, ``token_latency_s`` apart: (event name or None, data) each."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **headers})  # fmt: skip
        await response.prepare(request)
        try:
            for index, (name, data) in enumerate(events):
                if index and self.config.token_latency_s:
                    await asyncio.sleep(self.config.token_latency_s)
                prefix = f"event: {name}\n" if name else ""
                await response.write(f"{prefix}data: {json.dumps(data)}\n\n".encode())
                self.counts["stream_events"] += 1
            if done_marker:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.counts["streams_closed_by_client"] += 1  # the caller stopped reading: nothing more is made
            raise
        self.counts["streams_finished"] += 1
        return response

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        # Anthropic SDKs send the key as x-api-key (older) or as a bearer token (2.x).
        key = request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
        early = await self._common(request, key or None, body)
        if early is not None:
            return early
        message = anthropic_answer(body, self.counts["received"])
        if isinstance(message, str):
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": message}}, status=400)  # fmt: skip
        if not body.get("stream"):
            return web.json_response(message)
        text = "".join(block.get("text", "") for block in message["content"] if block["type"] == "text")
        uses = [block for block in message["content"] if block["type"] == "tool_use"]
        text_events: list[tuple[str | None, dict[str, Any]]] = [
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            *(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": piece}})
              for piece in answer_pieces(text)),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ]  # fmt: skip
        head = {k: v for k, v in message.items() if k not in ("content", "stop_reason", "usage")}
        events: list[tuple[str | None, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": {**head, "content": [], "stop_reason": None,
                               "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 0}}}),
            *(anthropic_tool_events(uses, 0) if uses else text_events),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                               "usage": {"output_tokens": message["usage"]["output_tokens"]}}),
            ("message_stop", {"type": "message_stop"}),
        ]  # fmt: skip
        return await self._stream(request, events, {})
