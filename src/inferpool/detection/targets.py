"""Where a registry model's detector looks: its provider's server (with its key) or its checkpoint's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from inferpool._exceptions import ConfigurationError, DetectionError, InferpoolError
from inferpool.detection.base import Detection, Target
from inferpool.detection.plugins import detector_name, load_detector
from inferpool.model_registry.checkpoints import package_dir, package_file
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings, read_api_key

#: Each API detector's default server (as the providers' SDKs default) and key variable.
_API_DEFAULTS = {
    "openai": ("OPENAI_BASE_URL", "https://api.openai.com/v1", "OPENAI_API_KEY"),
    "anthropic": ("ANTHROPIC_BASE_URL", "https://api.anthropic.com", "ANTHROPIC_API_KEY"),
    "ollama": ("OLLAMA_HOST", "http://127.0.0.1:11434", "OLLAMA_API_KEY"),
}


class _ApiSource(BaseModel):
    """The part of an API model's registry params that says where its server is."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    no_api_key: bool = False


class _LocalSource(BaseModel):
    """The part of a local model's registry params that says where its files are."""

    model_config = ConfigDict(extra="ignore")
    path: Path | None = None
    package: str | None = None
    package_dir: str = "model"
    gguf_path: Path | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None


@dataclass(frozen=True)
class Plan:
    """What to ask about one registry model: which detector, where, and under which id."""

    spec: ModelSpec
    detector: str
    target: Target
    model_id: str

    def run(self) -> Detection:
        """The detection (a ``DetectionError`` if the source cannot be read or says something unusable)."""
        try:
            detector = load_detector(self.detector)
        except ConfigurationError as exc:
            raise DetectionError(str(exc)) from None
        found = detector.detect(self.target, self.model_id)
        if not isinstance(found, Detection):  # a third-party detector's answer is checked like any input
            raise DetectionError(f"detector {self.detector!r} returned {type(found).__name__}, not a Detection")
        limit = _engine_limit(self.spec)
        if limit is not None and (found.context_window is None or limit < found.context_window):
            note = (f"{found.note}; " if found.note else "") + f"the engine is started with max_model_len={limit}"
            found = found.model_copy(update={"context_window": limit, "note": note})
        return found


def plan_for(spec: ModelSpec, *, base_url: str | None = None, timeout_s: float = 10.0) -> Plan | None:
    """How to detect ``spec`` (None: nothing to detect, e.g. the echo backend). ``base_url`` overrides its server."""
    name = detector_name(spec.backend, spec.detector)
    if name is None:
        return None
    if name == "checkpoint":
        return Plan(spec, name, Target(path=_local_path(spec), timeout_s=timeout_s), spec.name)
    try:
        api = _ApiSource.model_validate(spec.params)
    except ValidationError as exc:
        raise DetectionError(f"model {spec.name!r}: params do not say where its server is: {exc}") from None
    url_variable, default_url, key_variable = _API_DEFAULTS.get(name, ("", "", "OPENAI_API_KEY"))
    url = base_url or api.base_url or (Settings.environment_secret(url_variable) if url_variable else "") or default_url
    key: SecretStr | None = None
    try:
        key = SecretStr(read_api_key(api, key_variable)) if not api.no_api_key else None
    except InferpoolError:
        key = None  # no key: servers that need none still answer; those that do say 401, which is reported
    return Plan(spec, name, Target(base_url=url or None, api_key=key, timeout_s=timeout_s), api.model or spec.name)


def _engine_limit(spec: ModelSpec) -> int | None:
    """The window a local engine is configured to accept below the checkpoint's (vLLM's ``max_model_len``)."""
    value = spec.params.get("max_model_len") if spec.backend == "vllm" else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _local_path(spec: ModelSpec) -> Path:
    """A local model's checkpoint directory or GGUF file, as its backend would find it (never converting)."""
    try:
        local = _LocalSource.model_validate(spec.params)
        if local.path is not None:
            return local.path
        if local.gguf_path is not None:
            return local.gguf_path
        if local.package is not None:
            return package_dir(local.package, local.package_dir)
        if local.gguf_package is not None and local.gguf_file:
            return package_file(local.gguf_package, local.gguf_file)
    except (ValidationError, InferpoolError) as exc:
        raise DetectionError(f"model {spec.name!r}: cannot locate its files: {exc}") from None
    raise DetectionError(f"model {spec.name!r}: its params name no checkpoint (path, package, gguf_path or "
                         "gguf_package)")  # fmt: skip
