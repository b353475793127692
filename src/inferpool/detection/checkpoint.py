"""A local checkpoint: a Hugging Face directory or a GGUF file, read without loading any weights.

The window comes from the config (``max_position_embeddings``...) or the GGUF's ``<arch>.context_length``;
chat and tools from the chat template (a template that renders ``tools``); vision from a vision tower, a
vision architecture or an image processor shipped beside the weights; the parameter count from the
safetensors headers (or the GGUF's tensor shapes), and the bytes the weights take on disk, for memory
estimates. An encoder with no language-model head makes embeddings of its hidden size.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from inferpool._exceptions import DetectionError, RegistryError
from inferpool.detection.base import Detection, Target, detection
from inferpool.model_registry.discovery import (
    checkpoint_template,
    checkpoint_vision,
    checkpoint_window,
    read_checkpoint_config,
    read_gguf_header,
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_GENERATIVE = ("forcausallm", "forconditionalgeneration", "lmheadmodel", "forseq2seqlm")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on a header


class CheckpointDetector:
    """A checkpoint directory or GGUF file on this machine."""

    name = "checkpoint"

    def list_models(self, target: Target) -> list[Detection]:
        path = self._path(target)
        if path.is_dir() and not (path / "config.json").is_file():  # a directory of checkpoints, as discovery reads
            entries = [entry for entry in sorted(path.iterdir())
                       if (entry / "config.json").is_file() or entry.suffix.lower() == ".gguf"]  # fmt: skip
            return [self.detect(Target(path=entry), entry.stem if entry.is_file() else entry.name) for entry in entries]
        return [self.detect(target, path.stem if path.is_file() else path.name)]

    def detect(self, target: Target, model: str) -> Detection:
        path = self._path(target)
        if path.is_file():
            return self._gguf(path, model)
        if not (path / "config.json").is_file():
            note = f"{path} is neither a checkpoint directory (no config.json) nor a GGUF file"
            return detection(self.name, str(path), model, available=False, note=note)
        try:
            config = read_checkpoint_config(path)
        except RegistryError as exc:
            raise DetectionError(str(exc)) from None
        template = checkpoint_template(path)
        architectures = " ".join(str(a) for a in config.get("architectures") or []).lower()
        generative = any(kind in architectures for kind in _GENERATIVE)
        weights = [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in _WEIGHT_SUFFIXES]
        hidden = config.get("hidden_size")
        fields: dict[str, Any] = {
            "context_window": _sentence_transformers_limit(path) or checkpoint_window(config),
            "chat": generative and template is not None,
            "completions": generative,
            "tools": generative and template is not None and "tools" in template,
            "vision": checkpoint_vision(config, path),
            "embedding_dimensions": hidden if not generative and isinstance(hidden, int) else None,
            "parameters": _safetensors_parameters(weights),
            "bytes_on_disk": sum(f.stat().st_size for f in weights) or None,
        }
        return detection(self.name, str(path), model, **{k: v for k, v in fields.items() if v is not None})

    def _gguf(self, path: Path, model: str) -> Detection:
        try:
            metadata, parameters = read_gguf_header(path)
        except (OSError, ValueError, struct.error) as exc:
            raise DetectionError(f"{path}: not a readable GGUF file: {exc}") from None
        arch = str(metadata.get("general.architecture", ""))
        template = metadata.get("tokenizer.chat_template")
        template = template if isinstance(template, str) else None
        window = metadata.get(f"{arch}.context_length")
        fields: dict[str, Any] = {
            "context_window": window if isinstance(window, int) and window > 0 else None,
            "chat": template is not None,
            "completions": True,
            "tools": template is not None and "tools" in template,
            "vision": checkpoint_vision({"model_type": arch}),
            "parameters": parameters or None,
            "bytes_on_disk": path.stat().st_size,
        }
        return detection(self.name, str(path), model, **{k: v for k, v in fields.items() if v is not None})

    @staticmethod
    def _path(target: Target) -> Path:
        if target.path is None:
            raise DetectionError("detector 'checkpoint' needs a path (a checkpoint directory or GGUF file)")
        path = target.path.expanduser()
        if not path.exists():
            raise DetectionError(f"{path} does not exist")
        return path


def _sentence_transformers_limit(path: Path) -> int | None:
    """A sentence-transformers model's ``max_seq_length``: it embeds no more than this (vLLM reads it too),
    whatever its position embeddings allow."""
    try:
        config = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    value = config.get("max_seq_length") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _safetensors_parameters(files: list[Path]) -> int | None:
    """Parameters in the safetensors files: each header (8-byte length, then JSON) lists its tensors' shapes."""
    total, seen = 0, False
    for file in files:
        if file.suffix.lower() != ".safetensors":
            continue
        try:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > min(_MAX_HEADER_BYTES, file.stat().st_size):
                    raise ValueError(f"a header of {length} bytes")
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error, RecursionError) as exc:
            raise DetectionError(f"{file}: not a readable safetensors file: {exc}") from None
        for name, tensor in header.items() if isinstance(header, dict) else ():
            shape = tensor.get("shape") if isinstance(tensor, dict) and name != "__metadata__" else None
            if isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape):
                total += math.prod(shape)
                seen = True
    return total if seen else None
