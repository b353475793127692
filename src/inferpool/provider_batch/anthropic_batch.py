"""Anthropic's Message Batches, through the official ``anthropic`` SDK.

A line is ``{"custom_id", "params"}`` where ``params`` are the Messages API arguments the real-time
backend would send for the same OpenAI chat body (``AnthropicBackend.translate``: conversation, system
text, tools). There is no file upload: the lines go inside the create call.

Anthropic's batches carry no metadata and the API takes no idempotency key, so a create interrupted
after Anthropic made the batch (but before inferpool recorded its id) is found again by what can be
seen: the oldest batch created since the create began (``since``, less a small allowance for clock
skew), with the same number of lines, that no provider batch of ours has recorded. The runner creates
Anthropic batches one at a time per pool (``serial_creates``), so the batches of two interrupted creates
lie in separate time slots. What it cannot tell apart: a batch of the same size created in that slot
with the same key by another program, or two interrupted creates of the same size less than the clock
allowance apart.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from inferpool._exceptions import CapabilityMismatch, ProviderError
from inferpool.provider_batch.api import BatchProgress, LineOutcome
from inferpool.wire import AnyRequest, ChatRequest
from inferpool.workers.anthropic_translate import message_generation

#: Seconds the worker's clock may be ahead of Anthropic's when batches are matched by creation time.
CLOCK_ALLOWANCE_S = 5.0


class AnthropicBatchApi:
    provider = "anthropic"
    serial_creates = True
    uploads = False

    def __init__(self, client: Any, translate: Callable[[ChatRequest], dict[str, Any]]) -> None:
        self._client = client
        self._translate = translate

    def line(self, custom_id: str, request: AnyRequest) -> bytes:
        if not isinstance(request, ChatRequest):
            raise CapabilityMismatch(f"Anthropic's Message Batches serve chat only, not {request.kind}")
        params = self._translate(request)
        params.update(params.pop("extra_body", None) or {})  # sampling fields the SDK passes as extra body
        return json.dumps({"custom_id": custom_id, "params": params}, separators=(",", ":"),
                          ensure_ascii=False).encode()  # fmt: skip

    async def find_upload(self, name: str, since: float) -> str | None:
        return None

    async def upload(self, name: str, path: Path) -> str:
        raise NotImplementedError("Anthropic message batches take their lines in the create call")

    async def find_created(self, pbatch_id: str, lines: int, since: float,
                           claimed: Callable[[str], bool]) -> str | None:  # fmt: skip
        found: str | None = None
        async for batch in self._client.messages.batches.list(limit=100):
            if batch.created_at.timestamp() < since - CLOCK_ALLOWANCE_S:
                break
            counts = batch.request_counts
            total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if total == lines and not claimed(batch.id):
                found = str(batch.id)  # newest first: the last match is the oldest
        return found

    async def create(self, pbatch_id: str, job_id: str, file_id: str | None, path: Path) -> str:
        with path.open("rb") as handle:
            requests = [json.loads(line) for line in handle if line.strip()]
        batch = await self._client.messages.batches.create(requests=requests)
        return str(batch.id)

    async def retrieve(self, batch_id: str) -> BatchProgress:
        batch = await self._client.messages.batches.retrieve(batch_id)
        c = batch.request_counts
        described = (f"{c.succeeded} succeeded, {c.errored} errored, {c.canceled} canceled, {c.expired} expired, "
                     f"{c.processing} processing")  # fmt: skip
        return BatchProgress(status=batch.processing_status, ended=batch.processing_status == "ended",
                             counts=described)  # fmt: skip

    async def cancel(self, batch_id: str) -> None:
        await self._client.messages.batches.cancel(batch_id)

    async def results(self, batch_id: str) -> AsyncIterator[tuple[str, LineOutcome]]:
        decoder = await self._client.messages.batches.results(batch_id)
        async for entry in decoder:
            result = entry.result
            if result.type == "succeeded":
                yield entry.custom_id, message_generation(result.message)
            elif result.type == "errored":
                error = getattr(result.error, "error", None)
                kind, message = getattr(error, "type", "error"), getattr(error, "message", str(result.error))
                yield entry.custom_id, ProviderError(f"anthropic batch: {kind}: {message}")
            elif result.type == "expired":
                yield entry.custom_id, "expired"
            else:
                yield entry.custom_id, "cancelled"
