"""OpenTelemetry tracing, end to end and opt-in.

A chat gets one trace across the processes it passes: the gateway's ``POST /v1/chat/completions`` (continuing the
caller's ``traceparent``), the client's ``chat {model}`` and ``inferpool.submit``, then in the worker
``inferpool.queue_wait``, ``inferpool.process {model}`` with the steps that acted (hooks, cache), the engine or
provider call (``chat {model}``, GenAI conventions, a ``gen_ai.first_token`` event) and ``inferpool.result_write``.
A batch job is one trace: ``inferpool.batch.create``, then per chunk the scheduler's ``inferpool.dispatch {model}``
and the worker's tree. Contexts travel as W3C ``traceparent`` strings in the chunk task's headers (never in its
payload) and in the job's record.

- ``settings``: ``TracingSettings``, the standard ``OTEL_*`` variables (the one reader of them).
- ``setup``: ``install_tracing``, the SDK provider and OTLP/HTTP exporter of a process inferpool runs.
- ``spans``: the tracer (None when nothing collects spans: no work at all) and traceparent helpers.
- ``genai``: span attributes after the GenAI semantic conventions; no prompt or answer text unless
  ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.

The worker's side is ``inferpool.workers.tracing``, the gateway's ``inferpool.gateway.tracing``, the client's
``inferpool.client.tracing``.
"""
