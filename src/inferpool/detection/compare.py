"""What a detection says beside what the registry says: per field, both values and whether they differ, and
the registry entry as it would be with the detected values (``models detect --write``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferpool.detection.base import CAPABILITY_FIELDS, Detection
from inferpool.model_registry.spec import Capabilities, DetectedFrom, ModelSpec


@dataclass(frozen=True)
class FieldComparison:
    field: str
    registry: Any
    detected: Any

    @property
    def differs(self) -> bool:
        return self.detected is not None and self.registry != self.detected


def registry_value(spec: ModelSpec, field: str) -> Any:
    caps = spec.capabilities
    if field == "context_window" and caps.embeddings is not None and not caps.chat and not caps.completions:
        return caps.embeddings.max_input_tokens  # an embedding model's window is its longest input
    if field == "embedding_dimensions":
        return caps.embeddings.dimensions if caps.embeddings is not None else None
    return getattr(caps, field, None)


def compare(spec: ModelSpec, found: Detection) -> list[FieldComparison]:
    """Every capability the source could tell, beside the registry's value (and the embedding size)."""
    rows = [FieldComparison(field, registry_value(spec, field), getattr(found, field))
            for field in (*CAPABILITY_FIELDS, "embedding_dimensions")]  # fmt: skip
    return [row for row in rows if row.detected is not None]


def drift(spec: ModelSpec, found: Detection) -> list[FieldComparison]:
    """The fields where the source disagrees with the registry."""
    return [row for row in compare(spec, found) if row.differs]


def with_detection(spec: ModelSpec, found: Detection) -> ModelSpec:
    """``spec`` with the detected capabilities written in and their provenance recorded (``detected``)."""
    data: dict[str, Any] = spec.capabilities.model_dump()
    changed = [row.field for row in compare(spec, found)]
    for field in changed:
        if field == "embedding_dimensions" and data.get("embeddings"):
            data["embeddings"]["dimensions"] = found.embedding_dimensions
        elif field == "context_window" and data.get("embeddings") and not data["chat"] and not data["completions"]:
            data["embeddings"]["max_input_tokens"] = found.context_window
            data["context_window"] = found.context_window
        elif field != "embedding_dimensions":
            data[field] = getattr(found, field)
    data["max_output_tokens"] = min(data["max_output_tokens"], data["context_window"])
    data["default_max_tokens"] = min(data["default_max_tokens"], data["max_output_tokens"])
    provenance = DetectedFrom(detector=found.detector, source=found.source, at=found.at, fields=changed)
    return spec.model_copy(update={"capabilities": Capabilities.model_validate(data), "detected": provenance})


def effective_window(spec: ModelSpec, detected_window: int | None) -> int:
    """The window routing uses: the smaller of the registry's and what the serving engines accept."""
    registry = spec.capabilities.context_window
    return registry if detected_window is None else min(registry, detected_window)
