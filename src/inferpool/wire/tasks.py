"""Tasks: what Celery carries to a worker (a chunk of items, or of references to a job's items)."""

from __future__ import annotations

import json
import time

from pydantic import BaseModel, Field, PrivateAttr, model_validator

from inferpool.constants import Priority, split_adapter
from inferpool.wire.ids import new_id
from inferpool.wire.kinds import InferenceRequest

#: Task headers of a chunk's traces (``TaskChunk.trace_headers``).
TRACEPARENT_HEADER = "traceparent"
ITEM_TRACES_HEADER = "inferpool_traces"


class TaskItem(BaseModel):
    """One request inside a chunk, with the id its result is stored under and whom usage is counted for."""

    request_id: str
    custom_id: str | None = None
    tenant: str | None = None
    request: InferenceRequest
    warnings: list[str] | None = None
    tried: list[str] | None = Field(default=None, description="Models that failed it before (fallbacks).")
    reply_to: str | None = Field(default=None, description="The submitting client's reply list (a single request "
                                 "it waits for): the result is pushed there, waking that client's one listener "
                                 "instead of a waiter per request (inferpool.client.replies).")  # fmt: skip
    # The W3C traceparent of the trace it belongs to (OpenTelemetry): carried in the chunk task's headers, never
    # in its payload (``TaskChunk.trace_headers``).
    _trace: str | None = PrivateAttr(default=None)

    @property
    def trace(self) -> str | None:
        return self._trace

    def traced(self, parent: str | None) -> TaskItem:
        """This item, in the trace ``parent`` names."""
        self._trace = parent
        return self

    @property
    def served_model(self) -> str:
        """The registry model serving it (``request.model`` less any ``:adapter``)."""
        return split_adapter(self.request.model)[0]


class TaskChunk(BaseModel):
    """The payload of one Celery task: several requests for one model, each answered on its own.

    A single request travels whole (``items``). A batch job's requests travel by id (``refs``): their
    items are in the job's items hash in Redis, which the worker reads (so prompts cross Redis once, and
    never show in Celery messages).
    """

    chunk_id: str = Field(default_factory=lambda: new_id("chunk"))
    job_id: str | None = None
    model: str
    items: list[TaskItem] = Field(default_factory=list)
    refs: list[str] = Field(default_factory=list, description="Request ids of the job's items to answer.")
    enqueued_at: float = Field(default_factory=time.time)
    result_ttl_s: int = Field(gt=0)
    priority: Priority = Priority.NORMAL
    resent: bool = Field(
        default=False,
        description="Sent again (scheduler recovery or stale re-send, a fallback): some requests may be answered "
        "already, so the worker looks their results up before running them.",
    )

    _trace: str | None = PrivateAttr(default=None)  # the trace of a job's chunk (items carry their own)

    @model_validator(mode="after")
    def _items_or_refs(self) -> TaskChunk:
        if bool(self.items) == bool(self.refs):
            raise ValueError("a chunk carries either items or refs (request ids of a job), and at least one")
        if self.refs and self.job_id is None:
            raise ValueError("a chunk of refs needs the job_id whose items they are")
        return self

    @property
    def size(self) -> int:
        return len(self.items) or len(self.refs)

    def describe(self) -> str:
        """Safe one-line description for logs and Flower: ids and counts, never prompt text."""
        return describe_chunk(self.chunk_id, self.job_id, self.model, self.size)

    @property
    def trace(self) -> str | None:
        return self._trace

    def trace_headers(self) -> dict[str, object]:
        """The task headers carrying its traces: ``traceparent`` (a job's chunk) and ``inferpool_traces`` (request
        id -> traceparent, single requests travelling together). Empty when nothing is traced."""
        headers: dict[str, object] = {}
        if self._trace is not None:
            headers[TRACEPARENT_HEADER] = self._trace
        traces = {item.request_id: item.trace for item in self.items if item.trace is not None}
        if traces:
            headers[ITEM_TRACES_HEADER] = traces
        return headers

    def restore_traces(self, parent: object, traces: object) -> None:
        """Take the traces its task's headers carried (anything malformed is ignored: headers are input)."""
        if isinstance(parent, str):
            self._trace = parent
        if isinstance(traces, dict):
            for item in self.items:
                found = traces.get(item.request_id)
                if isinstance(found, str):
                    item.traced(found)


def describe_chunk(chunk_id: str, job_id: str | None, model: str, size: int) -> str:
    job = f"job={job_id} " if job_id else ""
    return f"{job}model={model} chunk={chunk_id} n={size}"


def chunk_json(
    job_id: str, model: str, request_ids: list[str], result_ttl_s: int, *, resent: bool = False
) -> tuple[str, str]:
    """(chunk id, ``TaskChunk`` JSON) of a batch job's requests, by id: the scheduler never reads items."""
    chunk_id = new_id("chunk")
    payload = json.dumps({"chunk_id": chunk_id, "job_id": job_id, "model": model, "refs": request_ids,
                          "enqueued_at": time.time(), "result_ttl_s": result_ttl_s, "priority": Priority.LOW.value,
                          "resent": resent})  # fmt: skip
    return chunk_id, payload
