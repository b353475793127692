"""Running an OpenAI Batch JSONL file through the pool and collecting one output line per input line."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from inferpool._exceptions import ResultTimeout
from inferpool.client.client import Client, publish_chunk
from inferpool.constants import job_completed_stream_key, job_key, result_key
from inferpool.model_registry.spec import ModelSpec
from inferpool.results import parse_result
from inferpool.scheduler.batch_input import MAX_LINE_BYTES, AcceptedLine, BatchLineParser, ParsedLine, RejectedLine
from inferpool.usage import ModelUsage, summarize_usage
from inferpool.wire import BatchOutputLine, RequestResult, new_id

#: Called with (lines finished, lines in total) whenever progress is made.
ProgressCallback = Callable[[int, int], None]

_READ_COUNT = 1000
_BLOCK_MS = 1000


@dataclass
class BatchOutcome:
    """A finished batch: every parsed line and, for accepted ones, its result."""

    job_id: str
    lines: list[ParsedLine]
    request_ids: dict[int, str]
    results: dict[str, RequestResult]
    wall_s: float = 0.0
    usage: list[ModelUsage] = field(default_factory=list)

    def output_lines(self) -> Iterator[BatchOutputLine]:
        """One OpenAI Batch output line per input line, in input order."""
        for line in self.lines:
            if isinstance(line, RejectedLine):
                yield BatchOutputLine.from_error(line.custom_id, line.error)
            else:
                yield BatchOutputLine.from_result(self.results[self.request_ids[line.line_number]])

    @property
    def total(self) -> int:
        return len(self.lines)

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results.values() if r.ok)

    @property
    def failed(self) -> int:
        return self.total - self.completed


def _chunks(lines: list[AcceptedLine], size: int) -> Iterator[list[AcceptedLine]]:
    for start in range(0, len(lines), size):
        yield lines[start : start + size]


class BatchRunner:
    """Submits a batch through a ``Client`` and follows its results until every line has one."""

    def __init__(self, client: Client, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.client = client
        self.max_line_bytes = max_line_bytes

    def run(
        self, lines: Iterable[str], *, on_progress: ProgressCallback | None = None, timeout: float | None = None
    ) -> BatchOutcome:
        parsed = list(BatchLineParser(self.client.router, max_line_bytes=self.max_line_bytes).parse(lines))
        return self.run_parsed(parsed, on_progress=on_progress, timeout=timeout)

    def run_parsed(
        self, parsed: list[ParsedLine], *, on_progress: ProgressCallback | None = None, timeout: float | None = None
    ) -> BatchOutcome:
        """Run lines already parsed (and routed) by a ``BatchLineParser``."""
        started = time.monotonic()
        outcome = BatchOutcome(job_id=new_id("batch"), lines=parsed, request_ids={}, results={})
        accepted = [line for line in parsed if isinstance(line, AcceptedLine)]
        self._register_job(outcome.job_id, len(accepted))
        self._publish(outcome, accepted)
        self._follow(outcome, len(accepted), on_progress, timeout, started)
        outcome.wall_s = time.monotonic() - started
        outcome.usage = summarize_usage(outcome.results.values(), self.client.registry)
        return outcome

    def _register_job(self, job_id: str, total: int) -> None:
        key = job_key(job_id)
        self.client.redis.hset(key, mapping={"total": total, "created_at": time.time()})
        self.client.redis.expire(key, self.client.settings.result_ttl_s)

    def _publish(self, outcome: BatchOutcome, accepted: list[AcceptedLine]) -> None:
        by_model: dict[str, list[AcceptedLine]] = defaultdict(list)
        specs: dict[str, ModelSpec] = {}
        for line in accepted:
            by_model[line.spec.name].append(line)
            specs[line.spec.name] = line.spec
        for name, group in by_model.items():
            spec = specs[name]
            for members in _chunks(group, spec.serving.chunk_size):
                chunk = self.client.make_chunk(spec, [(m.request, m.custom_id) for m in members], job_id=outcome.job_id)
                for member, item in zip(members, chunk.items, strict=True):
                    outcome.request_ids[member.line_number] = item.request_id
                publish_chunk(self.client.celery, chunk)

    def _follow(
        self,
        outcome: BatchOutcome,
        expected: int,
        on_progress: ProgressCallback | None,
        timeout: float | None,
        started: float,
    ) -> None:
        rejected = outcome.total - expected
        wanted = set(outcome.request_ids.values())
        stream = job_completed_stream_key(outcome.job_id)
        last_id = "0-0"
        if on_progress:
            on_progress(rejected, outcome.total)
        while len(outcome.results) < expected:
            if timeout is not None and time.monotonic() - started > timeout:
                missing = expected - len(outcome.results)
                raise ResultTimeout(
                    f"batch {outcome.job_id}: {missing} of {expected} requests unfinished after {timeout} s; "
                    "check that workers are running for their models"
                )
            response: Any = self.client.redis.xread({stream: last_id}, count=_READ_COUNT, block=_BLOCK_MS)
            ids: list[str] = []
            for _, entries in response or []:
                for entry_id, fields in entries:
                    last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    rid = fields[b"rid"].decode()
                    if rid in wanted and rid not in outcome.results:
                        ids.append(rid)
            if not ids:
                continue
            for rid, raw in zip(ids, self.client.redis.mget([result_key(r) for r in ids]), strict=True):
                if raw is not None:
                    outcome.results[rid] = parse_result(raw)
            if on_progress:
                on_progress(rejected + len(outcome.results), outcome.total)
