"""Batch jobs through the providers' own Batch APIs (OpenAI Batch, Anthropic Message Batches).

A private pool (Redis, scheduler, API workers) talks to the emulators' batch endpoints through the
official SDKs. Polling is fast (0.2 s) and a step left by a killed worker is taken up again within
seconds (step timeout 3 s, visibility timeout 4 s).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from inferpool import Client, JobStatus, RequestResult
from inferpool.cli import main
from inferpool.constants import UNAVAILABLE_CODE
from inferpool.emulators import EmulatorConfig, ProviderEmulator
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.local_pool import LocalPool, start_worker_process, stop_process
from inferpool.plumbing.settings import Settings as PoolSettings
from inferpool.provider_batch.openai_batch import result_line
from inferpool.provider_batch.store import ProviderBatchStore
from inferpool.provider_batch.via import choose_via
from inferpool.state.budgets import Budget, Budgets, to_nanos
from inferpool.wire import EmbeddingList
from inferpool.workers.echo import echo_vector
from tests.conftest import ANTHROPIC_TEST_KEY, OPENAI_TEST_KEY, wait_until

MODELS = ["emu-gpt-batch", "emu-claude-batch", "emu-gpt-batch-resend", "emu-gpt-batch-refused", "emu-embed-batch"]


@pytest.fixture(scope="module")
def batch_emulator() -> Iterator[ProviderEmulator]:
    server = ProviderEmulator(EmulatorConfig(api_keys=[OPENAI_TEST_KEY, ANTHROPIC_TEST_KEY], batch_delay_s=0.5))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pool_env(batch_emulator: ProviderEmulator) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": batch_emulator.openai_base_url, "ANTHROPIC_BASE_URL": batch_emulator.url,
        "OPENAI_API_KEY": OPENAI_TEST_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_TEST_KEY,
        "INFERPOOL_PROVIDER_BATCH_POLL_S": "0.2", "INFERPOOL_PROVIDER_BATCH_POLL_MAX_S": "0.5",
        "INFERPOOL_PROVIDER_BATCH_STEP_TIMEOUT_S": "3", "INFERPOOL_VISIBILITY_TIMEOUT_S": "4",
    }  # fmt: skip


@pytest.fixture(scope="module")
def pool(pool_env: dict[str, str]) -> Iterator[LocalPool]:
    with LocalPool(MODELS, env=pool_env) as local:
        yield local


@pytest.fixture
def pool_client(pool: LocalPool) -> Iterator[Client]:
    with Client(settings=PoolSettings(redis_url=pool.redis_url)) as client:
        yield client


def _lines(model: str, count: int, prefix: str, **body: Any) -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": f"question {prefix}{i}"}], **body}}
            for i in range(count)]  # fmt: skip


def _results(client: Client, job_id: str, timeout_s: float = 180) -> list[RequestResult]:
    job = client.batches.wait(job_id, timeout=timeout_s, poll_s=0.2)
    assert job.status.is_final
    results = list(client.batches.request_results(job_id))
    counts = Counter(r.custom_id for r in results)
    assert all(n == 1 for n in counts.values()), [c for c, n in counts.items() if n > 1]
    assert len(results) == job.request_counts.total
    return results


def _created(emulator: ProviderEmulator) -> tuple[int, int]:
    return emulator.counts["openai_batches_created"], emulator.counts["anthropic_batches_created"]


def test_mixed_job_goes_through_both_batch_apis_at_batch_price(
    pool_client: Client, batch_emulator: ProviderEmulator
) -> None:
    """1,000 OpenAI and 1,000 Anthropic lines: each answered once through its provider's Batch API (OpenAI's
    split at the model's 600-line limit), priced at the batch price; lines the provider failed and lines
    over the model's limits get their own errors."""
    batch_emulator.config.batch_failure_rate = 0.02
    try:
        before = _created(batch_emulator)
        lines = _lines("emu-gpt-batch", 998, "g") + _lines("emu-claude-batch", 999, "c")
        # The model's hooks run on the way to the provider: one line is redacted, one refused.
        lines += [_lines("emu-gpt-batch", 1, "hook-mail-")[0], _lines("emu-gpt-batch", 1, "hook-block-")[0]]
        lines[-2]["body"]["messages"][-1]["content"] = "question hook-mail-0 from ann@example.com"
        lines[-1]["body"]["messages"][-1]["content"] = "question hook-block-0: the launch code"
        lines.append(_lines("emu-claude-batch", 1, "too-long-", max_tokens=5000)[0])
        job = pool_client.batches.create(lines)
        assert job.via == "auto"
        results = _results(pool_client, job.id)
    finally:
        batch_emulator.config.batch_failure_rate = 0.0
    job = pool_client.batches.retrieve(job.id)
    assert job.status is JobStatus.COMPLETED
    assert len(results) == 2000
    assert {m: p.via for m, p in job.paths.items()} == {"emu-gpt-batch": "provider-batch",
                                                         "emu-claude-batch": "provider-batch"}  # fmt: skip
    assert "auto: 999 lines" in job.paths["emu-claude-batch"].reason
    # One provider batch per model and split: OpenAI's at the model's 600-line limit (600 + 400), Anthropic's at
    # its 64 KiB limit (999 lines: the one over max_tokens was refused at upload).
    after = _created(batch_emulator)
    gpt = sorted(b.count for b in job.provider_batches if b.model == "emu-gpt-batch")
    claude = [b for b in job.provider_batches if b.model == "emu-claude-batch"]
    assert gpt == [400, 600]
    assert len(claude) >= 3
    assert sum(b.count for b in claude) == 999
    assert (after[0] - before[0], after[1] - before[1]) == (2, len(claude))
    assert all(b.finished for b in job.provider_batches)
    for batch in claude:
        assert batch.batch_id is not None
        sent = batch_emulator.batch_endpoints.batches[batch.batch_id].lines
        assert sum(len(json.dumps(line, separators=(",", ":"))) + 1 for line in sent) <= 65536
    registry = Registry.from_settings(PoolSettings())
    failed = Counter[str]()
    for result in results:
        assert result.custom_id is not None
        if result.error is not None:
            failed[result.error.code] += 1
            continue
        assert result.stats is not None
        assert result.response is not None
        assert result.stats.via == "provider-batch"
        spec = registry.get(result.stats.model)
        usage = result.response.usage
        price = spec.batch_api.price(spec.pricing) if spec.batch_api else spec.pricing
        assert result.stats.cost_usd == pytest.approx(price.cost(usage.prompt_tokens, usage.completion_tokens))
        assert price.input_per_mtok < spec.pricing.input_per_mtok
        if not result.custom_id.startswith("hook-"):
            assert f"question {result.custom_id}" in result.response.text
    mail = next(r for r in results if r.custom_id == "hook-mail-0")
    assert mail.response is not None
    assert "[email]" in mail.response.text
    assert "ann@example.com" not in mail.response.text
    blocked = next(r for r in results if r.custom_id == "hook-block-0")
    assert blocked.error is not None
    assert blocked.error.code == "hook_error"
    too_long = next(r for r in results if r.custom_id == "too-long-0")
    assert too_long.error is not None
    assert "max_tokens" in too_long.error.message
    assert failed["provider_error"] > 0
    assert set(failed) <= {"provider_error", "hook_error", too_long.error.code}
    errors = [r.error.message for r in results if r.error and r.error.code == "provider_error"]
    assert all("emulated failure of line" in message for message in errors)
    # Output lines (OpenAI batch format) say the path too.
    output = {line.custom_id: line.via for line in pool_client.batches.results(job.id)}
    assert output["g1"] == "provider-batch"
    assert output["too-long-0"] is None  # refused at upload: no model served it
    # `batch status` says which path each model took, why, and where each provider batch stands.
    shown = CliRunner().invoke(main, ["batch", "status", job.id], env={"REDIS_URL": pool_client.settings.redis_url})
    assert shown.exit_code == 0, shown.output
    assert "emu-gpt-batch: provider-batch (auto: 1000 lines" in " ".join(shown.output.split())
    assert "provider batches of" in shown.output
    # Usage as for real-time lines: every line counted once, at the batch price.
    by_model = {row.model: row for row in job.usage}
    assert sum(row.requests for row in job.usage) == 2000
    expected_cost = sum(r.stats.cost_usd for r in results if r.stats and r.response)
    assert sum(row.cost_usd for row in by_model.values()) == pytest.approx(expected_cost)


def test_embeddings_lines_go_through_the_openai_batch_api(pool_client: Client, batch_emulator: ProviderEmulator
                                                           ) -> None:  # fmt: skip
    """/v1/embeddings lines through OpenAI's Batch API (its endpoint /v1/embeddings): vectors as the provider made
    them, at the batch price; chat lines of the same job keep to their own provider batch."""
    before = _created(batch_emulator)
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "emu-embed-batch", "input": [f"text {i}", "more"], "dimensions": 8}}
             for i in range(20)]  # fmt: skip
    lines += _lines("emu-gpt-batch-resend", 3, "g")
    job = pool_client.batches.create(lines, via="provider-batch")
    results = {r.custom_id: r for r in _results(pool_client, job.id)}
    assert _created(batch_emulator)[0] - before[0] == 2
    endpoints = {batch_emulator.batch_endpoints.batches[b.batch_id].endpoint for b in
                 pool_client.batches.retrieve(job.id).provider_batches if b.batch_id}  # fmt: skip
    assert endpoints == {"/v1/embeddings", "/v1/chat/completions"}
    for i in range(20):
        result = results[f"e{i}"]
        assert isinstance(result.response, EmbeddingList), result.error
        assert result.stats is not None
        assert result.stats.via == "provider-batch"
        assert result.response.vectors()[0] == pytest.approx(echo_vector(f"text {i}", 8), abs=1e-6)
        assert result.stats.cost_usd == pytest.approx(result.response.usage.prompt_tokens * 0.01 / 1e6)
    output = {line.custom_id: line for line in pool_client.batches.results(job.id)}
    body = output["e0"].response.body if output["e0"].response else None
    assert isinstance(body, EmbeddingList)
    assert isinstance(body.data[0].embedding, list)  # floats, as the line asked
    assert all(results[f"g{i}"].ok for i in range(3))


def test_auto_keeps_small_jobs_and_short_windows_real_time(pool_client: Client, batch_emulator: ProviderEmulator
                                                            ) -> None:  # fmt: skip
    before = _created(batch_emulator)
    small = pool_client.batches.create(_lines("emu-gpt-batch", 10, "s"))
    short = pool_client.batches.create(_lines("emu-claude-batch", 60, "w"), completion_window="1h")
    for job_id, reason in ((small.id, "10 lines, fewer than the model's batch_api.min_lines (50)"),
                           (short.id, "completion window (1 h) is shorter")):  # fmt: skip
        results = _results(pool_client, job_id)
        assert all(r.response is not None and r.stats and r.stats.via == "realtime" for r in results)
        [path] = pool_client.batches.retrieve(job_id).paths.values()
        assert path.via == "realtime"
        assert reason in path.reason
    assert _created(batch_emulator) == before


def test_provider_batch_asked_for_a_model_without_one_fails_its_lines(pool_client: Client) -> None:
    lines = _lines("emu-gpt-batch", 3, "ok") + _lines("echo", 2, "no")
    job = pool_client.batches.create(lines, via="provider-batch")
    results = _results(pool_client, job.id)
    refused = [r for r in results if r.custom_id and r.custom_id.startswith("no")]
    assert [r.error.code for r in refused if r.error] == [UNAVAILABLE_CODE] * 2
    assert all("--via auto or --via realtime" in r.error.message for r in refused if r.error)
    assert set(pool_client.batches.retrieve(job.id).paths) == {"emu-gpt-batch", "echo"}
    answered = [r for r in results if r.custom_id and r.custom_id.startswith("ok")]
    assert all(r.stats and r.stats.via == "provider-batch" for r in answered)
    assert len(answered) == 3


def test_cancel_cancels_the_provider_batches(pool_client: Client, batch_emulator: ProviderEmulator) -> None:
    batch_emulator.config.batch_delay_s = 20.0
    try:
        job = pool_client.batches.create(_lines("emu-claude-batch", 200, "x"))
        store = ProviderBatchStore(pool_client.redis, 3600)
        wait_until(lambda: any(b.batch_id for b in store.job_batches(job.id)), 60, "no provider batch was created")
        time.sleep(1.0)  # some lines get processed before the cancel
        pool_client.batches.cancel(job.id)
        results = _results(pool_client, job.id, timeout_s=60)
    finally:
        batch_emulator.config.batch_delay_s = 0.5
    done = pool_client.batches.retrieve(job.id)
    assert done.status is JobStatus.CANCELLED
    assert len(results) == 200
    codes = Counter(r.error.code if r.error else "answered" for r in results)
    assert set(codes) <= {"answered", "batch_cancelled"}
    assert codes["batch_cancelled"] > 0
    [batch] = done.provider_batches
    assert batch.batch_id is not None
    assert batch_emulator.batch_endpoints.batches[batch.batch_id].cancelled_at is not None


def test_expired_lines_are_resent_real_time_where_the_model_says_so(
    pool_client: Client, batch_emulator: ProviderEmulator
) -> None:
    """The provider batches expire with a third of their lines run: emu-gpt-batch-resend sends the rest
    through the real-time API; emu-claude-batch (the default) ends them as batch_expired."""
    batch_emulator.config.batch_delay_s, batch_emulator.config.batch_expire_s = 1.5, 0.5
    realtime_before = batch_emulator.counts["answered"]
    try:
        job = pool_client.batches.create(_lines("emu-gpt-batch-resend", 90, "r") + _lines("emu-claude-batch", 60, "e"))
        results = _results(pool_client, job.id)
    finally:
        batch_emulator.config.batch_delay_s, batch_emulator.config.batch_expire_s = 0.5, None
    resend = [r for r in results if r.custom_id and r.custom_id.startswith("r")]
    assert all(r.response is not None for r in resend)
    assert len(resend) == 90
    via = Counter(r.stats.via for r in resend if r.stats)
    assert via["provider-batch"] > 0
    assert via["realtime"] > 0
    assert batch_emulator.counts["answered"] - realtime_before == via["realtime"]
    expired = [r for r in results if r.custom_id and r.custom_id.startswith("e")]
    codes = Counter(r.error.code if r.error else "answered" for r in expired)
    assert set(codes) == {"answered", "batch_expired"}
    path = pool_client.batches.retrieve(job.id).paths["emu-gpt-batch-resend"]
    assert path.via == "realtime"
    assert "expired" in path.reason


def test_the_jobs_window_end_collects_what_the_provider_finished(
    pool_client: Client, batch_emulator: ProviderEmulator
) -> None:
    """Issue 25.5: answers the provider finished before the job's window ended are paid for and kept; only the
    lines it never ran expire."""
    batch_emulator.config.batch_delay_s = 6.0  # the lines finish over 6 s; the job's window is 3 s
    try:
        job = pool_client.batches.create(_lines("emu-gpt-batch", 60, "w"), via="provider-batch",
                                         completion_window="3s")  # fmt: skip
        results = _results(pool_client, job.id)
    finally:
        batch_emulator.config.batch_delay_s = 0.5
    codes = Counter(r.error.code if r.error else "answered" for r in results)
    assert set(codes) == {"answered", "batch_expired"}, codes
    assert all(r.stats is not None and r.stats.via == "provider-batch" for r in results if r.response is not None)
    assert pool_client.batches.retrieve(job.id).status == JobStatus.EXPIRED


def test_a_batch_the_provider_refuses_fails_only_its_lines(pool_client: Client) -> None:
    """OpenAI fails a batch whose input it does not accept (here: a model it has no Batch API for); its
    lines end with the provider's message, the job's other lines are answered."""
    job = pool_client.batches.create(_lines("emu-gpt-batch-refused", 5, "f") + _lines("emu-gpt-batch", 50, "p"))
    results = _results(pool_client, job.id)
    refused = [r for r in results if r.custom_id and r.custom_id.startswith("f")]
    assert len(refused) == 5
    for result in refused:
        assert result.error is not None
        assert result.error.code == "provider_error"
        assert "openai failed the batch: the model 'no-batch-gpt' is not available" in result.error.message
    assert all(r.response is not None for r in results if r.custom_id and r.custom_id.startswith("p"))
    outcomes = {b.model: b.outcome or "" for b in pool_client.batches.retrieve(job.id).provider_batches}
    assert outcomes["emu-gpt-batch-refused"].startswith("failed:")


@given(st.binary(max_size=300) | st.builds(lambda v: json.dumps(v).encode(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["custom_id", "response", "error", "status_code", "body", "code", "message", "choices"]), inner, max_size=4),
    max_leaves=12)))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_any_output_file_line_is_a_result_or_skipped(raw: bytes) -> None:
    """A provider's output or error file line, whatever its bytes, is a line's outcome or skipped: never an
    exception that would stop the collection of the rest."""
    parsed = result_line(raw)
    assert parsed is None or isinstance(parsed[0], str)


@pytest.mark.parametrize(
    ("model", "fault", "provider"),
    [
        ("emu-gpt-batch-crash", "after-upload", "openai"),
        ("emu-gpt-batch-crash", "after-create", "openai"),
        ("emu-claude-batch-crash", "after-create", "anthropic"),
    ],
)
def test_a_worker_killed_mid_step_neither_loses_nor_doubles_the_provider_batch(
    pool: LocalPool, pool_client: Client, pool_env: dict[str, str], batch_emulator: ProviderEmulator,
    model: str, fault: str, provider: str,
) -> None:  # fmt: skip
    """Killed between the upload and the create (OpenAI: the file is found again by its name), or between the
    create and recording its id (OpenAI: the batch is found by its metadata; Anthropic: by its creation slot
    and size). Either way the emulator is asked to create exactly one batch, and every line is answered
    once."""
    log_dir = pool.workdir
    crashing = start_worker_process(model, pool.redis_url, log_dir / f"{model}-crash.log",
                                    env={**pool_env, "INFERPOOL_FAULT_PROVIDER_BATCH": fault})  # fmt: skip
    created_before = batch_emulator.counts[f"{provider}_batches_created"]
    files_before = len(batch_emulator.batch_endpoints.files)
    job = pool_client.batches.create(_lines(model, 120, "k"))
    try:
        wait_until(lambda: crashing.proc.poll() is not None, 120, f"the worker never reached {fault}")
        assert crashing.proc.returncode == 70, (log_dir / f"{model}-crash.log").read_text()[-2000:]
        replacement = start_worker_process(model, pool.redis_url, log_dir / f"{model}-ok.log", env=pool_env)
        try:
            results = _results(pool_client, job.id)
        finally:
            stop_process(replacement.proc, grace_s=30)
    finally:
        stop_process(crashing.proc, grace_s=5)
    assert all(r.response is not None and r.stats and r.stats.via == "provider-batch" for r in results)
    assert len(results) == 120
    assert batch_emulator.counts[f"{provider}_batches_created"] - created_before == 1
    if provider == "openai":  # one input file uploaded (the output file is the emulator's own)
        uploads = [f for f in list(batch_emulator.batch_endpoints.files.values())[files_before:]
                   if f["purpose"] == "batch"]  # fmt: skip
        assert len(uploads) == 1
    [batch] = pool_client.batches.retrieve(job.id).provider_batches
    assert batch.finished


def test_path_choice_reasons() -> None:
    registry = Registry.from_settings(PoolSettings())
    gpt, echo = registry.get("emu-gpt-batch"), registry.get("echo")
    assert choose_via(gpt, "auto", 86400, 50).via == "provider-batch"
    assert choose_via(gpt, "auto", 86400, 49).via == "realtime"
    assert choose_via(gpt, "realtime", 86400, 10_000).reason == "asked for (--via realtime)"
    assert choose_via(echo, "auto", 86400, 10_000).via == "realtime"
    refused = choose_via(echo, "provider-batch", 86400, 10)
    assert refused.via == "unavailable"
    assert "no provider Batch API" in refused.reason
    assert json.loads(refused.model_dump_json())["via"] == "unavailable"


def test_a_budgeted_tenants_lines_reserve_at_the_batch_price(pool: LocalPool) -> None:
    """Lines going to a provider's Batch API reserve the most they can cost at the batch price before they are
    sent; those that do not fit end as budget_exceeded; spend is settled to the batch price, exactly."""
    with Client(settings=PoolSettings(redis_url=pool.redis_url, tenant="pb-team")) as client:
        budgets, budget = Budgets(client.redis), Budget(usd=0.001, window="day")
        budgets.set("tenant:pb-team", budget)
        try:
            job = client.batches.create(_lines("emu-gpt-batch", 200, "b", max_tokens=16), via="provider-batch")
            results = _results(client, job.id)
            spent, held = budgets.spend("tenant:pb-team", budget)
        finally:
            budgets.set("tenant:pb-team", None)
    answered = [r for r in results if r.error is None]
    refused = [r for r in results if r.error is not None]
    assert answered
    assert refused
    assert {r.error.code for r in refused if r.error} == {"budget_exceeded"}
    assert all(r.stats is not None and r.stats.via == "provider-batch" for r in answered)
    assert spent == sum(to_nanos(r.stats.cost_usd) for r in answered if r.stats is not None)
    assert spent <= budget.nanos
    assert held == 0


def test_a_pipeline_step_through_a_batch_api_and_the_next_in_real_time(
    pool_client: Client, batch_emulator: ProviderEmulator
) -> None:
    """A step with ``via: provider-batch`` goes to the provider's Batch API at its price (once every row reached
    it: batches are formed whole); the step after it runs in real time as the answers come back."""
    before = _created(batch_emulator)
    steps = [
        {"name": "draft", "model": "emu-gpt-batch", "via": "provider-batch",
         "messages": [{"role": "user", "content": "question {{ text }}"}]},
        {"name": "check", "model": "emu-claude-batch",
         "messages": [{"role": "user", "content": "check {{ steps.draft.answer }}"}]},
    ]  # fmt: skip
    run = pool_client.pipelines.create({"steps": steps}, [{"text": f"p{i}"} for i in range(30)])
    final = pool_client.pipelines.wait(run.id, timeout=180, poll_s=0.2)
    assert final.status.value == "completed"
    assert [(s.completed, s.failed) for s in final.steps] == [(30, 0), (30, 0)]
    after = _created(batch_emulator)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)  # the check step never went to a batch
    jobs = pool_client.pipelines.jobs(run.id)
    assert jobs["draft"].paths["emu-gpt-batch"].via == "provider-batch"
    assert jobs["check"].via == "realtime"
    registry = Registry.from_settings(PoolSettings())
    spec = registry.get("emu-gpt-batch")
    assert spec.batch_api is not None
    for row in pool_client.pipelines.results(run.id):
        draft, check = row.steps["draft"], row.steps["check"]
        assert draft is not None
        assert check is not None
        assert draft.answer is not None
        assert f"question {row.row['text']}" in draft.answer
        assert draft.usage is not None
        batch_price = spec.batch_api.price(spec.pricing)
        assert draft.cost_usd == pytest.approx(batch_price.cost(draft.usage.prompt_tokens,
                                                                draft.usage.completion_tokens))  # fmt: skip
        assert check.answer is not None
        assert draft.answer in check.answer
