"""A 3-step pipeline over many rows against the same three steps run as three batch jobs one after another.

    python bench/pipeline.py --rows 10000 --json bench/results/pipeline.json

One local pool (private Redis, scheduler, one worker per model) serves three echo models with 20 ms per request
(``bench/registry.yaml``: draft, refine, judge). The pipeline: ``draft`` over each row's text, ``refine`` over the
draft, ``judge`` over both. The baseline is what a user does without pipelines: a template job for the first
step, wait for all of it, join its answers to the rows, a second template job, wait, a third. Printed: wall time
of each (and the ratio; the aim is <= 0.6: steps overlap), and CPU seconds of every process of the pool plus this
client per (row, step) in each mode (the ratio; the aim is <= 1.1: a pipeline's bookkeeping is cheap beside a
line's). Both runs produce the same answers (checked).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
MODELS = ["echo-draft-bench", "echo-refine-bench", "echo-judge-bench"]

STEPS: list[dict[str, Any]] = [
    {"name": "draft", "model": MODELS[0], "messages": [{"role": "user", "content": "Draft: {{ text }}"}]},
    {"name": "refine", "model": MODELS[1],
     "messages": [{"role": "user", "content": "Refine: {{ steps.draft.answer }}"}]},
    {"name": "judge", "model": MODELS[2],
     "messages": [{"role": "user", "content": "Judge: {{ steps.refine.answer }} / {{ steps.draft.answer }}"}]},
]  # fmt: skip


def _cpu_seconds() -> float:
    """CPU time of this process and every process it started (the pool), so far."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a process that ended meanwhile
            total += sum(child.cpu_times()[:2])
    return total


def _sequential(client: Any, rows: list[dict[str, str]]) -> list[str]:
    """Three template jobs, each after the previous one ended, its answers joined to the rows by hand."""
    joined = [dict(row) for row in rows]
    for name, content in (("draft", "Draft: {{ text }}"), ("refine", "Refine: {{ draft }}"),
                          ("judge", "Judge: {{ refine }} / {{ draft }}")):  # fmt: skip
        model = next(step["model"] for step in STEPS if step["name"] == name)
        template = {"model": model, "custom_id": "{{ row_number }}", "messages": [{"role": "user", "content": content}]}
        job = client.batches.create_from_template(template, joined)
        client.batches.wait(job.id, timeout=3600, poll_s=0.05)
        for line in client.batches.results(job.id):
            joined[int(line.custom_id) - 1][name] = line.response.body.text
    return [row["judge"] for row in joined]


def run(rows_count: int) -> dict[str, Any]:
    from inferpool import Client
    from inferpool.plumbing.local_pool import LocalPool

    rows = [{"text": f"row {i} says something worth a second look"} for i in range(rows_count)]
    figures: dict[str, Any] = {"rows": rows_count, "steps": len(STEPS)}
    with LocalPool(MODELS, env={"INFERPOOL_LOG_LEVEL": "WARNING"}) as pool, Client(pool.redis_url) as client:
        warm = client.pipelines.create({"steps": STEPS}, rows[:50])  # both paths start with warm processes
        client.pipelines.wait(warm.id, timeout=600)
        order = ["pipeline", "sequential"]
        answers: dict[str, list[str]] = {}
        for mode in order:
            cpu, started = _cpu_seconds(), time.perf_counter()
            if mode == "pipeline":
                created = client.pipelines.create({"steps": STEPS}, rows)
                final = client.pipelines.wait(created.id, timeout=3600, poll_s=0.05)
                assert final.status.value == "completed", final
                answers[mode] = [r.steps["judge"].answer for r in client.pipelines.results(created.id)]  # type: ignore[union-attr]
            else:
                answers[mode] = _sequential(client, rows)
            seconds = time.perf_counter() - started
            used = _cpu_seconds() - cpu
            figures[mode] = {"seconds": round(seconds, 2), "rows_per_s": round(rows_count / seconds, 1),
                             "cpu_ms_per_row_step": round(1000 * used / (rows_count * len(STEPS)), 3)}  # fmt: skip
        assert answers["pipeline"] == answers["sequential"], "the two runs gave different answers"
    figures["wall_time_pipeline_over_sequential"] = round(figures["pipeline"]["seconds"]
                                                          / figures["sequential"]["seconds"], 3)  # fmt: skip
    figures["cpu_per_row_step_pipeline_over_plain_line"] = round(
        figures["pipeline"]["cpu_ms_per_row_step"] / figures["sequential"]["cpu_ms_per_row_step"], 3)  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows through the three steps")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    os.environ["INFERPOOL_REGISTRY"] = str(BENCH / "registry.yaml")
    figures = run(args.rows)
    json.dump(figures, sys.stdout, indent=2)
    print()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
