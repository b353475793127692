"""Echo requests through a whole local pool against the echo backend called directly, in one run.

    python bench/echo_pool.py --requests 20000 --json bench/results/echo_pool.json

The direct baseline is the upper bound (no Redis, no Celery); the ratio says what the pool costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from inferpool import BatchRunner, Client, Registry, Settings
from inferpool.local_pool import LocalPool
from inferpool.wire import ChatRequest
from inferpool.workers.backend import create_backend


def _lines(n: int) -> list[str]:
    return [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "echo",
                    "messages": [{"role": "user", "content": f"prompt number {i}"}],
                    "max_tokens": 8,
                },
            }
        )
        for i in range(n)
    ]


def direct(n: int) -> float:
    backend = create_backend(Registry.load().get("echo"), Settings())
    requests = [ChatRequest.model_validate(json.loads(line)["body"]) for line in _lines(n)]
    started = time.perf_counter()
    asyncio.run(backend.generate(requests))
    return n / (time.perf_counter() - started)


def through_pool(n: int) -> float:
    lines = _lines(n)
    with LocalPool(["echo"]) as pool, Client(pool.redis_url) as client:
        started = time.perf_counter()
        outcome = BatchRunner(client).run(lines)
        elapsed = time.perf_counter() - started
    assert outcome.completed == n, f"{outcome.completed} of {n} completed"
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    figures = {"requests": args.requests, "direct_rps": direct(args.requests), "pool_rps": through_pool(args.requests)}
    figures["pool_over_direct"] = figures["pool_rps"] / figures["direct_rps"]
    print(f"{'path':<10}{'requests/s':>14}")
    print(f"{'direct':<10}{figures['direct_rps']:>14.0f}")
    print(f"{'pool':<10}{figures['pool_rps']:>14.0f}")
    print(f"pool / direct = {figures['pool_over_direct']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
