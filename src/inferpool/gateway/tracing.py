"""The gateway's span (``inferpool.tracing``): one ``SERVER`` span per HTTP request, continuing the caller's trace
(its ``traceparent`` header), current while the request is served, so the client's ``inferpool.submit`` and then
the worker's spans join it."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferpool.tracing.spans import context_from_headers, tracer

#: Paths named in span names as they are; others show as the method alone (ids in paths would make each name new).
_NAMED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/files",
                          "/v1/batches"})  # fmt: skip
_TRACE_HEADERS = (b"traceparent", b"tracestate")


class TracingMiddleware:
    """Pure ASGI: nothing is wrapped, not even a ``send``, when no tracer provider is set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = tracer() if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind, Status, StatusCode

        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
                   if key in _TRACE_HEADERS}  # fmt: skip
        method, path = scope["method"], scope["path"]
        name = f"{method} {path}" if path in _NAMED_PATHS else method
        attributes = {"http.request.method": method, "url.path": path}
        with found.start_as_current_span(name, context=context_from_headers(headers), kind=SpanKind.SERVER,
                                         attributes=attributes) as span:  # fmt: skip

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, send_traced)
