"""Prompt templates over data rows: rendering in Jinja's sandbox, rows from CSV/JSONL/Parquet, per-row
errors, a job made from a template on the real pool, and its results joined back to the rows (Python and
the ``inferpool batch`` command)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from inferpool import Client, JobStatus, Settings, TemplateError
from inferpool.templates import UnrenderedRow, load_template, read_rows
from inferpool.templates.join import join_results

from .test_cli import run_cli

TEMPLATE = """
model: echo
params: {temperature: 0, max_tokens: 64}
custom_id: "{{ id }}"
messages:
  - {role: system, content: "Answer in one word."}
  - {role: user, content: "Capital of {{ country | upper }}?"}
"""


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def template_path(tmp_path: Path) -> Path:
    path = tmp_path / "prompt.yaml"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture
def rows_csv(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    rows = [{"id": "fr", "country": "France"}, {"id": "de", "country": "Germany"}, {"id": "xx", "country": ""}]
    write_csv(path, rows, ["id", "country"])
    with path.open("a", encoding="utf-8") as handle:
        handle.write("short\n")  # a row without its country column
    return path


def test_rows_render_into_batch_lines_and_bad_rows_say_which_column(template_path: Path, rows_csv: Path) -> None:
    lines = list(load_template(template_path).compiled().lines(read_rows(rows_csv)))
    first = json.loads(lines[0])  # type: ignore[arg-type]
    assert first["custom_id"] == "fr"
    assert first["url"] == "/v1/chat/completions"
    assert first["body"] == {"model": "echo", "temperature": 0, "max_tokens": 64, "messages": [
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of FRANCE?"}]}  # fmt: skip
    assert json.loads(lines[2])["body"]["messages"][1]["content"] == "Capital of ?"  # type: ignore[arg-type]  # empty is a value
    assert lines[3] == UnrenderedRow("short", "row 4: column 'country' is missing (used in messages[1].content)")


def test_the_sandbox_and_bad_templates(tmp_path: Path) -> None:
    escape = {
        "model": "echo",
        "messages": [{"role": "user", "content": "{{ x.__class__.__mro__[1].__subclasses__() }}"}],
    }
    (line,) = load_template(escape).compiled().lines([{"x": "text"}])
    assert isinstance(line, UnrenderedRow)
    assert "row 1: messages[0].content cannot be rendered" in line.message
    with pytest.raises(TemplateError, match=r"messages\[0\].content: Jinja syntax error on line 1"):
        load_template({"model": "echo", "messages": [{"role": "user", "content": "{% if %}"}]}).compiled()
    with pytest.raises(TemplateError, match="messages: Field required"):
        load_template({"model": "echo"})
    with pytest.raises(TemplateError, match="give model at the top"):
        load_template(
            {"model": "echo", "params": {"model": "x"}, "messages": [{"role": "user", "content": "x"}]}
        ).compiled()
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"\xff\xfe: [")
    with pytest.raises(TemplateError, match=r"garbage\.yaml is not a YAML template"):
        load_template(garbage)
    with pytest.raises(TemplateError, match="rows must be a"):
        read_rows(tmp_path / "data.xlsx")


def test_jsonl_and_parquet_rows(tmp_path: Path) -> None:
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"country": "Peru"}\n\n[1, 2]\n{not json\n')
    rows = list(read_rows(jsonl))
    assert rows[0] == {"country": "Peru"}
    assert isinstance(rows[1], ValueError)
    assert isinstance(rows[2], ValueError)
    template = load_template({"model": "echo", "messages": [{"role": "user", "content": "{{ country }}"}]}).compiled()
    rendered = list(template.lines(rows))
    assert json.loads(rendered[0])["custom_id"] == "row-1"  # type: ignore[arg-type]
    assert rendered[1] == UnrenderedRow(None, "row 2: not a JSON object")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"country": ["Chile", "Japan"], "n": [1, 2]}), parquet)
    assert list(read_rows(parquet)) == [{"country": "Chile", "n": 1}, {"country": "Japan", "n": 2}]


SLOW = hypothesis_settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@SLOW
@given(raw=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_template_or_rows_bytes_end_in_a_clear_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "any.yaml"
    path.write_bytes(raw)
    try:
        load_template(path).compiled()
    except TemplateError as exc:
        assert str(exc)  # noqa: PT017 - the error is the point: it must say something
    for suffix in (".csv", ".jsonl"):
        rows_path = tmp_path / f"any{suffix}"
        rows_path.write_bytes(raw)
        template = load_template({"model": "echo", "messages": [{"role": "user", "content": "{{ a }}"}]}).compiled()
        try:
            lines = list(template.lines(read_rows(rows_path)))
        except TemplateError as exc:
            assert str(exc)  # noqa: PT017
            continue
        assert all(isinstance(line, str | UnrenderedRow) for line in lines)


@pytest.mark.usefixtures("echo_worker", "scheduler")
def test_a_job_from_a_template_and_its_results_joined_to_the_rows(client: Client, template_path: Path,
                                                                  rows_csv: Path, tmp_path: Path) -> None:  # fmt: skip
    job = client.batches.create_from_template(template_path, rows_csv)
    job = client.batches.wait(job.id, timeout=120)
    assert job.status is JobStatus.COMPLETED
    assert (job.request_counts.total, job.request_counts.completed, job.request_counts.failed) == (4, 3, 1)
    errors = [line for line in client.batches.results(job.id) if line.error is not None]
    assert [(e.custom_id, e.error.code) for e in errors if e.error] == [("short", "template_error")]

    answers = tmp_path / "answers.csv"
    summary = join_results(rows_csv, client.batches.results(job.id), answers, job.metadata["inferpool_custom_id"])
    assert (summary.rows, summary.answered, summary.failed, summary.missing) == (4, 3, 1, 0)
    with answers.open(newline="") as handle:
        joined = list(csv.DictReader(handle))
    assert [row["id"] for row in joined] == ["fr", "de", "xx", "short"]
    assert joined[0]["answer"].startswith("echo: ")
    assert "FRANCE" in joined[0]["answer"]
    assert joined[0]["error"] == ""
    assert "column 'country' is missing" in joined[3]["error"]


@pytest.mark.usefixtures("echo_worker", "scheduler")
def test_the_batch_command_with_templates(settings: Settings, template_path: Path, rows_csv: Path,
                                          tmp_path: Path) -> None:  # fmt: skip
    built = tmp_path / "batch.jsonl"
    done = run_cli("batch", "build", "--template", str(template_path), "--rows", str(rows_csv), "-o", str(built))
    assert done.returncode == 1, done.stderr
    assert "3 lines written" in done.stderr
    assert "row 4: column 'country' is missing" in done.stderr
    assert len(built.read_text().splitlines()) == 3

    env = {"REDIS_URL": settings.require_redis_url()}
    both = run_cli("batch", "submit", str(built), "--template", str(template_path), env=env)
    assert both.returncode != 0
    assert "not both" in both.stderr
    submitted = run_cli("batch", "submit", "--template", str(template_path), "--rows", str(rows_csv), env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert run_cli("batch", "wait", job_id, env=env).returncode == 0
    joined = tmp_path / "answers.jsonl"
    result = run_cli("batch", "results", job_id, "--join", str(rows_csv), "-o", str(joined), env=env)
    assert result.returncode == 0, result.stderr
    assert "4 rows written" in result.stderr
    rows = [json.loads(line) for line in joined.read_text().splitlines()]
    assert rows[1]["id"] == "de"
    assert "GERMANY" in rows[1]["answer"]


def test_request_parameters_may_sit_at_the_top_level_as_in_a_request_body() -> None:
    """Issue 25.17: a template mirroring an OpenAI body (temperature beside model) is accepted."""
    top = load_template({"model": "echo", "temperature": 0, "max_tokens": 8, "params": {"seed": 3},
                         "messages": [{"role": "user", "content": "{{ q }}"}]}).compiled()  # fmt: skip
    (line,) = top.lines([{"q": "hi"}])
    assert isinstance(line, str)
    assert json.loads(line)["body"] == {"model": "echo", "messages": [{"role": "user", "content": "hi"}],
                                        "temperature": 0, "max_tokens": 8, "seed": 3}  # fmt: skip
    with pytest.raises(TemplateError, match="both at the top level and under params"):
        load_template({"model": "echo", "temperature": 0, "params": {"temperature": 1},
                       "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
    with pytest.raises(TemplateError, match="temprature: not a template field nor a chat request parameter"):
        load_template({"model": "echo", "temprature": 0, "messages": [{"role": "user", "content": "x"}]})


def test_a_csv_field_over_128_kib_is_fine_and_one_over_the_line_limit_fails_its_row_only(tmp_path: Path) -> None:
    """Issue 25.10: Python's csv module stops at 128 KiB per field; lines up to the line limit are allowed."""
    from inferpool.templates.rows import MAX_CSV_FIELD_CHARS

    path = write_csv(tmp_path / "big.csv", [{"id": "a", "text": "x" * 200_000},
                                            {"id": "b", "text": "y" * (MAX_CSV_FIELD_CHARS + 10)},
                                            {"id": "c", "text": "short"}], ["id", "text"])  # fmt: skip
    template = load_template({"model": "echo", "custom_id": "{{ id }}",
                              "messages": [{"role": "user", "content": "{{ text }}"}]}).compiled()  # fmt: skip
    lines = list(template.lines(read_rows(path)))
    assert len(lines) == 3
    assert isinstance(lines[0], str)
    assert len(json.loads(lines[0])["body"]["messages"][0]["content"]) == 200_000
    assert isinstance(lines[1], UnrenderedRow)
    assert "field larger than field limit" in lines[1].message
    assert isinstance(lines[2], str)
