"""``inferpool worker``: serve one model from this process, or several within a memory budget."""

from __future__ import annotations

import sys

import click

from inferpool.cli._common import configure_logging, load_settings


@click.command()
@click.option("--model", "-m", default=None, help="Registry name (or alias) of the one model to serve.")
@click.option("--models", default=None,
              help="Several models, comma-separated (a,b,c): loaded when work for them arrives, within "
                   "--memory-budget, the least recently used idle one unloaded to make room (vLLM models on a "
                   "GPU are put to sleep in host RAM instead, and woken for their next work).")  # fmt: skip
@click.option("--memory-budget", default=None,
              help="With --models: memory the loaded models may take together: bytes with a unit (8GiB, 500MB) or "
                   "a fraction of the GPU's memory (of RAM on CPU), e.g. 0.8. Each model's footprint is its "
                   "registry memory_gb, else measured at its first load. Default: 0.8.")  # fmt: skip
@click.option("--keep-alive", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="With --models: seconds an idle model stays loaded (or asleep) "
                   "unless its room is needed.")  # fmt: skip
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help="Chunks handled at once (default: the model's serving.concurrency; with --models the largest).",
)
@click.option("--worker-id", default=None, help="Name shown in Flower and heartbeats (default: MODEL@HOST-PID).")
@click.pass_context
def worker(ctx: click.Context, model: str | None, models: str | None, memory_budget: str | None,
           keep_alive: float, concurrency: int | None, worker_id: str | None) -> None:  # fmt: skip
    """Serve MODEL's queue until stopped (SIGTERM finishes the chunks in hand), or several --models.

    Needs REDIS_URL. With --model the model loads before any task is taken: if it cannot load, the worker
    says why and exits with code 1 without consuming anything. With --models the worker announces every
    model at once and loads each when its first chunk arrives (the chunk's lines wait in Redis meanwhile);
    a model whose footprint is over the budget is refused at start.
    """
    if (model is None) == (models is None):
        raise click.UsageError("give --model NAME, or --models A,B,C")
    settings = load_settings(ctx)
    configure_logging(settings.log_level)
    if model is not None:
        from inferpool.workers.serve import serve_model

        sys.exit(serve_model(model, settings, concurrency=concurrency, worker_id=worker_id))
    from inferpool.residency.budget import describe_bytes, parse_budget
    from inferpool.residency.serve import plan_for, serve_models

    names = [name.strip() for name in (models or "").split(",") if name.strip()]
    if not names:
        raise click.UsageError("--models needs at least one model name (a,b,c)")
    budget = parse_budget(memory_budget or "0.8")
    click.echo(f"holding up to {describe_bytes(budget)} of, loaded when their work arrives:", err=True)
    for name, footprint in plan_for(names, settings, budget):
        click.echo(f"  {name}: {describe_bytes(footprint) if footprint else 'footprint measured at first load'}",
                   err=True)  # fmt: skip
    sys.exit(serve_models(names, settings, budget=budget, keep_alive_s=keep_alive, concurrency=concurrency,
                          worker_id=worker_id))  # fmt: skip
