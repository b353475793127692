"""Prefix routing against load-only routing, through a pool of vLLM workers on this CPU, in one run.

    python bench/prefix_routing.py --docs 8 --questions 6 --doc-words 1400 --json bench/results/prefix_routing.json

A RAG-shaped batch job: D documents (~2,000 tokens each at the default size) x Q questions, one user
message "document, then question" per line, the file in question-major order (every document's first
question, then every second question...), greedy, a few output tokens (the cost is the prefill). Scenarios
(``--scenarios``, all by default):

- ``two-workers``: two vLLM workers, each bound to one core (``VLLM_CPU_OMP_THREADS_BIND``), the same job
  run with ``--routing load`` and with ``--routing prefix`` (fresh documents for each run, so neither
  finds the other's prefixes cached). Reported per run: wall time, prompt tokens prefilled (prompt tokens
  less those the engines found cached, from their own per-request counts), each worker's share of lines
  (max/mean), and whether every line has exactly one result.
- ``small-cache``: one worker whose KV cache (1 GiB, the least ``VLLM_CPU_KVCACHE_SPACE`` takes: ~23k
  fp32 tokens) holds fewer than the job's documents (``--small-cache-docs``, 16 of ~2,000 tokens): the
  file's order (load routing: first in, first out) against prefix grouping (a document's questions taken
  together).
- ``unique``: D x Q prompts that share nothing: prefix routing must cost nothing (ratio ~1).

Ratios are load / prefix wall time (above 1: prefix routing is faster). One run each: this machine's
speed drifts by +-15% over minutes, so read small differences as noise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from local_engines import checkpoint  # noqa: E402

from inferpool import Client, Settings  # noqa: E402
from inferpool.plumbing.local_pool import (  # noqa: E402
    EmbeddedRedis,
    WorkerProcess,
    start_scheduler_process,
    start_worker_process,
    stop_process,
    wait_for_workers,
)

MODEL = "bench-vllm-prefix"
WORDS = (
    "river", "stone", "market", "winter", "signal", "harbour", "engine", "garden", "copper", "lantern",
    "orchard", "valley", "ledger", "meadow", "bridge", "canvas", "summit", "thread", "quarry", "beacon",
    "timber", "cellar", "falcon", "glacier", "island", "jasmine", "kettle", "marble", "needle", "oyster",
)  # fmt: skip
QUESTIONS = ("Which word comes first?", "Name one metal in the text.", "Is a bird mentioned?",
             "What is the last word?", "Name a place in the text.", "Is water mentioned?",
             "Name a plant in the text.", "How does the text start?")  # fmt: skip


def document(seed: str, words: int) -> str:
    rng = random.Random(seed)
    return f"Document {seed}. " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def job_lines(tag: str, docs: int, questions: int, words: int, *, unique: bool = False) -> list[dict[str, Any]]:
    """Question-major lines (all first questions, then all second ones...)."""
    texts = [document(f"{tag}-{d}", words) for d in range(docs)]
    lines = []
    for q in range(questions):
        for d in range(docs):
            text = document(f"{tag}-{d}-{q}", words) if unique else texts[d]
            content = f"{text}\n\nQuestion: {QUESTIONS[q % len(QUESTIONS)]} (#{q})"
            lines.append({"custom_id": f"{tag}-d{d}-q{q}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": MODEL, "temperature": 0, "max_tokens": 4,
                                   "messages": [{"role": "user", "content": content}]}})  # fmt: skip
    return lines


def registry(path: Path, kv_cache_gib: int) -> None:
    entry = {
        "name": MODEL, "backend": "vllm",
        "params": {"path": str(checkpoint()), "dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
                   "env": {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}},
        "capabilities": {"context_window": 4096, "max_output_tokens": 64},
        "serving": {"concurrency": 16, "chunk_size": 4, "in_flight_per_worker": 16},
    }  # fmt: skip
    path.write_text(yaml.safe_dump({"models": [entry]}))


class Pool:
    """A private Redis, a scheduler and ``workers`` vLLM workers, worker i bound to core i."""

    def __init__(self, workdir: Path, workers: int, kv_cache_gib: int) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True)
        registry(workdir / "registry.yaml", kv_cache_gib)
        self.env = {"INFERPOOL_REGISTRY": str(workdir / "registry.yaml"), "VLLM_CACHE_ROOT": str(workdir / "vc")}
        self.redis = EmbeddedRedis(workdir / "redis")
        self.redis.start()
        self.scheduler = start_scheduler_process(self.redis.url, workdir / "scheduler.log", self.env)
        self.workers: list[WorkerProcess] = [
            start_worker_process(
                MODEL,
                self.redis.url,
                workdir / f"worker-{i}.log",
                env={**self.env, "VLLM_CPU_OMP_THREADS_BIND": str(i)},
            )
            for i in range(workers)
        ]
        client = redis.Redis.from_url(self.redis.url)
        wait_for_workers(client, self.workers, 900)
        client.close()

    def stop(self) -> None:
        for process in [self.scheduler, *self.workers]:
            stop_process(process.proc, grace_s=60)
        self.redis.stop()


def run_job(pool: Pool, lines: list[dict[str, Any]], routing: str) -> dict[str, Any]:
    with Client(settings=Settings(redis_url=pool.redis.url, registry=[pool.workdir / "registry.yaml"])) as client:
        started = time.perf_counter()
        job = client.batches.create([json.dumps(line) for line in lines], routing=routing)  # type: ignore[arg-type]
        done = client.batches.wait(job.id, timeout=3600, poll_s=0.2)
        wall = time.perf_counter() - started
        results = list(client.batches.request_results(job.id))
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise SystemExit(f"{len(failed)} lines failed, e.g. {failed[0]}")
    shares = Counter(r.stats.worker for r in results if r.stats)
    usage = done.usage[0] if done.usage else None
    prompt = usage.prompt_tokens if usage else 0
    cached = usage.prefix_cached_tokens if usage else 0
    mean = len(lines) / max(1, len(shares))
    return {
        "routing": routing, "lines": len(lines), "wall_s": round(wall, 2), "status": done.status.value,
        "exactly_once": len({r.request_id for r in results}) == len(lines) == done.request_counts.completed,
        "prompt_tokens": prompt, "prefix_cached_tokens": cached, "prefilled_tokens": prompt - cached,
        "worker_lines": dict(shares), "max_over_mean": round(max(shares.values()) / mean, 3) if shares else None,
    }  # fmt: skip


def compare(pool: Pool, name: str, make: Any) -> dict[str, Any]:
    runs = {routing: run_job(pool, make(f"{name}-{routing}"), routing) for routing in ("load", "prefix")}
    ratio = runs["load"]["wall_s"] / runs["prefix"]["wall_s"]
    prefill = runs["load"]["prefilled_tokens"] / max(1, runs["prefix"]["prefilled_tokens"])
    load_s, prefix_s, shares = runs["load"]["wall_s"], runs["prefix"]["wall_s"], runs["prefix"]["worker_lines"]
    print(
        f"{name}: load {load_s} s, prefix {prefix_s} s -> {ratio:.2f}x; prefilled tokens load/prefix "
        f"{prefill:.2f}x; shares {shares}",
        flush=True,
    )
    return {"runs": runs, "wall_ratio_load_over_prefix": round(ratio, 3), "prefill_ratio": round(prefill, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--doc-words", type=int, default=1400, help="~1.4 tokens per word: 1400 is ~2,000 tokens")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    parser.add_argument(
        "--small-cache-docs",
        type=int,
        default=16,
        help="small-cache: documents in the job (1 GiB of fp32 KV cache holds ~23k tokens)",
    )
    parser.add_argument("--small-cache-questions", type=int, default=3, help="small-cache: questions per document")
    parser.add_argument("--scenarios", default="two-workers,small-cache,unique")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    d, q, w = args.docs, args.questions, args.doc_words
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        if "two-workers" in scenarios or "unique" in scenarios:
            pool = Pool(Path(tmp) / "two", 2, args.kv_cache_gib)
            try:
                if "two-workers" in scenarios:
                    report["two_workers"] = compare(pool, "two-workers", lambda tag: job_lines(tag, d, q, w))
                if "unique" in scenarios:
                    report["unique"] = compare(pool, "unique", lambda tag: job_lines(tag, d, q, w, unique=True))
            finally:
                pool.stop()
        if "small-cache" in scenarios:
            pool = Pool(Path(tmp) / "small", 1, 1)
            try:
                many, few = args.small_cache_docs, args.small_cache_questions
                report["small_cache"] = compare(pool, "small-cache", lambda tag: job_lines(tag, many, few, w))
            finally:
                pool.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
