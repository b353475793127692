"""The response cache: a job where half the lines repeat earlier ones, without and with the cache, in one run.

    python bench/cache.py --lines 20000 --latency 0.05 --json bench/results/cache.json

N lines through a local pool (private Redis, scheduler, one API-proxy worker) to the OpenAI emulator
answering after LATENCY seconds; every other line repeats an earlier line's prompt (temperature 0):
- baseline: the job on ``bench-gpt`` (no cache);
- first run on ``bench-gpt-cached``: the distinct half is computed, the repeats are answered from the
  cache (or wait for their twin in flight);
- second run of the same job: everything from the cache.
Prints seconds, provider calls (counted by the emulator), cost and cache hits per run, and each run's
time and cost as a ratio of the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from inferpool import Client, JobStatus
from inferpool.emulators import EmulatorConfig, ProviderEmulator
from inferpool.plumbing.local_pool import LocalPool

BENCH = Path(__file__).resolve().parent


def job_lines(n: int, model: str) -> list[str]:
    """Even lines ask a new question, odd lines repeat a random earlier one."""
    rng = random.Random(0)
    prompts: list[str] = []
    for i in range(n):
        prompts.append(f"question {i // 2}" if i % 2 == 0 else rng.choice(prompts))
    return [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8,
                                 "temperature": 0}}) for i, text in enumerate(prompts)]  # fmt: skip


def run(client: Client, lines: list[str], emulator: ProviderEmulator) -> dict[str, float]:
    emulator.reset_counts()
    started = time.perf_counter()
    job = client.batches.wait(client.batches.create(lines).id, poll_s=0.05)
    elapsed = time.perf_counter() - started
    if job.status != JobStatus.COMPLETED or job.request_counts.completed != len(lines):
        raise SystemExit(f"{job.id}: {job.status} {job.request_counts}")
    (usage,) = job.usage
    return {"seconds": elapsed, "provider_calls": emulator.counts["received"], "cost_usd": usage.cost_usd,
            "cache_hits": usage.cache_hits, "saved_usd": usage.saved_usd}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--latency", type=float, default=0.05, help="the emulator's seconds per answer")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    emulator = ProviderEmulator(EmulatorConfig(latency_s=args.latency)).start()
    env = {"INFERPOOL_REGISTRY": str(BENCH / "registry.yaml"), "OPENAI_BASE_URL": emulator.openai_base_url,
           "OPENAI_API_KEY": "sk-bench"}  # fmt: skip
    os.environ["INFERPOOL_REGISTRY"] = env["INFERPOOL_REGISTRY"]
    rows: dict[str, dict[str, float]] = {}
    try:
        with LocalPool(["bench-gpt", "bench-gpt-cached"], env=env) as pool, Client(pool.redis_url) as client:
            rows["no cache (baseline)"] = run(client, job_lines(args.lines, "bench-gpt"), emulator)
            cached = job_lines(args.lines, "bench-gpt-cached")
            rows["cache, first run"] = run(client, cached, emulator)
            rows["cache, second run"] = run(client, cached, emulator)
    finally:
        emulator.stop()
    base = rows["no cache (baseline)"]
    print(f"{args.lines} lines, half repeating earlier ones, emulator latency {args.latency} s")
    print(f"{'run':<22}{'seconds':>9}{'x time':>8}{'provider calls':>16}{'cost $':>10}{'x cost':>8}{'hits':>7}"
          f"{'saved $':>10}")  # fmt: skip
    for name, row in rows.items():
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["cost_ratio"] = row["cost_usd"] / base["cost_usd"] if base["cost_usd"] else float("nan")
        print(f"{name:<22}{row['seconds']:>9.2f}{row['time_ratio']:>8.3f}{int(row['provider_calls']):>16}"
              f"{row['cost_usd']:>10.5f}{row['cost_ratio']:>8.3f}{int(row['cache_hits']):>7}"
              f"{row['saved_usd']:>10.5f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
