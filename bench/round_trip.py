"""One request's round trip, one at a time: inferpool's ``client.chat`` against plain Celery, in one run.

    python bench/round_trip.py --requests 2000 --json bench/results/round_trip.json

Both sides share one private Redis and the machine: an inferpool echo worker (``inferpool worker --model
echo``, the threads pool) and a plain Celery worker (``-P threads``, Redis result backend) run side by
side. The client alternates: one ``client.chat("echo", ...)``, one ``echo.delay(prompt).get()``, so drift
on a shared machine hits both the same. Prints p50/p90/p99 of each and the ratio of the p50s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="round trips on each side")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from _plain_worker import echo_beside_plain_celery

    from inferpool import Client, Settings

    with echo_beside_plain_celery("inferpool-rt-") as url, Client(settings=Settings(redis_url=url)) as client:
        from plain_celery_app import echo

        messages = [{"role": "user", "content": "ping"}]
        for _ in range(50):  # warm both paths (connections, imports, scripts)
            client.chat("echo", messages, timeout=30)
            echo.delay("ping").get(timeout=30)
        pool_s, plain_s = [], []
        for i in range(args.requests):
            started = time.perf_counter()
            client.chat("echo", [{"role": "user", "content": f"ping {i}"}], timeout=30)
            pool_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            echo.delay(f"ping {i}").get(timeout=30)
            plain_s.append(time.perf_counter() - started)

    rows = {}
    print(f"{'path':<34}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for name, values in (("plain Celery delay().get()", plain_s), ("inferpool client.chat", pool_s)):
        row = {q: percentile(values, p) * 1000 for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
        row["mean"] = statistics.fmean(values) * 1000
        rows[name] = row
        print(f"{name:<34}{row['p50']:>9.2f}{row['p90']:>9.2f}{row['p99']:>9.2f}{row['mean']:>9.2f}")
    ratio = rows["inferpool client.chat"]["p50"] / rows["plain Celery delay().get()"]["p50"]
    print(f"inferpool p50 / plain Celery p50 = {ratio:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"requests": args.requests, "rows": rows, "p50_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
