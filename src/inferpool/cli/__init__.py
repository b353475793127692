"""The ``inferpool`` command. Each command group lives in its own module."""

from __future__ import annotations

import click

from inferpool import __version__
from inferpool.cli._common import InferpoolGroup
from inferpool.cli.batch import batch
from inferpool.cli.dlq import dlq
from inferpool.cli.flower import flower
from inferpool.cli.gateway import gateway
from inferpool.cli.keys import keys
from inferpool.cli.models import models
from inferpool.cli.pipeline import pipeline
from inferpool.cli.probe import probe
from inferpool.cli.scheduler import scheduler
from inferpool.cli.stats import stats
from inferpool.cli.tenants import tenants
from inferpool.cli.worker import worker
from inferpool.cli.workers import workers
from inferpool.plumbing.process_tuning import tune_gc_for_throughput


@click.group(cls=InferpoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="inferpool")
def main() -> None:
    """inferpool: a distributed inference worker pool on Celery and Redis.

    Quick start: `inferpool batch run examples/prompts.jsonl -o results.jsonl` starts a private Redis and
    the workers the file needs, runs every line, writes OpenAI Batch output and prints usage.

    Environment: REDIS_URL (the pool's Redis), INFERPOOL_REGISTRY (extra registry YAML files),
    INFERPOOL_CACHE_DIR (converted model checkpoints).
    """


main.add_command(batch)
main.add_command(dlq)
main.add_command(flower)
main.add_command(gateway)
main.add_command(keys)
main.add_command(models)
main.add_command(pipeline)
main.add_command(probe)
main.add_command(scheduler)
main.add_command(stats)
main.add_command(tenants)
main.add_command(worker)
main.add_command(workers)


def run() -> None:
    """The ``inferpool`` console script: the command line, in a process tuned for throughput (its garbage
    collector; see ``inferpool.plumbing.process_tuning``). ``main`` alone leaves the calling process as it is."""
    tune_gc_for_throughput()
    main()


__all__ = ["main", "run"]
