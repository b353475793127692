"""Registry YAML: the built-in models, merging user files, aliases, and errors that name file, entry and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferpool import ModelNotFound, Registry, RegistryError


def test_builtin_registry_has_smollm2_and_echo() -> None:
    registry = Registry.load()
    assert {"smollm2-135m", "echo"} <= {spec.name for spec in registry}
    assert registry.get("smollm2").name == "smollm2-135m"
    assert registry.get("smollm2-135m").backend == "transformers"


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ModelNotFound, match=r"'gpt-9'.*known models: .*echo"):
        Registry.load().get("gpt-9")


def test_user_file_adds_and_replaces_models(tmp_path: Path) -> None:
    extra = tmp_path / "models.yaml"
    extra.write_text(
        """
models:
  - name: echo
    backend: echo
    params: {delay_ms: 5}
    capabilities: {context_window: 100, max_output_tokens: 50}
  - name: echo-small
    aliases: [tiny]
    backend: echo
    capabilities: {context_window: 10, max_output_tokens: 5}
"""
    )
    registry = Registry.load([extra])
    assert registry.get("echo").capabilities.context_window == 100
    assert registry.get("tiny").name == "echo-small"
    assert "smollm2-135m" in registry


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("models: [\n", ["not valid YAML"]),
        ("- just a list\n", ["top level must be a mapping"]),
        (
            "models:\n  - name: broken\n    backend: echo\n    capabilities: {context_window: -5, max_output_tokens: 1}\n",
            ["model 'broken'", "capabilities.context_window", "greater than 0"],
        ),
        ("models:\n  - name: nocaps\n    backend: echo\n", ["model 'nocaps'", "capabilities", "Field required"]),
        (
            "models:\n  - name: x\n    backend: echo\n    colour: red\n    capabilities: {context_window: 5, max_output_tokens: 1}\n",
            ["model 'x'", "colour"],
        ),
    ],
)
def test_invalid_registry_names_file_entry_and_field(tmp_path: Path, text: str, fragments: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(RegistryError) as info:
        Registry.load([bad])
    message = str(info.value)
    assert str(bad) in message
    for fragment in fragments:
        assert fragment in message


def test_alias_clash_is_refused(tmp_path: Path) -> None:
    clash = tmp_path / "clash.yaml"
    clash.write_text(
        "models:\n  - name: other\n    aliases: [smollm2]\n    backend: echo\n"
        "    capabilities: {context_window: 5, max_output_tokens: 1}\n"
    )
    with pytest.raises(RegistryError, match="alias 'smollm2'"):
        Registry.load([clash])


def test_missing_registry_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read registry file"):
        Registry.load([tmp_path / "nope.yaml"])


def test_providers_give_their_models_a_backend_endpoint_key_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text("""
providers:
  together: {kind: openai-compatible, base_url: "https://api.together.example/v1", api_key_env: TOGETHER_API_KEY,
             rate_limit: {requests: 600, per_s: 60}}
  claude: {kind: anthropic}
  gpu: {kind: local, backend: vllm, params: {dtype: bfloat16}}
models:
  - name: llama-together
    provider: together
    params: {model: meta-llama/Llama-3-8b-chat-hf, max_attempts: 3}
    capabilities: {context_window: 8192, max_output_tokens: 1024}
  - name: sonnet
    provider: claude
    capabilities: {context_window: 200000, max_output_tokens: 8192}
  - name: local-llama
    provider: gpu
    params: {path: /models/llama, dtype: float16}
    capabilities: {context_window: 8192, max_output_tokens: 1024}
""")
    registry = Registry.load([path])
    together = registry.get("llama-together")
    assert together.backend == "openai"
    assert together.params == {"base_url": "https://api.together.example/v1", "api_key_env": "TOGETHER_API_KEY",
                               "rate_limit": {"requests": 600, "per_s": 60},
                               "model": "meta-llama/Llama-3-8b-chat-hf", "max_attempts": 3}  # fmt: skip
    assert registry.get("sonnet").backend == "anthropic"
    local = registry.get("local-llama")
    assert (local.backend, local.params) == ("vllm", {"dtype": "float16", "path": "/models/llama"})  # model wins


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "models: [{name: m, provider: nope, capabilities: {context_window: 8, max_output_tokens: 4}}]",
            "model 'm': provider 'nope' is not defined",
        ),
        (
            "models: [{name: m, capabilities: {context_window: 8, max_output_tokens: 4}}]",
            "model 'm': give a backend or a provider",
        ),
        ("providers: {x: {kind: openai-compatible}}", "an openai-compatible provider needs base_url"),
    ],
)
def test_provider_mistakes_are_clear(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=message):
        Registry.load([path])


def test_ignore_eos_is_for_vllm_models_only() -> None:
    """vLLM's ``ignore_eos`` (fixed-length benchmarks such as ``vllm bench serve``) is taken by a vLLM model and
    refused, with what to do, by any other rather than silently ignored."""
    from inferpool import InvalidRequest
    from inferpool.model_registry.capability import check_request_fits
    from inferpool.wire import ChatRequest, CompletionRequest

    registry = Registry.load()
    chat = ChatRequest(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=8, ignore_eos=True)
    completion = CompletionRequest(model="x", prompt="hi", max_tokens=8, ignore_eos=True)
    for request in (chat, completion):
        check_request_fits(registry.get("smollm2-135m-vllm"), request)
        with pytest.raises(InvalidRequest, match="ignore_eos is vLLM's extension; model 'echo' runs on 'echo'"):
            check_request_fits(registry.get("echo"), request)
