"""What a provider's Batch API must do for inferpool: one adapter per provider, on its official SDK.

An adapter is made by the model's API backend (``ApiBackend.batch_api``), so it uses the backend's own
SDK client and key (read by the worker process, never stored in Redis) and its own request translation:
a line goes to the Batch API exactly as it would go to the real-time endpoint.

Each call that creates something at a provider has a ``find_*`` twin that looks it up by what it was
made with (a file name, batch metadata, or for Anthropic, which has neither, the creation time and line
count): that is how a step interrupted after the provider made the object, but before inferpool recorded
it, adopts the object instead of making a second one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from inferpool.wire import AnyRequest
from inferpool.workers.backend import Outcome

#: A line the provider did not run: its batch expired or was cancelled first.
NotRun = Literal["expired", "cancelled"]
LineOutcome = Outcome | NotRun


@dataclass(frozen=True)
class BatchProgress:
    """A provider batch as the provider reports it."""

    status: str  # the provider's own word (in_progress, completed, ended, expired...)
    ended: bool  # no more lines will be processed; results can be collected
    counts: str  # for people: "12 succeeded, 1 errored, 3 processing"
    failed: str | None = None  # the whole batch was refused (validation): the provider's message


class ProviderBatchApi(Protocol):
    provider: str
    #: Whether lines go up as a file first (OpenAI) or inside the create call (Anthropic).
    uploads: bool
    #: Whether creates must not overlap (where ``find_created`` tells batches apart by creation time).
    serial_creates: bool

    def line(self, custom_id: str, request: AnyRequest) -> bytes:
        """One line of the provider's batch input (JSON, no newline); ``RequestError`` if it cannot be sent."""
        ...

    async def find_upload(self, name: str, since: float) -> str | None:
        """The id of a file uploaded as ``name`` at or after ``since``, if one exists."""
        ...

    async def upload(self, name: str, path: Path) -> str:
        """Upload the lines file as ``name``; its provider id."""
        ...

    async def find_created(self, pbatch_id: str, lines: int, since: float,
                           claimed: Callable[[str], bool]) -> str | None:  # fmt: skip
        """The id of a provider batch created for ``pbatch_id`` at or after ``since``, if one exists;
        ``claimed`` says which ids another provider batch of ours has recorded already."""
        ...

    async def create(self, pbatch_id: str, job_id: str, file_id: str | None, path: Path) -> str:
        """Create the batch (from the uploaded file, or the lines in ``path``); its provider id."""
        ...

    async def retrieve(self, batch_id: str) -> BatchProgress: ...

    async def cancel(self, batch_id: str) -> None: ...

    def results(self, batch_id: str) -> AsyncIterator[tuple[str, LineOutcome]]:
        """(custom_id, outcome) of every line the ended batch reports."""
        ...
