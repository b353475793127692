"""Batch jobs as clients see them: the OpenAI batch object's status and counts, and the job."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from inferpool.wire.provider_batches import ProviderBatch
from inferpool.wire.usage import ModelUsage
from inferpool.wire.via import ViaChoice


class JobStatus(StrEnum):
    """The OpenAI batch object's statuses."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.FAILED, JobStatus.COMPLETED, JobStatus.EXPIRED, JobStatus.CANCELLED)


#: Error codes for requests a job settles without running them.


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchJob(BaseModel):
    """A batch job as the OpenAI batch object shows it, plus priority and usage per model."""

    id: str
    object: str = "batch"
    endpoint: str = "/v1/chat/completions"
    status: JobStatus
    created_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    expires_at: int | None = None
    expired_at: int | None = None
    failed_at: int | None = None
    completion_window: str = "24h"
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    priority: int = 0
    models: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list)
    tenant: str | None = Field(default=None, description="Who owns the job: its client's tenant, or its gateway key's.")
    input_file_id: str | None = None
    usage: list[ModelUsage] = Field(default_factory=list)
    via: str = Field(default="realtime", description="The path asked for: auto, realtime or provider-batch.")
    routing: str | None = Field(default=None, description="load or prefix if the job chose one (--routing); "
                                "else each model's own.")  # fmt: skip
    paths: dict[str, ViaChoice] = Field(
        default_factory=dict, description="Per model: the path its lines take (real-time or the provider's Batch "
        "API) and why.",
    )  # fmt: skip
    provider_batches: list[ProviderBatch] = Field(
        default_factory=list, description="Its batches at the providers (lines sent through a Batch API)."
    )

    @property
    def finished(self) -> int:
        return self.request_counts.completed + self.request_counts.failed


#: Completion-stream entries read per ``XRANGE``: an entry holds one chunk's results (up to its chunk size).
