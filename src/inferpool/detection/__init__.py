"""Capability detection: what each model really accepts, asked of its provider, its engine or its files.

Detectors (``inferpool.detectors`` entry points: ``openai``, ``anthropic``, ``ollama``, ``checkpoint``) each
read one kind of source; ``inferpool.detection.targets`` says where a registry model's source is,
``inferpool.detection.compare`` sets what was found beside the registry, and
``inferpool.detection.registry_file`` writes it back as registry YAML. Workers detect their own model at
start and publish it in their heartbeat, so routing uses the smaller of the registry's and the engine's windows.
"""

from inferpool.detection.base import Detection, Detector, Target
from inferpool.detection.plugins import available_detectors, load_detector

__all__ = ["Detection", "Detector", "Target", "available_detectors", "load_detector"]
