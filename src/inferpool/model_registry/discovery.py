"""Local model discovery: every Hugging Face checkpoint and GGUF file in a directory becomes a model.

Capabilities are read from the files: the context window from ``config.json`` (or the GGUF's
``<arch>.context_length``), chat from the presence of a chat template, tools from the template using
``tools``, vision from the architecture (a ``vision_config`` or a ``...ForConditionalGeneration`` /
vision architecture). GGUF metadata is read from the file's header only (a few KB), never its tensors.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

from inferpool._exceptions import RegistryError
from inferpool.model_registry.spec import Capabilities, DiscoverSpec, ModelSpec

_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_VISION_HINTS = ("vision", "llava", "_vl", "idefics", "paligemma", "mllama", "pixtral", "clip")
_DEFAULT_CONTEXT = 4096


def discover_models(spec: DiscoverSpec) -> list[ModelSpec]:
    """Models found directly inside ``spec.path`` (checkpoint directories and ``*.gguf`` files)."""
    root = spec.path.expanduser()
    if not root.is_dir():
        raise RegistryError(f"discover: {root} is not a directory")
    found: list[ModelSpec] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and (entry / "config.json").is_file():
            found.append(_from_checkpoint(entry, spec))
        elif entry.is_file() and entry.suffix.lower() == ".gguf":
            found.append(_from_gguf(entry, spec))
    return found


def _name(spec: DiscoverSpec, stem: str) -> str:
    return _INVALID_NAME_CHARS.sub("-", f"{spec.prefix}{stem}").strip("-._") or "model"


def _model(spec: DiscoverSpec, stem: str, params: dict[str, Any], window: int, template: str | None,
           vision: bool, source: Path) -> ModelSpec:  # fmt: skip
    capabilities = Capabilities(
        chat=template is not None,
        vision=vision,
        tools=template is not None and "tools" in template,
        context_window=window,
        max_output_tokens=min(spec.max_output_tokens, window),
        default_max_tokens=min(256, window),
    )
    return ModelSpec(name=_name(spec, stem), backend=spec.backend, params=params, capabilities=capabilities,
                     serving=spec.serving, description=f"discovered: {source}")  # fmt: skip


def read_checkpoint_config(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json``, or a ``RegistryError`` saying why it cannot be read."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise RegistryError(f"{directory / 'config.json'}: not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise RegistryError(f"{directory / 'config.json'}: not a JSON object")
    return config


def checkpoint_window(config: dict[str, Any]) -> int | None:
    """The context window a checkpoint's config gives (its own or its text model's), if any."""
    raw_text_config = config.get("text_config")
    text_config: dict[str, Any] = raw_text_config if isinstance(raw_text_config, dict) else {}
    return next((int(c[key]) for c in (config, text_config)
                 for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
                 if isinstance(c.get(key), int) and not isinstance(c.get(key), bool)), None)  # fmt: skip


def checkpoint_vision(config: dict[str, Any], directory: Path | None = None) -> bool:
    """Whether a checkpoint takes images: a vision tower in its config, a vision architecture, or an image
    processor shipped beside it."""
    raw_architectures = config.get("architectures")
    architectures: list[Any] = raw_architectures if isinstance(raw_architectures, list) else []
    names = " ".join(str(a) for a in architectures).lower() + " " + str(config.get("model_type", ""))
    processor = directory is not None and any((directory / f).is_file() for f in ("preprocessor_config.json",
                                                                                  "processor_config.json"))  # fmt: skip
    return "vision_config" in config or any(hint in names for hint in _VISION_HINTS) or processor


def _from_checkpoint(directory: Path, spec: DiscoverSpec) -> ModelSpec:
    try:
        config = read_checkpoint_config(directory)
    except RegistryError as exc:
        raise RegistryError(f"discover: {exc}") from exc
    window = checkpoint_window(config) or _DEFAULT_CONTEXT
    return _model(spec, directory.name, {"path": str(directory)}, window, checkpoint_template(directory),
                  checkpoint_vision(config), directory)  # fmt: skip


def checkpoint_template(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = tokenizer_config.get("chat_template")
    return template if isinstance(template, str) else (json.dumps(template) if template else None)


def _from_gguf(path: Path, spec: DiscoverSpec) -> ModelSpec:
    try:
        metadata = read_gguf_metadata(path)
    except (OSError, ValueError, struct.error) as exc:
        raise RegistryError(f"discover: {path}: not a readable GGUF file: {exc}") from exc
    arch = str(metadata.get("general.architecture", ""))
    window = metadata.get(f"{arch}.context_length")
    template = metadata.get("tokenizer.chat_template")
    vision = any(hint in arch.lower() for hint in _VISION_HINTS)
    window = int(window) if isinstance(window, int) else _DEFAULT_CONTEXT
    template = template if isinstance(template, str) else None
    return _model(spec, path.stem, {"gguf_path": str(path)}, window, template, vision, path)


# -- GGUF header ----------------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_KEPT = 64  # long arrays (the vocabulary) are skipped, not kept
_MAX_STRING_BYTES = 16 * 1024 * 1024  # a chat template is a few KB; a key or value past this is not metadata
_MAX_ARRAY_DEPTH = 4


class _HeaderReader:
    """Reads GGUF header fields, refusing any length that runs past the end of the file (a corrupt or
    hostile length field then fails with a clear error, not a MemoryError or a read of gigabytes)."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size

    def take(self, count: int) -> bytes:
        if count > self.size - self.handle.tell():
            raise ValueError(f"a field of {count} bytes runs past the end of the file ({self.size} bytes)")
        return self.handle.read(count)

    def skip(self, count: int) -> None:
        if count > self.size - self.handle.tell():
            raise ValueError(f"a field of {count} bytes runs past the end of the file ({self.size} bytes)")
        self.handle.seek(count, 1)

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self, keep: bool = True) -> str:
        (length,) = self.unpack("<Q")
        if length > _MAX_STRING_BYTES:
            raise ValueError(f"a string of {length} bytes is longer than GGUF metadata can be")
        if not keep:
            self.skip(length)
            return ""
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, value_type: int, keep: bool = True, depth: int = 0) -> Any:
        if value_type in _SCALARS:
            fmt = _SCALARS[value_type]
            if not keep:
                self.skip(struct.calcsize(fmt))
                return None
            return self.unpack(fmt)[0]
        if value_type == _STRING:
            return self.string(keep)
        if value_type == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise ValueError(f"arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            item_type, length = self.unpack("<IQ")
            if length > self.size - self.handle.tell():  # every item takes at least one byte
                raise ValueError(f"an array of {length} items runs past the end of the file")
            kept = keep and length <= _MAX_ARRAY_KEPT
            if item_type in _SCALARS and not kept:
                self.skip(length * struct.calcsize(_SCALARS[item_type]))
                return None
            items = [self.value(item_type, kept, depth + 1) for _ in range(length)]
            return items if kept else None
        raise ValueError(f"unknown GGUF value type {value_type}")


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (version 2 or 3), read from its header."""
    return read_gguf_header(path)[0]


def read_gguf_header(path: Path) -> tuple[dict[str, Any], int]:
    """A GGUF file's metadata and its parameter count (the tensor shapes that follow the metadata)."""
    with path.open("rb") as handle:
        reader = _HeaderReader(handle, path.stat().st_size)
        if reader.take(4) != b"GGUF":
            raise ValueError("no GGUF magic number")
        (version,) = reader.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        tensors, count = reader.unpack("<QQ")
        if count > reader.size - handle.tell():
            raise ValueError(f"{count} metadata entries cannot fit in the file")
        metadata: dict[str, Any] = {}
        for _ in range(count):
            key = reader.string()
            (value_type,) = reader.unpack("<I")
            metadata[key] = reader.value(value_type)
        if tensors > reader.size - handle.tell():
            raise ValueError(f"{tensors} tensors cannot fit in the file")
        parameters = 0
        for _ in range(tensors):
            reader.string(keep=False)
            (dims,) = reader.unpack("<I")
            if dims > 8:
                raise ValueError(f"a tensor of {dims} dimensions")
            shape = reader.unpack(f"<{dims}Q")
            reader.skip(12)  # type (u32) and offset (u64)
            parameters += math.prod(shape)
        return metadata, parameters
