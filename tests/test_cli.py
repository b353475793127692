"""The ``inferpool`` command as a user runs it: real subprocesses, real local pools, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from inferpool.plumbing.local_pool import free_port

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "inferpool", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def _pool_processes_started_after(moment: float) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["create_time"] >= moment and ("inferpool worker" in cmdline or "redis-server" in cmdline):
            found.append(proc)
    return found


def _echo_line(custom_id: str, text: str) -> str:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_help_explains_the_commands() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    for word in ("batch", "worker", "models", "REDIS_URL"):
        assert word in top.stdout
    batch_help = run_cli("batch", "run", "--help")
    assert batch_help.returncode == 0
    assert "--local" in batch_help.stdout
    assert "custom_id" in batch_help.stdout


def test_batch_run_local_starts_and_stops_everything(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    lines = [_echo_line(f"id-{i}", f"line {i}") for i in range(25)]
    lines.insert(3, "{broken json")
    lines.insert(10, _echo_line("id-2", "duplicate id"))
    source.write_text("\n".join(lines) + "\n")
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    started = time.time()
    proc = run_cli("batch", "run", str(source), "-o", str(out), "--errors", str(errors), env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    good = [json.loads(line) for line in out.read_text().splitlines()]
    bad = [json.loads(line) for line in errors.read_text().splitlines()]
    assert sorted(g["custom_id"] for g in good) == sorted(f"id-{i}" for i in range(25))
    assert all(g["response"]["status_code"] == 200 and g["error"] is None for g in good)
    answers = {g["custom_id"]: g["response"]["body"]["choices"][0]["message"]["content"] for g in good}
    assert answers["id-4"] == "echo: line 4"
    assert sorted(b["error"]["code"] for b in bad) == ["duplicate_custom_id", "invalid_json"]
    assert "completed, 27/27 done (25 completed, 2 failed)" in proc.stdout
    assert "echo" in proc.stdout
    # Nothing left behind: no worker or redis-server from this run, no pool directory.
    assert _pool_processes_started_after(started) == []
    assert not list(tmp_path.glob("inferpool-pool-*"))


def test_missing_redis_is_one_clear_line(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(_echo_line("a", "hi") + "\n")
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    proc = run_cli("batch", "run", str(source), "-o", str(tmp_path / "o.jsonl"), env={"REDIS_URL": url})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "cannot connect to Redis at redis://:***@127.0.0.1" in proc.stderr
    assert "s3cret" not in proc.stderr


def test_an_invalid_setting_in_the_environment_is_one_clear_line() -> None:
    """Any bytes in a variable (an OTLP protocol nobody serves, a TTL that is no number, undecodable bytes) make
    one line naming the variable, never a traceback, and never the value (it may be a secret)."""
    for name, value in (("OTEL_EXPORTER_OTLP_PROTOCOL", "bogus-s3cret"), ("INFERPOOL_RESULT_TTL_S", "s3cret"),
                        ("OTEL_EXPORTER_OTLP_TIMEOUT", "\udcff\udcfes3cret")):  # fmt: skip
        proc = run_cli("models", env={name: value})
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "the environment's settings are invalid" in proc.stderr
        assert "fix or unset" in proc.stderr
        assert "s3cret" not in proc.stderr


def test_no_local_without_redis_url_says_what_to_do(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(_echo_line("a", "hi") + "\n")
    proc = run_cli("batch", "run", str(source), "-o", str(tmp_path / "o.jsonl"), "--no-local")
    assert proc.returncode == 1
    assert "set REDIS_URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_input_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "empty.jsonl"
    source.write_text("\n\n")
    proc = run_cli("batch", "run", str(source), "-o", str(tmp_path / "o.jsonl"), env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 1
    assert "has no requests" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.usefixtures("scheduler", "echo_worker")
def test_submit_then_reattach_from_other_processes(redis_url: str, tmp_path: Path) -> None:
    """The submitting process exits at once; others follow the job and fetch its results by id."""
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_echo_line(f"r{i}", f"reattach {i}") for i in range(500)) + "\n")
    env = {"REDIS_URL": redis_url}
    submitted = run_cli("batch", "submit", str(source), env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("batch_")
    assert f"inferpool batch wait {job_id}" in submitted.stderr
    waited = run_cli("batch", "wait", job_id, "--timeout", "120", env=env)
    assert waited.returncode == 0, waited.stderr
    assert "completed, 500/500 done" in waited.stdout
    status = run_cli("batch", "status", job_id, "--json", env=env)
    batch_object = json.loads(status.stdout)
    assert batch_object["status"] == "completed"
    assert batch_object["request_counts"] == {"total": 500, "completed": 500, "failed": 0}
    assert batch_object["usage"][0]["model"] == "echo"
    out = tmp_path / "out.jsonl"
    fetched = run_cli("batch", "results", job_id, "-o", str(out), env=env)
    assert fetched.returncode == 0, fetched.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(500))
    usage = run_cli("stats", "--json", "--job", job_id, env=env)
    assert json.loads(usage.stdout)[0]["requests"] == 500
    listed = run_cli("batch", "list", env=env)
    assert job_id in listed.stdout
    cancelled = run_cli("batch", "cancel", job_id, env=env)
    assert f"{job_id}: completed" in cancelled.stdout  # a finished job stays finished


def test_unknown_job_id_is_a_clear_error(redis_url: str) -> None:
    proc = run_cli("batch", "status", "batch_missing", env={"REDIS_URL": redis_url})
    assert proc.returncode == 1
    assert "no batch job 'batch_missing'" in proc.stderr


def test_worker_for_unknown_model_exits_with_a_clear_error(redis_url: str) -> None:
    proc = run_cli("worker", "--model", "no-such-model", env={"REDIS_URL": redis_url}, timeout=120)
    assert proc.returncode == 1
    assert "model 'no-such-model' is not in the registry" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_that_cannot_load_its_model_exits_without_consuming(redis_url: str, tmp_path: Path) -> None:
    registry = tmp_path / "broken.yaml"
    registry.write_text(
        "models:\n  - name: broken-local\n    backend: transformers\n"
        f"    params: {{path: {tmp_path / 'missing-checkpoint'}}}\n"
        "    capabilities: {context_window: 512, max_output_tokens: 16}\n"
    )
    proc = run_cli(
        "worker", "--model", "broken-local", env={"REDIS_URL": redis_url, "INFERPOOL_REGISTRY": str(registry)},
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "missing-checkpoint does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_models_lists_the_registry_as_json() -> None:
    proc = run_cli("models", "--json")
    assert proc.returncode == 0
    names = {entry["name"] for entry in json.loads(proc.stdout)}
    assert {"echo", "smollm2-135m"} <= names


@pytest.mark.model
def test_example_file_runs_end_to_end(tmp_path: Path) -> None:
    """The README's main job: examples/prompts.jsonl through a local pool with SmolLM2 and echo."""
    out = tmp_path / "results.jsonl"
    proc = run_cli("batch", "run", str(REPO / "examples" / "prompts.jsonl"), "-o", str(out),
                   env={"TMPDIR": str(tmp_path)}, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {json.loads(line)["custom_id"]: json.loads(line) for line in out.read_text().splitlines()}
    assert len(results) == 23
    assert all(r["error"] is None for r in results.values())
    assert "Paris" in results["smollm2-01"]["response"]["body"]["choices"][0]["message"]["content"]
    assert "completed, 23/23 done (23 completed, 0 failed)" in proc.stdout
    assert "smollm2-135m" in proc.stdout


def test_flower_refuses_to_start_without_credentials(redis_url: str) -> None:
    proc = run_cli("flower", env={"REDIS_URL": redis_url, "INFERPOOL_FLOWER_AUTH": ""}, timeout=60)
    assert proc.returncode == 1
    assert "set INFERPOOL_FLOWER_AUTH=user:password" in proc.stderr


@pytest.mark.usefixtures("echo_worker")
def test_models_shows_live_workers_and_queues_with_a_redis_url(redis_url: str) -> None:
    proc = run_cli("models", "--json", env={"REDIS_URL": redis_url})
    assert proc.returncode == 0, proc.stderr
    loads = {entry["name"]: entry["load"] for entry in json.loads(proc.stdout)}
    assert loads["echo"]["live_workers"] >= 1
    assert set(loads["echo"]) == {"model", "queue_depth", "in_flight", "live_workers", "context_window", "warm_workers"}
    assert loads["echo"]["warm_workers"] == loads["echo"]["live_workers"]  # a single-model worker is always warm
    table = run_cli("models", env={"REDIS_URL": redis_url, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "workers" in table.stdout
    assert "in flight" in table.stdout
