"""A provider batch's record (``inferpool.constants.provider_batch_key``): what the workers advance and
``batch status`` shows. Its states are explained in ``inferpool.provider_batch.store``."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel


class PBatchState(StrEnum):
    PREPARED = "prepared"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    CREATING = "creating"
    CREATED = "created"
    COLLECTED = "collected"


class ProviderBatch(BaseModel):
    """One provider batch's record."""

    id: str
    job_id: str
    model: str
    provider: str
    state: PBatchState
    count: int
    created_at: float
    marked_at: float | None = None
    sent: int | None = None
    file_id: str | None = None
    batch_id: str | None = None
    provider_status: str | None = None
    polls: int = 0
    cancel: bool = False
    cancel_sent: bool = False
    window_ended: bool = False  # cancelled because its job's completion window ended: unrun lines expire
    outcome: str | None = None

    @classmethod
    def from_hash(cls, stored: Mapping[Any, Any]) -> ProviderBatch | None:
        """The record from its Redis hash (None if it has none)."""
        raw: dict[str, Any] = {decode_text(k): decode_text(v) for k, v in stored.items()}
        if "state" not in raw:
            return None
        raw["cancel"] = raw.get("cancel") == "1"
        raw["cancel_sent"] = raw.get("cancel_sent") == "1"
        raw["window_ended"] = raw.get("window_ended") == "1"
        return cls.model_validate(raw)

    @property
    def finished(self) -> bool:
        return self.state == PBatchState.COLLECTED


def decode_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
