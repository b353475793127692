"""Plugins: objects found by entry-point name (built-ins register the same way as third-party ones) or,
where a registry entry allows it, by import path (``package.module:Attribute``)."""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import Any

from inferpool._exceptions import ConfigurationError

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def installed(group: str) -> dict[str, str]:
    """Entry-point names of ``group`` and the objects they point to."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def load_plugin(group: str, ref: str, what: str, *, allow_path: bool = False) -> Any:
    """The object ``ref`` names: an entry point of ``group``, or (``allow_path``) an import path. A
    ``ConfigurationError`` says what is installed, or why the path does not import."""
    for ep in entry_points(group=group):
        if ep.name == ref:
            try:
                return ep.load()
            except Exception as exc:  # a plugin's import can fail any way; the message names it
                raise ConfigurationError(f"{what} {ref!r} ({ep.value}) does not import: {exc}") from exc
    if allow_path and _IMPORT_PATH.match(ref):
        module_name, _, attribute = ref.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except Exception as exc:  # ImportError, AttributeError, or whatever the module raises on import
            raise ConfigurationError(f"{what} {ref!r} does not import: {type(exc).__name__}: {exc}") from exc
        return target
    names = ", ".join(sorted(installed(group))) or "(none; is inferpool installed with pip?)"
    path_hint = " or give an import path 'package.module:Class'" if allow_path else ""
    raise ConfigurationError(f"no {what} named {ref!r} is installed; installed: {names}{path_hint}")
