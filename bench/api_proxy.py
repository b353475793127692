"""API-proxy workers against the provider emulator: achieved time against the ideal, in one run.

    python bench/api_proxy.py --requests 2000 --latency 0.2 --json bench/results/api_proxy.json

N requests to an emulated OpenAI endpoint answering after LATENCY seconds (the emulator runs in this
process), each way in the same run:
- the openai SDK called directly from one process, 64 in flight (the baseline; no pool);
- optionally LiteLLM's Router the same way (``--litellm-python`` names a Python that has litellm);
- inferpool: a batch job through a local pool (private Redis, scheduler, one worker process), unlimited;
  ideal = N x LATENCY / 64 (CPU-bound on 2 cores: the SDK costs ~3-4 ms of CPU per request);
- the same with 16 in flight: ideal = N x LATENCY / 16 (not CPU-bound);
- inferpool with a shared limit of 1000 requests per 10 s; ideal = N / 100 per second.
The emulator counts every request it receives and every one over the limit (a violation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from inferpool import Client, JobStatus
from inferpool.emulators import EmulatorConfig, ProviderEmulator, WindowLimit
from inferpool.plumbing.local_pool import LocalPool

BENCH = Path(__file__).resolve().parent
CONCURRENCY = 64
LIMIT_REQUESTS, LIMIT_PER_S = 1000, 10.0


def run_job(model: str, n: int, emulator: ProviderEmulator) -> dict[str, float]:
    env = {
        "INFERPOOL_REGISTRY": str(BENCH / "registry.yaml"),
        "OPENAI_BASE_URL": emulator.openai_base_url,
        "OPENAI_API_KEY": "sk-bench",
    }
    os.environ["INFERPOOL_REGISTRY"] = env["INFERPOOL_REGISTRY"]
    emulator.reset_counts()
    lines = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": model, "messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 8}})
        for i in range(n)
    ]  # fmt: skip
    with LocalPool([model], env=env) as pool, Client(pool.redis_url) as client:
        started = time.perf_counter()
        job = client.batches.wait(client.batches.create(lines).id, poll_s=0.05)
        elapsed = time.perf_counter() - started
    if job.status != JobStatus.COMPLETED or job.request_counts.completed != n:
        raise SystemExit(f"{model}: {job.request_counts}")
    return {"seconds": elapsed, "requests_per_s": n / elapsed, "received": emulator.counts["received"],
            "violations": emulator.counts["limit_exceeded"]}  # fmt: skip


_DIRECT = """
import asyncio, sys, time
from openai import AsyncOpenAI
async def main():
    client = AsyncOpenAI(api_key="sk-bench", base_url=sys.argv[1], max_retries=0)
    gate = asyncio.Semaphore(64)
    async def one(i):
        async with gate:
            await client.chat.completions.create(model="bench-emu", messages=[{"role": "user", "content": f"q {i}"}],
                                                 max_tokens=8)
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(int(sys.argv[2]))))
    print(time.perf_counter() - started)
asyncio.run(main())
"""

_LITELLM = """
import asyncio, sys, time
from litellm import Router
async def main():
    router = Router(model_list=[{"model_name": "bench", "litellm_params": {
        "model": "openai/bench-emu", "api_base": sys.argv[1], "api_key": "sk-bench"}}], num_retries=0)
    gate = asyncio.Semaphore(64)
    async def one(i):
        async with gate:
            await router.acompletion(model="bench", messages=[{"role": "user", "content": f"q {i}"}], max_tokens=8)
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(int(sys.argv[2]))))
    print(time.perf_counter() - started)
asyncio.run(main())
"""


def run_direct(python: str, code: str, n: int, emulator: ProviderEmulator) -> dict[str, float]:
    """The same N requests from one process calling the SDK itself with 64 in flight (no pool)."""
    emulator.reset_counts()
    out = subprocess.run([python, "-c", code, emulator.openai_base_url, str(n)], capture_output=True, text=True,
                         check=True, env={**os.environ, "LITELLM_LOG": "ERROR"})  # fmt: skip
    elapsed = float(out.stdout.strip().splitlines()[-1])
    return {"seconds": elapsed, "requests_per_s": n / elapsed, "received": emulator.counts["received"],
            "violations": 0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--litellm-python",
        default=None,
        help="a Python with litellm installed: also run the workload through LiteLLM's Router",
    )
    args = parser.parse_args()
    limits = {"bench-emu-limited": WindowLimit(requests=LIMIT_REQUESTS, per_s=LIMIT_PER_S)}
    emulator = ProviderEmulator(EmulatorConfig(latency_s=args.latency, limits=limits)).start()
    unlimited_ideal = args.requests * args.latency / CONCURRENCY
    rows: dict[str, dict[str, float]] = {}
    try:
        rows["direct openai SDK, 64 in flight"] = run_direct(sys.executable, _DIRECT, args.requests, emulator)
        if args.litellm_python:
            rows["LiteLLM Router, 64 in flight"] = run_direct(args.litellm_python, _LITELLM, args.requests, emulator)
        rows["inferpool, no limit, 1 worker"] = run_job("bench-gpt", args.requests, emulator)
        for row in rows.values():
            row["ideal_s"] = unlimited_ideal
        sixteen = run_job("bench-gpt-16", args.requests, emulator)
        sixteen["ideal_s"] = args.requests * args.latency / 16
        rows["inferpool, no limit, 16 in flight"] = sixteen
        limited = run_job("bench-gpt-limited", args.requests, emulator)
        limited["ideal_s"] = args.requests / (LIMIT_REQUESTS / LIMIT_PER_S)
        rows[f"inferpool, limit {LIMIT_REQUESTS} req/{LIMIT_PER_S:g} s"] = limited
    finally:
        emulator.stop()
    print(f"{'run':<36}{'seconds':>9}{'ideal s':>9}{'achieved/ideal':>16}{'req/s/process':>15}{'violations':>12}")
    for name, row in rows.items():
        row["ratio"] = row["seconds"] / row["ideal_s"]
        print(f"{name:<36}{row['seconds']:>9.2f}{row['ideal_s']:>9.2f}{row['ratio']:>16.3f}"
              f"{row['requests_per_s']:>15.0f}{int(row['violations']):>12}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
