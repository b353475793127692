"""What a detector finds about a model, where it looks, and the protocol every detector follows.

A detector asks one kind of source (an OpenAI-compatible ``/v1/models``, Anthropic's models API, Ollama,
a checkpoint on disk) what it knows about a model. What the source cannot tell stays ``None`` and the
registry's value stands; what it can is recorded with the detector's name, the source and the time.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from inferpool._exceptions import DetectionError

#: No model takes more tokens than this (the largest windows are a few million): a source that says more is
#: broken or hostile, and its answer is refused with a clear error rather than trusted.
MAX_PLAUSIBLE_TOKENS = 1 << 27
#: No models list or model description is this large (OpenAI's list is ~20 KB; a 10 MB one is refused).
MAX_BODY_BYTES = 4 * 1024 * 1024

#: Detected fields that map onto the registry's ``capabilities`` of the same name.
CAPABILITY_FIELDS = ("context_window", "max_output_tokens", "chat", "completions", "vision", "tools", "json_mode")
#: What is known about each detected model that is not a capability (shown, never routed on).
INFO_FIELDS = ("owned_by", "parameters", "bytes_on_disk", "embedding_dimensions")


class Detection(BaseModel):
    """What one source says about one model. ``None``: the source cannot tell (the registry's value stands)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=512, description="The model's id at the source.")
    detector: str = Field(description="The detector that asked (an inferpool.detectors entry point or import path).")
    source: str = Field(description="Where it asked: a URL (no credentials) or a path.")
    at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    available: bool = Field(default=True, description="False: the source says the id does not exist (for this key).")
    note: str = Field(default="", max_length=2000, description="Why it is unavailable, or what else was seen.")
    context_window: int | None = Field(default=None, gt=0, le=MAX_PLAUSIBLE_TOKENS)
    max_output_tokens: int | None = Field(default=None, gt=0, le=MAX_PLAUSIBLE_TOKENS)
    chat: bool | None = None
    completions: bool | None = None
    vision: bool | None = None
    tools: bool | None = None
    json_mode: bool | None = None
    embedding_dimensions: int | None = Field(default=None, gt=0, le=1 << 20)
    owned_by: str | None = Field(default=None, max_length=512)
    parameters: int | None = Field(default=None, ge=0, le=1 << 50, description="Parameter count.")
    bytes_on_disk: int | None = Field(default=None, ge=0)

    def capabilities(self) -> dict[str, Any]:
        """The detected capability fields (those the source could tell)."""
        return {name: getattr(self, name) for name in CAPABILITY_FIELDS if getattr(self, name) is not None}


def detection(detector: str, source: str, model: str, **fields: Any) -> Detection:
    """A ``Detection``, or a ``DetectionError`` naming the source and the field it got wrong (a context window of
    10^30, an id that is not a string): what a source says is input, and input is checked."""
    try:
        return Detection(detector=detector, source=source, model=model, **fields)
    except ValidationError as exc:
        wrong = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}={_short(err.get('input'))}: {err['msg']}"
                          for err in exc.errors())  # fmt: skip
        raise DetectionError(f"{source}: model {_short(model)} has unusable metadata ({wrong})") from None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Target(BaseModel):
    """Where a detector looks: a server (base URL and key) or a local path."""

    model_config = ConfigDict(extra="forbid")
    base_url: str | None = None
    api_key: SecretStr | None = Field(default=None, description="Sent to the source only; never shown.")
    path: Path | None = Field(default=None, description="A checkpoint directory or GGUF file.")
    timeout_s: float = Field(default=10.0, gt=0)

    def where(self) -> str:
        """The source as shown in messages and records (never the key)."""
        return self.base_url or (str(self.path) if self.path else "(nowhere)")


class Detector(Protocol):
    """A source of model metadata. Registered, built-ins too, under the ``inferpool.detectors`` entry-point
    group (or named in a registry entry by import path, ``package.module:Class``); built with no arguments."""

    def list_models(self, target: Target) -> list[Detection]:
        """Every model the source serves (for this key), with what it says about each."""
        ...

    def detect(self, target: Target, model: str) -> Detection:
        """What the source says about ``model`` (``available=False`` if it says there is no such model)."""
        ...


def missing(detector: str, target: Target, model: str, known: list[str]) -> Detection:
    """The answer for a model the source does not list."""
    listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
    note = f"{target.where()} does not serve {model!r}" + (f" (it serves: {listed})" if known else "")
    return detection(detector, target.where(), model, available=False, note=note)


class ListingDetector:
    """A detector whose source lists its models with all it knows: ``detect`` is a lookup in the list."""

    name = "listing"

    def list_models(self, target: Target) -> list[Detection]:
        raise NotImplementedError

    def detect(self, target: Target, model: str) -> Detection:
        listed = self.list_models(target)
        for found in listed:
            if found.model == model:
                return found
        return missing(self.name, target, model, [found.model for found in listed])


def require_url(target: Target, detector: str) -> str:
    if not target.base_url:
        raise DetectionError(f"detector {detector!r} needs a base URL (the model's params.base_url or --base-url)")
    return target.base_url.rstrip("/")


def server_root(target: Target, detector: str) -> str:
    """The server's root for APIs that do not live under ``/v1`` (Anthropic's SDK, Ollama): the base URL given
    with or without its OpenAI-style ``/v1``."""
    url = require_url(target, detector)
    return url.removesuffix("/v1")
