"""Pipelines as clients see them: a pipeline's status, each step's progress, and one row's outcome per step."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from inferpool.wire.results import ErrorInfo
from inferpool.wire.tokens import Usage
from inferpool.wire.usage import ModelUsage


class PipelineStatus(StrEnum):
    LOADING = "loading"  # its rows are being read in (their first steps already run)
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (PipelineStatus.COMPLETED, PipelineStatus.CANCELLED, PipelineStatus.EXPIRED,
                        PipelineStatus.FAILED)  # fmt: skip

    @property
    def accepts_lines(self) -> bool:
        return self in (PipelineStatus.LOADING, PipelineStatus.RUNNING)


class StepOutcome(BaseModel):
    """What one step gave one row: its answer (and the answer parsed, for a step that asks for JSON), usage,
    finish reason and cost; or its error; or ``skipped`` (its ``when`` was false, or a step it uses was
    skipped). Later steps' templates read these fields as ``steps.<name>.<field>``."""

    model_config = ConfigDict(populate_by_name=True)
    answer: str | None = None
    json_value: Any = Field(default=None, alias="json", description="The answer parsed, for a step that asks for "
                            "JSON (None if it is not valid JSON).")  # fmt: skip
    usage: Usage | None = None
    finish_reason: str | None = None
    cost_usd: float = 0.0
    error: ErrorInfo | None = None
    skipped: bool = False

    def context(self) -> dict[str, Any]:
        """What a template sees as ``steps.<name>``."""
        return {"answer": self.answer, "json": self.json_value, "finish_reason": self.finish_reason,
                "usage": self.usage.model_dump() if self.usage else None, "cost_usd": self.cost_usd,
                "error": self.error.model_dump() if self.error else None, "skipped": self.skipped}  # fmt: skip


class StepProgress(BaseModel):
    name: str
    model: str = Field(description="The step's model (a template: it may differ per row).")
    job_id: str = Field(description="The batch job whose lines are this step's: `inferpool batch status` shows it.")
    queued: int = Field(default=0, description="Rows whose step was queued to run.")
    completed: int = 0
    failed: int = 0
    skipped: int = Field(default=0, description="Rows whose `when` was false, or that skipped a step it uses.")
    not_run: int = Field(default=0, description="Rows it did not run for: a step it uses failed, or its template "
                         "could not be rendered or validated.")  # fmt: skip
    usage: list[ModelUsage] = Field(default_factory=list)

    @property
    def settled(self) -> int:
        """Rows this step is done with (answered, failed, skipped or not run)."""
        return self.completed + self.failed + self.skipped + self.not_run

    @property
    def cost_usd(self) -> float:
        return sum(row.cost_usd for row in self.usage)


class PipelineRun(BaseModel):
    """A pipeline over rows: each row through a graph of prompt steps (``inferpool.pipelines``)."""

    id: str
    object: str = "pipeline"
    status: PipelineStatus
    created_at: int
    expires_at: int
    rows: int = Field(default=0, description="Rows read so far (all of them once status is past loading).")
    steps: list[StepProgress] = Field(default_factory=list)
    tenant: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list)

    @property
    def cost_usd(self) -> float:
        return sum(step.cost_usd for step in self.steps)


class PipelineRow(BaseModel):
    """One row of a pipeline's output: its columns and each step's outcome (None: the step never ran, because
    the pipeline was cancelled or expired first)."""

    row_number: int
    row: dict[str, Any]
    steps: dict[str, StepOutcome | None]
