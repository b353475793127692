"""Tenants under load: spend budgets against 1,000 concurrent requests and a batch job with a worker killed, and
fair share between a tenant with many jobs and a tenant with one.

    python bench/tenants.py --clients 1000 --lines 2000 --json bench/results/tenants.json

Budgets: one tenant with a budget sends ``--clients`` concurrent single requests (coroutines of one
``AsyncClient``) while its ``--lines``-line batch job runs on two ``echo-priced-bench`` workers, one of them
SIGKILLed mid-way (its chunks are redelivered). Printed: the budget, what was spent, the over-spend (spent
past the budget: the aim is 0), the difference between spend and the sum of the results' costs (0: exact),
what is still held at the end (0: every reservation settled), and how many requests were admitted and refused.

Fair share: tenant A submits 4 jobs of ``--a-lines`` lines to two ``echo-fair-bench`` workers; a second later
B submits one job of 200. B's completion time and its share of the answers while both had work, with B as a
tenant of its own (fair share between tenants) and with B's job under tenant A (sharing by job only, as before).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def _lines(tag: str, model: str, count: int, max_tokens: int | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"model": model}
    if max_tokens:
        body["max_tokens"] = max_tokens
    return [{"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {**body, "messages": [{"role": "user", "content": f"{tag} question {i}"}]}}
            for i in range(count)]  # fmt: skip


def budgets(clients: int, lines: int, budget_usd: float) -> dict[str, Any]:
    from inferpool import AsyncClient, BudgetExceeded, Client, Settings
    from inferpool.plumbing.local_pool import LocalPool
    from inferpool.state.budgets import NANOS, Budget, Budgets, to_nanos

    env = {"INFERPOOL_VISIBILITY_TIMEOUT_S": "4", "INFERPOOL_LOG_LEVEL": "WARNING"}
    with LocalPool(["echo-priced-bench"], env=env, workers_per_model=2) as pool:
        settings = Settings(redis_url=pool.redis_url, tenant="bench-team")
        with Client(settings=settings) as client:
            store, budget = Budgets(client.redis), Budget(usd=budget_usd, window="day")
            store.set("tenant:bench-team", budget)
            job = client.batches.create(_lines("l", "echo-priced-bench", lines, 8))

            async def singles() -> list[str | BudgetExceeded]:
                async with AsyncClient(settings=settings) as aclient:

                    async def one(i: int) -> str | BudgetExceeded:
                        request = {"model": "echo-priced-bench", "max_tokens": 8,
                                   "messages": [{"role": "user", "content": f"q {i}"}]}  # fmt: skip
                        try:
                            handle = await aclient.submit(request)
                        except BudgetExceeded as exc:
                            return exc
                        return handle.request_id

                    return list(await asyncio.gather(*(one(i) for i in range(clients))))

            started = time.perf_counter()
            peak = [0, 0]  # the most held, and the most spent + held, seen while it ran
            done = threading.Event()

            def sample() -> None:
                with Client(settings=settings) as watcher:
                    watch = Budgets(watcher.redis)
                    while not done.wait(0.01):
                        spent_now, held_now = watch.spend("tenant:bench-team", budget)
                        peak[0], peak[1] = max(peak[0], held_now), max(peak[1], spent_now + held_now)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            while client.batches.retrieve(job.id).request_counts.completed < 50:
                time.sleep(0.01)
            os.killpg(pool.workers[0].proc.pid, signal.SIGKILL)
            submitted = asyncio.run(singles())
            client.batches.wait(job.id, timeout=600)
            single_ids = [rid for rid in submitted if isinstance(rid, str)]
            costs = [client.handle(rid).result(timeout=600).stats.cost_usd for rid in single_ids]  # type: ignore[union-attr]
            results = list(client.batches.request_results(job.id))
            costs += [r.stats.cost_usd for r in results if r.stats is not None and r.error is None]
            elapsed = time.perf_counter() - started
            done.set()
            sampler.join()
            spent, held = store.spend("tenant:bench-team", budget)
            return {"clients": clients, "lines": lines, "budget_usd": budget_usd, "spent_usd": spent / NANOS,
                    "over_spend_usd": max(0, spent - budget.nanos) / NANOS,
                    "spend_minus_sum_of_costs_nanousd": spent - sum(to_nanos(c) for c in costs),
                    "held_at_end_usd": held / NANOS, "peak_held_usd": peak[0] / NANOS,
                    "peak_spent_plus_held_usd": peak[1] / NANOS,
                    "singles_admitted": len(single_ids), "singles_refused": clients - len(single_ids),
                    "lines_answered": sum(r.error is None for r in results),
                    "lines_refused": sum(r.error is not None and r.error.code == "budget_exceeded" for r in results),
                    "seconds": round(elapsed, 2)}  # fmt: skip


def fair_share(a_lines: int) -> dict[str, Any]:
    from inferpool import Client, Settings
    from inferpool.constants import job_completed_stream_key
    from inferpool.plumbing.local_pool import LocalPool
    from inferpool.state.results import stored_results

    def answered_at(client: Client, job_id: str) -> list[int]:
        times: list[int] = []
        for entry_id, fields in client.redis.xrange(job_completed_stream_key(job_id)):
            times += [int(entry_id.split(b"-")[0])] * len(stored_results(fields))
        return times

    figures: dict[str, Any] = {}
    env = {"INFERPOOL_LOG_LEVEL": "WARNING"}
    with LocalPool(["echo-fair-bench"], env=env, workers_per_model=2) as pool:
        for label, b_tenant in (("fair_share", "bench-b"), ("job_only", "bench-a")):
            with Client(settings=Settings(redis_url=pool.redis_url, tenant="bench-a")) as a, \
                    Client(settings=Settings(redis_url=pool.redis_url, tenant=b_tenant)) as b:  # fmt: skip
                a_jobs = [a.batches.create(_lines(f"a{j}-", "echo-fair-bench", a_lines)).id for j in range(4)]
                time.sleep(1.0)
                started = time.perf_counter()
                b_job = b.batches.create(_lines("b", "echo-fair-bench", 200)).id
                b.batches.wait(b_job, timeout=600)
                b_seconds = time.perf_counter() - started
                for job_id in a_jobs:
                    a.batches.cancel(job_id)
                    a.batches.wait(job_id, timeout=600)
                b_times = answered_at(b, b_job)
                a_during = sum(min(b_times) <= t <= max(b_times) for job in a_jobs for t in answered_at(a, job))
                share = len(b_times) / (len(b_times) + a_during)
                figures[label] = {"b_seconds": round(b_seconds, 2), "b_share": round(share, 3)}
    ratio = figures["job_only"]["b_seconds"] / figures["fair_share"]["b_seconds"]
    figures["b_time_job_only_over_fair"] = round(ratio, 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000, help="concurrent single requests against the budget")
    parser.add_argument("--lines", type=int, default=2000, help="lines of the batch job against the same budget")
    parser.add_argument("--budget", type=float, default=20.0, help="the tenant's budget (USD)")
    parser.add_argument("--a-lines", type=int, default=1500, help="lines of each of tenant A's 4 jobs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    os.environ["INFERPOOL_REGISTRY"] = str(BENCH / "registry.yaml")
    figures = {"budgets": budgets(args.clients, args.lines, args.budget), "fair_share": fair_share(args.a_lines)}
    json.dump(figures, sys.stdout, indent=2)
    print()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
