"""A local OTLP/HTTP trace receiver (what an OpenTelemetry collector's port 4318 does, minus the forwarding), for
tests and benchmarks: it decodes every ``POST /v1/traces`` (protobuf, optionally gzip) and keeps the spans.

``python -m inferpool.emulators.otlp --port 4318`` runs one in the foreground, counting spans.
"""

from __future__ import annotations

import argparse
import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from inferpool.tracing.settings import TRACES_PATH


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as a collector saw it."""

    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int  # OTLP's SpanKind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer
    start_ns: int
    end_ns: int
    status: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[str, ...] = ()


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in any_value.array_value.values]
    return None if kind is None else getattr(any_value, kind)


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ``ExportTraceServiceRequest``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {attr.key: _value(attr.value) for attr in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    service=str(resource.get("service.name", "")), trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex(), name=span.name,
                    kind=span.kind, start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    status=span.status.code, attributes={attr.key: _value(attr.value) for attr in span.attributes},
                    events=tuple(event.name for event in span.events),
                ))  # fmt: skip
    return spans


class OtlpReceiver:
    """Receives spans on ``http://127.0.0.1:{port}/v1/traces`` in a background thread. ``keep=False`` only counts
    exports and their bytes, decoding nothing (a benchmark's collector, whose CPU would be another host's)."""

    def __init__(self, port: int = 0, *, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.raw: list[bytes] = []  # the bodies as they came (to look for text that must not be there)
        self.count = 0  # spans (kept) or exports (counted)
        self.bytes = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != TRACES_PATH:
                    self.send_error(404)
                    return
                try:
                    spans = decode(body) if receiver.keep else []
                except Exception:  # what a collector does with a body it cannot read
                    self.send_error(400)
                    return
                receiver.add(body, spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL (``OTEL_EXPORTER_OTLP_ENDPOINT``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, body: bytes, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.count += len(spans) if self.keep else 1
            self.bytes += len(body)
            if self.keep:
                self.raw.append(body)
                self.spans.extend(spans)

    def received(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Receive OTLP/HTTP span exports and count them (a collector that "
                                     "forwards nothing), for benchmarks of tracing's cost.")  # fmt: skip
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    receiver = OtlpReceiver(args.port, keep=False).start()
    print(f"receiving spans on {receiver.endpoint}{TRACES_PATH}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print(f"{receiver.count} exports received, {receiver.bytes:,} bytes")
    finally:
        receiver.stop()


if __name__ == "__main__":
    main()
