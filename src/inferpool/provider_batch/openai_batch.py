"""OpenAI's Batch API (Files + Batches), through the official ``openai`` SDK.

Lines are OpenAI batch JSONL (``custom_id``, ``method``, ``url``, ``body``: chat, completions or embeddings; one
endpoint per batch, as OpenAI requires, ``ProviderBatchRunner`` sees to it), uploaded as a file named
after the provider batch (so an interrupted upload is found again), and the batch is created with the
provider batch's id in its ``metadata`` (so an interrupted create is found again). Results are the
output and error files: answers, per-line errors (with the HTTP status and message), and lines the batch
did not run (``batch_expired``, ``batch_cancelled``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from inferpool._exceptions import ProviderError
from inferpool.provider_batch.api import BatchProgress, LineOutcome
from inferpool.wire import CHAT_COMPLETIONS_URL, AnyRequest
from inferpool.workers.api_backend import ApiFailure
from inferpool.workers.openai_translate import completion_generation, embeddings_outcome, text_completion_generation

log = logging.getLogger(__name__)

_ENDED = frozenset({"completed", "expired", "cancelled", "failed"})
#: How far back (seconds) a lookup reaches before the moment a step was recorded (clock skew, slow calls).
LOOKUP_MARGIN_S = 300.0
METADATA_KEY = "inferpool_pbatch"


class OpenAIBatchApi:
    provider = "openai"
    serial_creates = False
    uploads = True

    def __init__(self, client: Any, translate: Callable[[AnyRequest], dict[str, Any]]) -> None:
        self._client = client
        self._translate = translate

    def line(self, custom_id: str, request: AnyRequest) -> bytes:
        body = self._translate(request)
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": request.url, "body": body},
                          separators=(",", ":"), ensure_ascii=False).encode()  # fmt: skip

    async def find_upload(self, name: str, since: float) -> str | None:
        async for file in self._client.files.list(purpose="batch", order="desc", limit=100):
            if file.created_at < since - LOOKUP_MARGIN_S:
                return None
            if file.filename == name:
                return str(file.id)
        return None

    async def upload(self, name: str, path: Path) -> str:
        with path.open("rb") as handle:
            file = await self._client.files.create(file=(name, handle), purpose="batch")
        return str(file.id)

    async def find_created(self, pbatch_id: str, lines: int, since: float,
                           claimed: Callable[[str], bool]) -> str | None:  # fmt: skip
        async for batch in self._client.batches.list(limit=100):
            if batch.created_at < since - LOOKUP_MARGIN_S:
                return None
            if (batch.metadata or {}).get(METADATA_KEY) == pbatch_id:
                return str(batch.id)
        return None

    async def create(self, pbatch_id: str, job_id: str, file_id: str | None, path: Path) -> str:
        if file_id is None:
            raise ValueError("an OpenAI batch is created from an uploaded file")
        metadata = {METADATA_KEY: pbatch_id, "inferpool_job": job_id}
        batch = await self._client.batches.create(input_file_id=file_id, endpoint=_endpoint_of(path),
                                                  completion_window="24h",
                                                  metadata=metadata)  # fmt: skip
        return str(batch.id)

    async def retrieve(self, batch_id: str) -> BatchProgress:
        batch = await self._client.batches.retrieve(batch_id)
        counts = batch.request_counts
        described = (f"{counts.completed} completed, {counts.failed} failed of {counts.total}" if counts
                     else "no counts yet")  # fmt: skip
        failed = None
        if batch.status == "failed":
            errors = [e.message for e in (batch.errors.data if batch.errors and batch.errors.data else []) if e.message]
            failed = "; ".join(errors) or "the provider refused the batch"
        return BatchProgress(status=batch.status, ended=batch.status in _ENDED, counts=described, failed=failed)

    async def cancel(self, batch_id: str) -> None:
        await self._client.batches.cancel(batch_id)

    async def results(self, batch_id: str) -> AsyncIterator[tuple[str, LineOutcome]]:
        batch = await self._client.batches.retrieve(batch_id)
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._client.files.content(file_id)
            for number, raw in enumerate(content.read().splitlines(), 1):
                parsed = result_line(raw)
                if parsed is None:
                    log.warning("openai batch %s: line %d of file %s is not a result; skipped", batch_id, number,
                                file_id)  # fmt: skip
                    continue
                yield parsed


def _endpoint_of(path: Path) -> str:
    """The batch's endpoint: its first line's url (every line of a batch has the same)."""
    with path.open("rb") as lines:
        first = lines.readline()
    try:
        url = json.loads(first).get("url") if first.strip() else None
    except ValueError:
        url = None
    return url if isinstance(url, str) else CHAT_COMPLETIONS_URL


def result_line(raw: bytes) -> tuple[str, LineOutcome] | None:
    """(custom_id, outcome) of one output or error file line; None if it is not one."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("custom_id"), str):
        return None
    custom_id: str = entry["custom_id"]
    error, response = entry.get("error"), entry.get("response")
    if isinstance(error, dict) and error:
        code = error.get("code")
        if code == "batch_expired":
            return custom_id, "expired"
        if code == "batch_cancelled":
            return custom_id, "cancelled"
        return custom_id, ProviderError(f"openai batch: {code}: {error.get('message')}")
    if not isinstance(response, dict):
        return custom_id, ProviderError("openai batch: the result line has neither a response nor an error")
    status, body = response.get("status_code"), response.get("body")
    if status != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        if isinstance(message, dict) or message is None:
            message = json.dumps(body)[:500]
        return custom_id, ProviderError(f"openai batch: HTTP {status}: {message}")
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    kind = body.get("object") if isinstance(body, dict) else None
    try:
        if kind == "list":
            return custom_id, embeddings_outcome(body)
        if kind == "text_completion":
            return custom_id, text_completion_generation(Completion.model_validate(body))
        return custom_id, completion_generation(ChatCompletion.model_validate(body))
    except (ValidationError, ApiFailure) as exc:
        return custom_id, ProviderError(f"openai batch: malformed answer: {exc}")
