"""Writing detected capabilities back into a registry YAML file, keeping its comments and order.

An entry already in the file gets only its detected fields changed (and a ``detected:`` record of the
detector, source and time); a model the file does not hold yet is appended whole. The result is checked
by the registry's own parser before it replaces the file (atomically), so a write never leaves a broken registry.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from inferpool._exceptions import RegistryError
from inferpool.model_registry.registry import parse_registry_text
from inferpool.model_registry.spec import ModelSpec


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: comments, order and quoting kept
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 120
    return yaml


def _paths(spec: ModelSpec) -> list[tuple[str, ...]]:
    """The capability keys ``spec.detected`` changed, as paths inside the entry."""
    caps = spec.capabilities
    embedding_only = caps.embeddings is not None and not caps.chat and not caps.completions
    paths: list[tuple[str, ...]] = []
    for field in spec.detected.fields if spec.detected else []:
        if field == "embedding_dimensions":
            paths.append(("capabilities", "embeddings", "dimensions"))
        elif field == "context_window" and embedding_only:
            paths.append(("capabilities", "embeddings", "max_input_tokens"))
        else:
            paths.append(("capabilities", field))
    if not embedding_only:
        paths += [("capabilities", "max_output_tokens"), ("capabilities", "default_max_tokens")]
    return paths


def _value(spec: ModelSpec, path: tuple[str, ...]) -> Any:
    data: Any = spec.model_dump(mode="json")
    for key in path:
        data = data[key]
    return data


def _set(entry: CommentedMap, path: tuple[str, ...], value: Any, only_if_present: bool = False) -> None:
    node = entry
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = CommentedMap()
        node = node[key]
    if only_if_present and path[-1] not in node:
        return
    node[path[-1]] = value


def update_registry_file(path: Path, specs: list[ModelSpec]) -> list[str]:
    """Write ``specs`` (each carrying its ``detected`` record) into ``path``; returns what was done, per model."""
    yaml = _yaml()
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        document = yaml.load(text) if text.strip() else None
    except YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML, not rewritten: {exc}") from None
    document = CommentedMap() if document is None else document
    if not isinstance(document, CommentedMap):
        raise RegistryError(f"{path}: the top level is not a mapping; not rewritten")
    if not isinstance(document.get("models"), CommentedSeq):
        document["models"] = CommentedSeq()
    entries = {entry.get("name"): entry for entry in document["models"] if isinstance(entry, CommentedMap)}
    done: list[str] = []
    for spec in specs:
        record = spec.detected.model_dump(mode="json") if spec.detected else None
        entry = entries.get(spec.name)
        if entry is None:
            document["models"].append(_new_entry(spec))
            done.append(f"{spec.name}: added")
            continue
        for key_path in _paths(spec):
            is_clamp = key_path[-1] in ("max_output_tokens", "default_max_tokens") and key_path[-1] not in (
                spec.detected.fields if spec.detected else [])  # fmt: skip
            _set(entry, key_path, _value(spec, key_path), only_if_present=is_clamp)
        if record is not None:
            entry["detected"] = record
        done.append(f"{spec.name}: updated ({', '.join(spec.detected.fields) if spec.detected else 'nothing'})")
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    parse_registry_text(buffer.getvalue(), str(path))  # never write what the registry would refuse
    _replace(path, buffer.getvalue())
    return done


def _new_entry(spec: ModelSpec) -> CommentedMap:
    data = spec.model_dump(mode="json", exclude_defaults=True)
    data["capabilities"] = spec.capabilities.model_dump(mode="json", exclude_defaults=True) | {
        "context_window": spec.capabilities.context_window,
        "max_output_tokens": spec.capabilities.max_output_tokens,
    }
    entry = CommentedMap()
    for key in ("name", "aliases", "description", "backend", "provider", "detector", "params", "capabilities"):
        if key in data:
            entry[key] = data.pop(key)
    entry.update(data)
    return entry


def _replace(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
