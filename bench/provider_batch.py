"""Real-time API against the providers' Batch APIs, for the same job, in one run.

    python bench/provider_batch.py --lines 10000 --latency 0.05 --batch-delay 60 --json bench/results/pbatch.json

N lines, half for an OpenAI model and half for an Anthropic one (``bench-gpt-batch``,
``bench-claude-batch``: both with ``batch_api`` enabled, default half price), through a local pool
(private Redis, scheduler, one API worker per model) to the emulators: real-time answers after LATENCY
seconds, provider batches done BATCH_DELAY seconds after they are created.
- baseline: the job with ``--via realtime`` (one chat call per line);
- the same job with ``--via provider-batch`` (files, batches and polls).
Prints, per path: HTTP requests the provider received, cost at that path's price (from the job's usage),
wall time from submit to the last result, and each as a ratio of the real-time baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

from inferpool import Client, JobStatus
from inferpool.emulators import EmulatorConfig, ProviderEmulator
from inferpool.plumbing.local_pool import LocalPool
from inferpool.wire import Via

BENCH = Path(__file__).resolve().parent
MODELS = ("bench-gpt-batch", "bench-claude-batch")


def job_lines(n: int) -> list[str]:
    return [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": MODELS[i % 2], "max_tokens": 16,
                                 "messages": [{"role": "user", "content": f"summarise item {i} in a few words"}]}})
            for i in range(n)]  # fmt: skip


def run(client: Client, lines: list[str], emulator: ProviderEmulator, via: Via) -> dict[str, float]:
    emulator.reset_counts()
    started = time.perf_counter()
    job = client.batches.wait(client.batches.create(lines, via=via).id, poll_s=0.1)
    elapsed = time.perf_counter() - started
    if job.status != JobStatus.COMPLETED or job.request_counts.completed != len(lines):
        errors = Counter(r.error.message[:200] for r in client.batches.request_results(job.id) if r.error)
        raise SystemExit(f"{job.id}: {job.status} {job.request_counts}; errors: {errors.most_common(3)}")
    requests = emulator.counts["received"] + emulator.counts["batch_api_requests"]
    return {"seconds": elapsed, "provider_requests": requests, "cost_usd": sum(u.cost_usd for u in job.usage),
            "provider_batches": len(job.provider_batches)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=0.05, help="the emulator's seconds per real-time answer")
    parser.add_argument("--batch-delay", type=float, default=60.0, help="seconds a provider batch takes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    emulator = ProviderEmulator(EmulatorConfig(latency_s=args.latency, batch_delay_s=args.batch_delay)).start()
    env = {"INFERPOOL_REGISTRY": str(BENCH / "registry.yaml"), "OPENAI_BASE_URL": emulator.openai_base_url,
           "ANTHROPIC_BASE_URL": emulator.url, "OPENAI_API_KEY": "sk-bench", "ANTHROPIC_API_KEY": "sk-ant-bench",
           "INFERPOOL_PROVIDER_BATCH_POLL_S": "2", "INFERPOOL_PROVIDER_BATCH_POLL_MAX_S": "10"}  # fmt: skip
    os.environ["INFERPOOL_REGISTRY"] = env["INFERPOOL_REGISTRY"]
    rows: dict[str, dict[str, float]] = {}
    lines = job_lines(args.lines)
    try:
        with LocalPool(MODELS, env=env) as pool, Client(pool.redis_url) as client:
            rows["real-time API (baseline)"] = run(client, lines, emulator, "realtime")
            rows["provider Batch APIs"] = run(client, lines, emulator, "provider-batch")
    finally:
        emulator.stop()
    base = rows["real-time API (baseline)"]
    print(f"{args.lines} lines (half OpenAI, half Anthropic); real-time latency {args.latency} s, "
          f"provider batch delay {args.batch_delay} s, polls every 2-10 s")  # fmt: skip
    print(f"{'path':<26}{'provider requests':>18}{'x':>8}{'cost $':>11}{'x':>7}{'seconds':>10}{'x':>7}")
    for name, row in rows.items():
        row["requests_ratio"] = row["provider_requests"] / base["provider_requests"]
        row["cost_ratio"] = row["cost_usd"] / base["cost_usd"]
        row["time_ratio"] = row["seconds"] / base["seconds"]
        print(f"{name:<26}{int(row['provider_requests']):>18}{row['requests_ratio']:>8.4f}{row['cost_usd']:>11.5f}"
              f"{row['cost_ratio']:>7.3f}{row['seconds']:>10.1f}{row['time_ratio']:>7.2f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
