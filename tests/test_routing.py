"""Routing rules: deprecated models rewritten to their replacement (with a warning that reaches the
result), LoRA adapter names carried through, and the registry checks that keep both consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferpool import (
    BatchOutputLine,
    Client,
    ContextLengthExceeded,
    JobStatus,
    ModelNotFound,
    Registry,
    RegistryError,
    RequestResult,
)
from inferpool.client.batch_lines import AcceptedLine, BatchLineParser
from inferpool.client.routing import Router
from inferpool.wire import ChatRequest, TaskItem

REGISTRY = """
models:
  - name: base
    backend: echo
    capabilities: {context_window: 4096, max_output_tokens: 512}
    lora_adapters: {tiny: /adapters/tiny}
  - name: old
    backend: echo
    capabilities: {context_window: 4096, max_output_tokens: 512}
    deprecation: {since: 2026-01-01, replacement: older-still-ok}
  - name: older-still-ok
    backend: echo
    capabilities: {context_window: 4096, max_output_tokens: 512}
    deprecation: {replacement: base, note: "base is cheaper"}
  - name: sunset
    backend: echo
    capabilities: {context_window: 4096, max_output_tokens: 512}
    deprecation: {since: 2026-06-30}
"""


def _router(tmp_path: Path, text: str = REGISTRY) -> Router:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return Router(Registry.load([path]))


def _request(model: str) -> ChatRequest:
    return ChatRequest(model=model, messages=[{"role": "user", "content": "hi"}])  # type: ignore[list-item]


def test_deprecated_models_follow_their_replacement_chain_with_warnings(tmp_path: Path) -> None:
    route = _router(tmp_path).route(_request("old"))
    assert (route.spec.name, route.model) == ("base", "base")
    assert route.warnings == (
        "model 'old' is deprecated since 2026-01-01; 'older-still-ok' served this request",
        "model 'older-still-ok' is deprecated; 'base' served this request (base is cheaper)",
    )


def test_deprecated_model_without_replacement_is_served_with_a_warning(tmp_path: Path) -> None:
    route = _router(tmp_path).route(_request("sunset"))
    assert route.spec.name == "sunset"
    assert route.warnings == ("model 'sunset' is deprecated since 2026-06-30 and will be removed",)


def test_adapter_names_are_kept_and_checked(tmp_path: Path) -> None:
    router = _router(tmp_path)
    route = router.route(_request("base:tiny"))
    assert (route.spec.name, route.model, route.warnings) == ("base", "base:tiny", ())
    with pytest.raises(ModelNotFound, match="no LoRA adapter 'huge'; its adapters: tiny"):
        router.route(_request("base:huge"))
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "base:tiny", "messages": [{"role": "user", "content": "hi"}]}})  # fmt: skip
    parsed = BatchLineParser(router).parse_line(1, line)
    assert isinstance(parsed, AcceptedLine)
    assert parsed.request.model == "base:tiny"  # the adapter survives the batch path
    item = TaskItem(request_id="req_1", request=parsed.request)
    assert item.served_model == "base"  # queued and counted under the model that serves it


@pytest.mark.parametrize(
    ("deprecation", "message"),
    [
        ("{replacement: nowhere}", "deprecation.replacement 'nowhere' is not in the registry"),
        ("{replacement: b}", "deprecation replacements loop: a -> b -> a"),
    ],
)
def test_bad_replacements_are_registry_errors(tmp_path: Path, deprecation: str, message: str) -> None:
    text = f"""
models:
  - name: a
    backend: echo
    capabilities: {{context_window: 10, max_output_tokens: 5}}
    deprecation: {deprecation}
  - name: b
    backend: echo
    capabilities: {{context_window: 10, max_output_tokens: 5}}
    deprecation: {{replacement: a}}
"""
    with pytest.raises(RegistryError, match=message):
        _router(tmp_path, text)


def test_output_line_fast_path_equals_the_model_path() -> None:
    stats = {"model": "m", "backend": "openai", "worker": "w", "queued_s": 0, "latency_s": 1}
    for warnings, served in ((None, None), (["model 'x' is deprecated"], stats),
                             (None, {**stats, "via": "provider-batch"})):  # fmt: skip
        result = RequestResult.model_validate({
            "request_id": "req_1", "custom_id": "c1", "warnings": warnings, "stats": served,
            "response": {"id": "chatcmpl-1", "created": 1, "model": "echo", "usage": {"prompt_tokens": 1,
                         "completion_tokens": 2, "total_tokens": 3},
                         "choices": [{"index": 0, "message": {"content": "echo: hi"}, "finish_reason": "stop"}]},
        })  # fmt: skip
        fast, ok = BatchOutputLine.json_from_stored_result(result.model_dump_json(exclude_none=True))
        slow = json.loads(BatchOutputLine.from_result(result).model_dump_json())
        fast_line = json.loads(fast)
        assert ok
        assert {k: v for k, v in fast_line.items() if k != "id"} == {k: v for k, v in slow.items() if k != "id"}
        assert ("warnings" in fast_line) == (warnings is not None)
        assert fast_line.get("via") == (served and served.get("via", "realtime"))


@pytest.mark.usefixtures("echo_worker", "scheduler")
def test_a_deprecated_model_is_served_by_its_replacement_through_the_pool(client: Client) -> None:
    result = client.submit({"model": "echo-old", "messages": [{"role": "user", "content": "hi there"}]}).result(30)
    assert result.response is not None
    assert result.response.text == "echo: hi there"
    assert result.stats is not None
    assert result.stats.model == "echo"
    assert result.warnings == ["model 'echo-old' is deprecated since 2026-01-01; 'echo' served this request "
                               "(send model echo instead)"]  # fmt: skip
    lines = [json.dumps({"custom_id": f"d{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "echo-old" if i % 2 else "echo",
                                  "messages": [{"role": "user", "content": f"line {i}"}]}}) for i in range(10)]  # fmt: skip
    job = client.batches.wait(client.batches.create(lines).id, timeout=60)
    assert job.status == JobStatus.COMPLETED
    assert [row.model for row in job.usage] == ["echo"]
    output = {line.custom_id: line for line in client.batches.results(job.id)}
    assert len(output) == 10
    for i in range(10):
        line = output[f"d{i}"]
        assert line.response is not None
        assert bool(line.warnings) == bool(i % 2)


def test_a_prompt_that_cannot_fit_goes_to_a_larger_fallback_or_is_refused_before_queueing(tmp_path: Path) -> None:
    router = _router(
        tmp_path,
        """
models:
  - name: small
    backend: echo
    capabilities: {context_window: 100, max_output_tokens: 50}
    fallbacks: [also-small, big]
  - name: also-small
    backend: echo
    capabilities: {context_window: 100, max_output_tokens: 50}
  - name: big
    backend: echo
    capabilities: {context_window: 100000, max_output_tokens: 50}
""",
    )
    huge = ChatRequest(model="small", messages=[{"role": "user", "content": "x" * 10_000}])  # type: ignore[list-item]
    route = router.route(huge)
    assert route.spec.name == "big"  # also-small is no larger, so it is skipped
    assert route.warnings == ("the prompt is too long for model 'small'; sent to its fallback 'big'",)
    with pytest.raises(ContextLengthExceeded, match=r"at least 312 tokens .* no larger fallback"):
        router.route(huge.model_copy(update={"model": "also-small"}))
    assert router.route(_request("small")).spec.name == "small"  # short prompts stay
