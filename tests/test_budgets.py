"""Spend budgets (issue 30): reserved at admission, settled in the result's own exactly-once write. Many
clients through the gateway and the client library, and a batch job, spend against one tenant's budget while a
worker is SIGKILLed: spend never passes the budget, equals the sum of the results' costs to the nano-dollar,
nothing stays held, and every refusal is the right error."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from inferpool import AsyncClient, BudgetExceeded, Client, ConfigurationError, JobStatus, Settings
from inferpool.model_registry.costs import max_cost_nanos
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.local_pool import LocalPool, start_worker_process, stop_process, wait_for_workers
from inferpool.state.api_keys import ApiKeys
from inferpool.state.budgets import NANOS, Budget, Budgets, to_nanos
from inferpool.wire import ChatRequest

from .conftest import start_gateway, stop_gateway

FAST_REDELIVERY = {"INFERPOOL_VISIBILITY_TIMEOUT_S": "4"}


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_budgets_parse_and_the_reservation_bounds_the_cost() -> None:
    assert Budget.parse("50/day") == Budget(usd=50, window="day")
    assert Budget.parse("$2000") == Budget(usd=2000, window="month")
    assert Budget.parse("100 / none").window == "none"
    for text in ("fifty", "50/week", "-5/day", ""):
        with pytest.raises(ConfigurationError, match="USD per window"):
            Budget.parse(text)
    with pytest.raises(ConfigurationError, match=r"at most \$1,000,000,000 per window"):
        Budget.parse("99999999999/day")
    spec = Registry.load([Path(__file__).parent / "registry.yaml"]).get("echo-priced")
    request = ChatRequest.model_validate(
        {"model": "echo-priced", "messages": ask("héllo wörld " * 50), "max_tokens": 8}
    )
    # The echo counts a word a token; the reservation counts a byte a token, plus the whole max_tokens.
    assert max_cost_nanos(spec, request) >= to_nanos(spec.pricing.cost(100, 8))


def test_spend_never_passes_the_budget_under_concurrency_and_a_killed_worker(
    redis_url: str, session_dir: Path, scheduler: object, redis_client: redis.Redis, settings: Settings
) -> None:
    tenant, budget_usd = "budget-team", 4.0
    budgets = Budgets(redis_client)
    budgets.set(f"tenant:{tenant}", Budget(usd=budget_usd, window="day"))
    key = ApiKeys(redis_client).create(tenant)[0]
    workers = [start_worker_process("echo-priced", redis_url, session_dir / f"worker-priced-{i}.log",
                                    env=FAST_REDELIVERY) for i in range(2)]  # fmt: skip
    log_path = session_dir / "gateway-budgets.log"
    gateway, url = start_gateway(redis_url, log_path, {})
    try:
        wait_for_workers(redis_client, workers, 120)
        tenant_settings = settings.model_copy(update={"tenant": tenant})
        lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "echo-priced", "messages": ask(f"line {i}"), "max_tokens": 8}}
                 for i in range(200)]  # fmt: skip
        with Client(settings=tenant_settings) as client:
            job = client.batches.create(lines)

            def through_gateway(i: int) -> httpx.Response:
                return httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                  json={"model": "echo-priced", "messages": ask(f"gateway question {i}"),
                                        "max_tokens": 8}, timeout=120)  # fmt: skip

            async def through_client(n: int) -> list[str | BudgetExceeded]:
                async with AsyncClient(settings=tenant_settings) as aclient:

                    async def one(i: int) -> str | BudgetExceeded:
                        try:
                            handle = await aclient.submit({"model": "echo-priced", "max_tokens": 8,
                                                           "messages": ask(f"client question {i}")})  # fmt: skip
                        except BudgetExceeded as exc:
                            return exc
                        return handle.request_id

                    return list(await asyncio.gather(*(one(i) for i in range(n))))

            with concurrent.futures.ThreadPoolExecutor(max_workers=33) as pool:
                from_client = pool.submit(asyncio.run, through_client(32))
                answers_future = [pool.submit(through_gateway, i) for i in range(32)]
                deadline = time.monotonic() + 60
                while client.batches.retrieve(job.id).request_counts.completed < 8:
                    assert time.monotonic() < deadline, "the job did not start"
                    time.sleep(0.02)
                os.killpg(workers[0].proc.pid, signal.SIGKILL)  # mid-way: its chunks are redelivered
                answers = [future.result() for future in answers_future]
                submitted = from_client.result()
            final = client.batches.wait(job.id, timeout=180)
            assert final.status is JobStatus.COMPLETED

            # Every request ended once: answered, or refused with the right error.
            statuses = [answer.status_code for answer in answers]
            assert set(statuses) <= {200, 429}, [a.text for a in answers if a.status_code not in (200, 429)]
            for refused in (a for a in answers if a.status_code == 429):
                assert refused.json()["error"]["code"] == "insufficient_quota"
                assert "budget of $4" in refused.json()["error"]["message"]
            single_ids = [a.headers["x-request-id"] for a in answers if a.status_code == 200]
            single_ids += [rid for rid in submitted if isinstance(rid, str)]
            costs = [client.handle(rid).result(timeout=120).stats.cost_usd for rid in single_ids]  # type: ignore[union-attr]
            results = list(client.batches.request_results(job.id))
            assert len(results) == 200
            refused_lines = [r for r in results if r.error is not None]
            assert {r.error.code for r in refused_lines if r.error} <= {"budget_exceeded"}
            costs += [r.stats.cost_usd for r in results if r.stats is not None and r.error is None]

            spent, held = budgets.spend(f"tenant:{tenant}", Budget(usd=budget_usd, window="day"))
            assert spent <= budget_usd * NANOS  # never past the budget
            assert spent == sum(to_nanos(cost) for cost in costs)  # exactly what the results cost
            assert held == 0  # every reservation settled
            # The budget did bite, on both paths (otherwise this test proves nothing).
            assert refused_lines or 429 in statuses or any(isinstance(r, BudgetExceeded) for r in submitted)
            assert len(costs) > 10
            shown = json.loads(os.popen(f"REDIS_URL={redis_url} inferpool tenants --json").read())
            row = next(row for row in shown if row["scope"] == f"tenant:{tenant}")
            assert row["spent_usd"] == pytest.approx(spent / NANOS)
    finally:
        stop_gateway(gateway, log_path)
        for worker in workers:
            stop_process(worker.proc, grace_s=30)
        budgets.set(f"tenant:{tenant}", None)


def test_a_redis_restart_mid_window_loses_no_spend() -> None:
    """Redis (with AOF, as deployed) stops and comes back mid-job: spend and holds come back with it, and the
    job's lines settle exactly once against the budget."""
    env = {**FAST_REDELIVERY, "INFERPOOL_SCHEDULER_LEASE_S": "1", "INFERPOOL_RESEND_STALE_AFTER_S": "10"}
    with LocalPool(["echo-priced"], env=env, redis_appendonly=True) as pool, \
            Client(pool.redis_url, tenant="aof-team") as client:  # fmt: skip
        budgets, budget = Budgets(client.redis), Budget(usd=2.0, window="month")
        budgets.set("tenant:aof-team", budget)
        job = client.batches.create([{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                                      "body": {"model": "echo-priced", "messages": ask(f"line {i}"), "max_tokens": 8}}
                                     for i in range(120)])  # fmt: skip
        deadline = time.monotonic() + 120
        while client.batches.retrieve(job.id).request_counts.completed < 20:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.05)
        before, _ = budgets.spend("tenant:aof-team", budget)
        pool.redis.restart()
        after_restart, _ = budgets.spend("tenant:aof-team", budget)
        assert after_restart >= before > 0  # nothing settled before the restart was lost
        assert client.batches.wait(job.id, timeout=300).status is JobStatus.COMPLETED
        results = list(client.batches.request_results(job.id))
        assert len(results) == 120
        spent, held = budgets.spend("tenant:aof-team", budget)
        assert spent == sum(to_nanos(r.stats.cost_usd) for r in results if r.stats is not None and r.error is None)
        assert held == 0
        assert spent <= budget.nanos
        assert {r.error.code for r in results if r.error} <= {"budget_exceeded"}


def test_a_pipeline_spends_within_its_tenants_budget(
    redis_url: str, session_dir: Path, scheduler: object, redis_client: redis.Redis, settings: Settings
) -> None:
    """Each (row, step) line reserves against the tenant's budget when dispatched, as any batch line: spend stays
    within it and equals the outcomes' costs; a row refused at its first step does not run its second."""
    tenant, budget = "pipeline-team", Budget(usd=0.6, window="day")
    budgets = Budgets(redis_client)
    budgets.set(f"tenant:{tenant}", budget)
    worker = start_worker_process("echo-priced", redis_url, session_dir / "worker-priced-pipeline.log")
    try:
        wait_for_workers(redis_client, [worker], 120)
        steps = [{"name": "first", "model": "echo-priced", "max_tokens": 8, "messages": ask("first {{ text }}")},
                 {"name": "second", "model": "echo-priced", "max_tokens": 8,
                  "messages": ask("second {{ steps.first.answer }}")}]  # fmt: skip
        with Client(settings=settings.model_copy(update={"tenant": tenant})) as client:
            run = client.pipelines.create({"steps": steps}, [{"text": f"r{i}"} for i in range(40)])
            final = client.pipelines.wait(run.id, timeout=180)
            assert final.status.value == "completed"
            rows = list(client.pipelines.results(run.id))
        outcomes = [o for row in rows for o in row.steps.values() if o is not None]
        spent, held = budgets.spend(f"tenant:{tenant}", budget)
        assert spent <= to_nanos(0.6)
        assert held == 0
        assert spent == sum(to_nanos(o.cost_usd) for o in outcomes if o.error is None)
        refused_first = [row for row in rows if row.steps["first"] and row.steps["first"].error]
        assert refused_first, "the budget should bite"
        for row in refused_first:
            first, second = row.steps["first"], row.steps["second"]
            assert first is not None
            assert first.error is not None
            assert first.error.code == "budget_exceeded"
            assert second is not None
            assert second.error is not None
            assert second.error.code == "upstream_failed"
    finally:
        stop_process(worker.proc, grace_s=30)
        budgets.set(f"tenant:{tenant}", None)
