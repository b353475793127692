"""Finding detectors: by entry-point name in ``inferpool.detectors`` (the built-ins register there too), or by
import path, and which one a registry model uses when it names none."""

from __future__ import annotations

from inferpool._exceptions import ConfigurationError
from inferpool.constants import DETECTOR_ENTRY_POINT_GROUP
from inferpool.detection.base import Detector
from inferpool.plumbing.plugins import installed, load_plugin

#: The detector a model's backend implies when its registry entry names none.
DEFAULT_DETECTORS = {"openai": "openai", "anthropic": "anthropic", "vllm": "checkpoint",
                     "transformers": "checkpoint", "transformers-embeddings": "checkpoint"}  # fmt: skip


def available_detectors() -> dict[str, str]:
    return installed(DETECTOR_ENTRY_POINT_GROUP)


def load_detector(ref: str) -> Detector:
    """The detector ``ref`` names, built: a ``ConfigurationError`` if it is not installed, does not import, or is not
    a detector (a class with ``list_models`` and ``detect``)."""
    factory = load_plugin(DETECTOR_ENTRY_POINT_GROUP, ref, "detector", allow_path=True)
    if not callable(factory):
        raise ConfigurationError(f"detector {ref!r} is not a class (got {type(factory).__name__})")
    try:
        detector = factory()
    except Exception as exc:
        raise ConfigurationError(f"detector {ref!r} cannot be built: {exc}") from exc
    if not all(callable(getattr(detector, method, None)) for method in ("list_models", "detect")):
        raise ConfigurationError(f"detector {ref!r} has no list_models() and detect(): not a detector")
    result: Detector = detector
    return result


#: A registry entry's ``detector: none``: never detect this model (its registry values stand, it never leaves routing
#: for a models list that does not name it, e.g. a server that lists aliases differently).
NO_DETECTOR = "none"


def detector_name(backend: str, named: str | None) -> str | None:
    """The detector of a model (its own ``detector``, else its backend's default; None: nothing to detect)."""
    if named == NO_DETECTOR:
        return None
    return named or DEFAULT_DETECTORS.get(backend)
