"""Pipeline files (issue 32, first part): checked before anything runs, each error naming the step and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from inferpool import TemplateError
from inferpool.client.batch_lines import BodyLines
from inferpool.client.routing import Router
from inferpool.model_registry import Registry
from inferpool.pipelines.plan import RowPlanner
from inferpool.pipelines.spec import load_pipeline
from inferpool.wire import StepOutcome

TRANSLATE = {"name": "translate", "model": "smollm2-135m", "params": {"temperature": 0, "max_tokens": 64},
             "messages": [{"role": "user", "content": "Translate to French: {{ text }}"}]}  # fmt: skip


def _step(name: str, content: str, **extra: object) -> dict[str, object]:
    return {"name": name, "model": "echo", "messages": [{"role": "user", "content": content}], **extra}


def test_a_dag_is_ordered_by_what_each_step_uses() -> None:
    pipeline, order = load_pipeline({"steps": [
        _step("judge", "{{ steps.summarize.answer }} vs {{ steps.extract.json.city }}"),
        TRANSLATE,
        _step("summarize", "Summarise: {{ steps.translate.answer }}", when="steps.translate.finish_reason == 'stop'"),
        _step("extract", "City in: {{ steps.translate.answer }}", response_format={"type": "json_object"}),
    ]}, columns=["text"])  # fmt: skip
    assert order.index("translate") < order.index("summarize") < order.index("judge")
    assert order.index("extract") < order.index("judge")
    assert pipeline.step("extract").asks_json()


@pytest.mark.parametrize(("steps", "expected"), [
    ([_step("a", "{{ steps.b.answer }}"), _step("b", "{{ steps.a.answer }}")], "in a circle: a -> b -> a"),
    ([_step("a", "{{ steps.nope.answer }}")], "step 'a' uses steps.nope, but no step is called 'nope'"),
    ([_step("a", "x"), _step("a", "y")], "a given more than once"),
    ([_step("a", "x"), _step("b", "{{ steps.a.json.k }}")], "step 'a' does not ask for JSON"),
    ([_step("a", "x"), _step("b", "{{ steps.a.text }}")], "uses steps.a.text; a step offers answer"),
    ([_step("a", "{{ steps['a'].answer }}")], "write steps.<name>, not steps[...]"),
    ([_step("a", "{{ title }}")], "step 'a' uses title, which the rows do not have (columns: text)"),
    ([_step("a", "{{ text ")], "step 'a', messages[0].content: template syntax error"),
    ([_step("a", "x", after=["z"])], "after names 'z'"),
    ([_step("1a", "x")], "is not a step name"),
])  # fmt: skip
def test_malformed_pipelines_name_the_place(steps: list[dict[str, object]], expected: str) -> None:
    with pytest.raises(TemplateError, match=expected.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):  # fmt: skip
        load_pipeline({"steps": steps}, columns=["text"])


def test_bad_yaml_and_shapes_are_clear_errors() -> None:
    for text, expected in (("steps: [", "not valid YAML"), ("- a", "top level must be a mapping"),
                           ("steps: []", "steps: List should have at least 1 item"),
                           ("steps: [{name: a}]", "steps.0.model: Field required")):  # fmt: skip
        with pytest.raises(TemplateError, match=expected):
            load_pipeline(text + "\n")


def _outcome(text: str) -> str:
    try:
        load_pipeline(text + "\n")
    except TemplateError as exc:
        return str(exc)
    return "loaded"


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("utf-8", "replace"))))
def test_any_text_is_a_pipeline_or_a_clear_error(text: str) -> None:
    assert _outcome(text)  # never another exception


def test_pipeline_validate_prints_the_order_or_the_place_of_the_error(tmp_path: Path) -> None:
    path, rows = tmp_path / "pipeline.yaml", tmp_path / "rows.csv"
    path.write_text(yaml.safe_dump({"steps": [_step("summarize", "{{ steps.translate.answer }}"), TRANSLATE]}))
    rows.write_text("text,id\nhello,1\n")
    ok = subprocess.run([sys.executable, "-m", "inferpool", "pipeline", "validate", str(path), "--rows", str(rows)],
                        capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["translate: model smollm2-135m, waits for nothing",
                                      "summarize: model echo, waits for translate"]  # fmt: skip
    rows.write_text("title\nx\n")
    bad = subprocess.run([sys.executable, "-m", "inferpool", "pipeline", "validate", str(path), "--rows", str(rows)],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 1
    assert "step 'translate' uses text, which the rows do not have (columns: title)" in bad.stderr


_ANY_TEXT = st.text(alphabet=st.characters(codec=None, categories=None), max_size=40)  # surrogates, controls


@settings(max_examples=150, deadline=None)
@given(text=_ANY_TEXT, answer=st.one_of(st.none(), _ANY_TEXT), model=_ANY_TEXT)
def test_any_row_and_answer_text_is_a_line_or_an_error_for_that_row(text: str, answer: str | None,
                                                                    model: str) -> None:  # fmt: skip
    """Rows and earlier answers are data: whatever text they hold, a step is queued or ends with a clear error."""
    pipeline, order = load_pipeline({"steps": [
        {"name": "a", "model": "echo", "messages": [{"role": "user", "content": "{{ text }}"}]},
        {"name": "b", "model": "{{ model }}", "when": "steps.a.answer != 'x'",
         "messages": [{"role": "user", "content": "{{ steps.a.answer }} / {{ text | upper }}"}]},
    ]}, ["text", "model"])  # fmt: skip
    planner = RowPlanner(pipeline, order, {"a": "job-a", "b": "job-b"},
                         BodyLines(Router(Registry.load()), tenant=None, costed=True))  # fmt: skip
    columns = {"text": text, "model": model}
    first = planner.plan(1, columns, {}, set())
    assert [d.step for d in first] == ["a"]
    second = planner.plan(1, columns, {"a": StepOutcome(answer=answer)}, {"a"})
    assert [d.step for d in second] == ["b"]
    decision = second[0]
    if decision.line is None:
        ended = StepOutcome.model_validate_json(decision.outcome)
        assert ended.skipped or (ended.error is not None and ended.error.message)
    else:
        assert decision.line.record.startswith(decision.line.model.encode() + b"|")
