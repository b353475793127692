"""Pipelines running through the real pool: rows flow through steps with no stage barrier, each (row, step)
answered exactly once, failed and skipped steps stop what depends on them, resume and cancel, the commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from inferpool import AsyncClient, Client, Settings
from inferpool._exceptions import BatchRefused, RequestError, TemplateError
from inferpool.cli import main
from inferpool.client.chains import ChainResult
from inferpool.plumbing.local_pool import WorkerProcess
from inferpool.wire import PipelineStatus, StepOutcome
from tests.conftest import _start_workers, _stop_workers, wait_until

pytestmark = pytest.mark.usefixtures("scheduler", "echo_worker", "echo_slow_worker")


@pytest.fixture(scope="module")
def doomed_worker(redis_url: str, session_dir: Path) -> Iterator[list[WorkerProcess]]:
    """echo-doomed fails every prompt that contains FAIL: a step that fails for some rows."""
    workers = _start_workers(redis_url, session_dir, "echo-doomed")
    yield workers
    _stop_workers(workers)


TIMEOUT_S = 120.0


def _three_steps(first_model: str = "echo") -> dict[str, Any]:
    return {"steps": [
        {"name": "translate", "model": first_model, "params": {"max_tokens": 64},
         "messages": [{"role": "user", "content": "Translate: {{ text }}"}]},
        {"name": "extract", "model": "echo", "response_format": {"type": "json_object"},
         "when": "'skip' not in text",
         "messages": [{"role": "user", "content": "Extract: {{ steps.translate.answer }}"}]},
        {"name": "judge", "model": "echo-slow",
         "messages": [{"role": "user", "content": "Judge {{ steps.extract.json.echo }} against {{ text }} "
                                                  "({{ steps.translate.usage.completion_tokens }} tokens)"}]},
    ]}  # fmt: skip


def test_each_row_flows_through_its_steps_once(client: Client) -> None:
    rows = [{"text": f"row {i}" + (" skip" if i % 10 == 3 else "")} for i in range(40)]
    run = client.pipelines.create(_three_steps(), rows)
    run = client.pipelines.wait(run.id, timeout=TIMEOUT_S)
    assert run.status is PipelineStatus.COMPLETED
    assert run.rows == 40
    by_name = {step.name: step for step in run.steps}
    assert by_name["translate"].completed == 40
    assert by_name["extract"].skipped == 4
    assert by_name["extract"].completed == 36
    assert by_name["judge"].skipped == 4
    assert by_name["judge"].completed == 36
    for step in run.steps:
        job = client.batches.retrieve(step.job_id)
        # each step's job holds one line per row it ran for, each answered once
        assert job.request_counts.total == step.queued == job.request_counts.completed
        assert sum(row.requests for row in job.usage) == step.queued
    results = list(client.pipelines.results(run.id))
    assert [r.row_number for r in results] == list(range(1, 41))
    for result in results:
        text = result.row["text"]
        translate = result.steps["translate"]
        assert translate is not None
        assert translate.answer == f"echo: Translate: {text}"
        if "skip" in text:
            assert result.steps["extract"] == StepOutcome(skipped=True) == result.steps["judge"]
            continue
        extract = result.steps["extract"]
        assert extract is not None
        assert extract.json_value == {"echo": f"Extract: echo: Translate: {text}"}
        judge = result.steps["judge"]
        assert judge is not None
        assert judge.finish_reason == "stop"
        tokens = len(f"echo: Translate: {text}".split())
        assert judge.answer == f"echo: Judge Extract: echo: Translate: {text} against {text} ({tokens} tokens)"


@pytest.mark.usefixtures("doomed_worker")
def test_a_failed_step_stops_what_depends_on_it_and_the_other_rows_go_on(client: Client) -> None:
    pipeline = {"steps": [
        {"name": "draft", "model": "echo-doomed", "messages": [{"role": "user", "content": "{{ text }}"}]},
        {"name": "polish", "model": "echo", "messages": [{"role": "user", "content": "{{ steps.draft.answer }}"}]},
        {"name": "bad", "model": "{{ model }}", "messages": [{"role": "user", "content": "{{ text }}"}]},
    ]}  # fmt: skip
    rows = [{"text": "fine", "model": "echo"}, {"text": "FAIL here", "model": "echo"},
            {"text": "fine too", "model": "no-such-model"}]  # fmt: skip
    run = client.pipelines.wait(client.pipelines.create(pipeline, rows).id, timeout=TIMEOUT_S)
    assert run.status is PipelineStatus.COMPLETED
    results = {r.row_number: r.steps for r in client.pipelines.results(run.id)}
    assert results[1]["polish"] is not None
    assert results[1]["polish"].answer == "echo: echo: fine"
    failed = results[2]["draft"]
    assert failed is not None
    assert failed.error is not None
    assert failed.error.code == "provider_error"
    blocked = results[2]["polish"]
    assert blocked is not None
    assert blocked.error is not None
    assert blocked.error.code == "upstream_failed"
    assert "step 'draft' failed" in blocked.error.message
    unknown = results[3]["bad"]
    assert unknown is not None
    assert unknown.error is not None
    assert unknown.error.code == "model_not_found"
    assert unknown.error.message.startswith("row 3, step 'bad': ")
    assert {s.name: s.not_run for s in run.steps} == {"draft": 0, "polish": 1, "bad": 1}


def test_rows_do_not_wait_for_the_whole_first_step(client: Client) -> None:
    """Some rows finish their last step while others have not finished their first (no stage barrier)."""
    pipeline = {"steps": [
        {"name": "first", "model": "echo-slow", "messages": [{"role": "user", "content": "{{ text }}"}]},
        {"name": "second", "model": "echo", "messages": [{"role": "user", "content": "{{ steps.first.answer }}"}]},
    ]}  # fmt: skip
    run = client.pipelines.create(pipeline, [{"text": f"r{i}"} for i in range(300)])
    seen: list[tuple[int, int]] = []

    def overlapped() -> bool:
        steps = client.pipelines.retrieve(run.id).steps
        seen.append((steps[0].settled, steps[1].settled))
        return steps[1].settled > 0 and steps[0].settled < 300

    wait_until(overlapped, TIMEOUT_S, f"the second step never ran while the first was unfinished: {seen[-5:]}")
    assert client.pipelines.wait(run.id, timeout=TIMEOUT_S).status is PipelineStatus.COMPLETED


@pytest.mark.usefixtures("echo_trickle_worker")
def test_resuming_a_load_queues_nothing_twice_and_cancel_ends_it(client: Client) -> None:
    pipeline = {"steps": [
        {"name": "slow", "model": "echo-trickle", "messages": [{"role": "user", "content": "{{ text }}"}]},
        {"name": "then", "model": "echo", "messages": [{"role": "user", "content": "{{ steps.slow.answer }}"}]},
    ]}  # fmt: skip
    rows = [{"text": f"r{i}"} for i in range(60)]  # 3 s each, 8 at a time: the cancel comes long before the end
    run = client.pipelines.create(pipeline, rows)
    again = client.pipelines.create(pipeline, rows, resume=run.id)
    assert again.id == run.id
    assert again.steps[0].queued == 60
    cancelled = client.pipelines.cancel(run.id)
    assert cancelled.status is PipelineStatus.CANCELLING
    final = client.pipelines.wait(run.id, timeout=TIMEOUT_S)
    assert final.status is PipelineStatus.CANCELLED
    jobs = client.pipelines.jobs(run.id)
    assert jobs["slow"].request_counts.total == 60  # one line per row, however often the rows were loaded
    assert jobs["slow"].finished == 60
    assert jobs["slow"].status.value == "cancelled"
    assert jobs["then"].request_counts.total == final.steps[1].queued
    results = list(client.pipelines.results(run.id))
    assert len(results) == 60
    cancelled_rows = [r for r in results if r.steps["slow"] and r.steps["slow"].error]
    assert cancelled_rows, "cancelling at once should leave rows whose first step never ran"
    assert all(r.steps["then"] is None for r in cancelled_rows)
    with pytest.raises(BatchRefused, match="another pipeline file"):
        client.pipelines.create({"steps": pipeline["steps"][:1]}, rows, resume=run.id)


def test_the_pipeline_commands(settings: Settings, tmp_path: Path) -> None:
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(json.dumps(_three_steps()))
    rows = tmp_path / "rows.csv"
    rows.write_text("text\nhello\nsay skip\nworld\n")
    out = tmp_path / "out.csv"
    env = {"REDIS_URL": settings.redis_url}
    result = CliRunner().invoke(main, ["pipeline", "run", str(spec), "--rows", str(rows), "-o", str(out)], env=env)
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "row_number,text,translate,translate_error,extract,extract_error,judge,judge_error"
    assert lines[1].startswith("1,hello,echo: Translate: hello,,")
    assert lines[2] == "2,say skip,echo: Translate: say skip,,,skipped,,skipped"
    pipeline_id = next(word.rstrip(":") for word in result.output.split() if word.startswith("pipe_"))
    status = CliRunner().invoke(main, ["pipeline", "status", pipeline_id, "--json"], env=env)
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["status"] == "completed"
    jsonl = tmp_path / "out.jsonl"
    results = CliRunner().invoke(main, ["pipeline", "results", pipeline_id, "-o", str(jsonl)], env=env)
    assert results.exit_code == 0, results.output
    first = json.loads(jsonl.read_text().splitlines()[0])
    assert first["row"] == {"text": "hello"}
    assert first["steps"]["extract"]["json"] == {"echo": "Extract: echo: Translate: hello"}


def test_a_chain_for_one_input_whole_and_streamed(client: Client) -> None:
    steps = _three_steps()["steps"]
    result = client.chain(steps, {"text": "bonjour"})
    assert isinstance(result, ChainResult)
    assert result.answer == "echo: Judge Extract: echo: Translate: bonjour against bonjour (3 tokens)"
    extract = result.steps["extract"]
    assert extract is not None
    assert extract.json_value == {"echo": "Extract: echo: Translate: bonjour"}
    skipped = client.chain(steps, {"text": "skip this"})
    assert isinstance(skipped, ChainResult)
    assert skipped.answer is None
    assert skipped.steps["judge"] == StepOutcome(skipped=True)
    chunks = list(client.chain(steps, {"text": "bonjour"}, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == result.answer
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it came in pieces
    with pytest.raises(RequestError, match="was skipped"):
        list(client.chain(steps, {"text": "skip this"}, stream=True))
    with pytest.raises(TemplateError, match="uses text, which the rows do not have"):
        client.chain(steps, {"nope": "no text column"})


async def test_the_async_chain(async_client: AsyncClient) -> None:
    steps = _three_steps()["steps"]
    result = await async_client.chain(steps, {"text": "hallo"})
    assert result.answer == "echo: Judge Extract: echo: Translate: hallo against hallo (3 tokens)"
    chunks = [chunk async for chunk in async_client.chain_stream(steps, {"text": "hallo"})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == result.answer
    run = await async_client.pipelines.create({"steps": steps[:1]}, [{"text": "a"}, {"text": "b"}])
    final = await async_client.pipelines.wait(run.id, timeout=TIMEOUT_S)
    assert final.status is PipelineStatus.COMPLETED
    rows = await async_client.pipelines.results(run.id)
    assert [r.steps["translate"].answer for r in rows if r.steps["translate"]] == [
        "echo: Translate: a",
        "echo: Translate: b",
    ]
