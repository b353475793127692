"""Single requests under concurrency: ``AsyncClient.chat`` at 16, 64, 256 and 1,024 in flight against plain Celery.

    python bench/single_requests.py --requests 4000 --json bench/results/single_requests.json

One private Redis; one inferpool echo worker (``inferpool worker --model echo``) and one plain Celery worker
(``-P threads -c 4``, Redis result backend) side by side. inferpool: one ``AsyncClient`` (one process, one event
loop, as a service or the gateway uses it) keeps N chats in flight until ``--requests`` were answered. Plain
Celery: ``--requests`` ``echo.delay()`` calls sent at once, then every ``.get()``: its best case (nothing
waits for a slot). Printed: requests/s of each, the ratio, and inferpool's p50/p99 latency per concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def pool_run(url: str, concurrency: int, requests: int) -> dict[str, float]:
    from inferpool import AsyncClient, Settings

    async with AsyncClient(settings=Settings(redis_url=url)) as client:
        await asyncio.gather(*(client.chat("echo", [{"role": "user", "content": "warm"}], timeout=60)
                               for _ in range(min(concurrency, 64))))  # fmt: skip
        latencies: list[float] = []
        counter = iter(range(requests))

        async def lane() -> None:
            for i in counter:
                started = time.perf_counter()
                await client.chat("echo", [{"role": "user", "content": f"ping {i}"}], timeout=120)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {"rps": round(requests / seconds, 1), "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2)}  # fmt: skip


def plain_run(requests: int) -> dict[str, float]:
    from plain_celery_app import echo

    for _ in range(50):
        echo.delay("warm").get(timeout=30)
    started = time.perf_counter()
    pending = [echo.delay(f"ping {i}") for i in range(requests)]
    for result in pending:
        result.get(timeout=300)
    seconds = time.perf_counter() - started
    return {"rps": round(requests / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000, help="requests per concurrency (and for plain Celery)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from _plain_worker import echo_beside_plain_celery

    figures: dict[str, Any] = {"requests": args.requests}
    with echo_beside_plain_celery("inferpool-single-") as url:
        figures["plain_celery"] = plain_run(args.requests)
        for concurrency in args.concurrency:
            figures[f"inferpool_{concurrency}"] = asyncio.run(pool_run(url, concurrency, args.requests))
        figures["plain_celery_after"] = plain_run(args.requests)
    plain_rps = (figures["plain_celery"]["rps"] + figures["plain_celery_after"]["rps"]) / 2
    print(f"plain Celery (mean of before and after): {plain_rps:.1f} tasks/s")
    print(f"{'in flight':>10}{'req/s':>10}{'x plain':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for concurrency in args.concurrency:
        row = figures[f"inferpool_{concurrency}"]
        row["x_plain"] = round(row["rps"] / plain_rps, 2)
        print(f"{concurrency:>10}{row['rps']:>10.1f}{row['x_plain']:>9.2f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
