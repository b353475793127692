"""A 100,000-line batch job end to end through inferpool, against plain Celery, in one run.

    python bench/batch_100k.py --lines 100000 --plain-prompts 5000 --prompt-chars 20 1000 4000 --repeat 3 \
        --json bench/results/batch_100k.json

Each ``--prompt-chars`` size runs both sides ``--repeat`` times, alternating which goes first, with prompts of
that many characters (the answers are echoes cut at max_tokens 8, as chat.completion objects on both sides);
each side's figure is its median round, and every round's own ratio is printed too.
inferpool: a private Redis, the scheduler and echo workers (bench/registry.yaml's ``echo-bench``); the
client is `inferpool batch run FILE -o OUT --no-local` in its own process, timed from start to the last
output line written, its peak RSS sampled. Baseline: plain Celery on its own private Redis, one task per
prompt (threads pool, 4 threads, Celery's defaults), results through Celery's Redis result backend, all
sent and then all collected. The baseline runs fewer prompts (its rate is steady; 100k would take
minutes); the comparison is prompts per second. Redis peak memory is ``used_memory_peak`` of each
side's fresh server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from inferpool.plumbing.local_pool import EmbeddedRedis, LocalPool, stop_process

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _plain_worker import start_plain_celery_worker  # noqa: E402  (bench/ is not a package)

_FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "


def prompt_text(i: int, chars: int) -> str:
    """``prompt number i`` padded with words to ``chars`` characters (at least the number itself)."""
    head = f"prompt number {i}"
    if len(head) >= chars:
        return head
    filler = (_FILLER * (chars // len(_FILLER) + 1))[: chars - len(head) - 1]
    return f"{head} {filler}"


def chat_body(i: int, chars: int) -> dict[str, object]:
    return {"model": "echo-bench", "messages": [{"role": "user", "content": prompt_text(i, chars)}], "max_tokens": 8}


def write_input(path: Path, n: int, chars: int) -> None:
    with path.open("w") as handle:
        for i in range(n):
            body = chat_body(i, chars)
            handle.write(
                json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
            )
            handle.write("\n")


def run_sampled(args: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[bytes]]:
    """Run a command; return (seconds, peak RSS in MB, result), sampling RSS every 20 ms."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    handle = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    elapsed = time.perf_counter() - started
    return elapsed, peak / 2**20, subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def redis_peak_mb(url: str) -> float:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory_peak"]) / 2**20
    finally:
        client.close()


def bench_inferpool(lines: int, workers: int, workdir: Path, chars: int) -> dict[str, float]:
    source, output = workdir / "input.jsonl", workdir / "output.jsonl"
    write_input(source, lines, chars)
    env = {**os.environ, "INFERPOOL_REGISTRY": str(BENCH / "registry.yaml")}
    with LocalPool(["echo-bench"], env=env, workers_per_model=workers) as pool:
        env["REDIS_URL"] = pool.redis_url
        cmd = [sys.executable, "-m", "inferpool", "batch", "run", str(source), "-o", str(output), "--no-local",
               "--no-show-answers"]  # fmt: skip
        elapsed, rss_mb, result = run_sampled(cmd, env)
        if result.returncode != 0:
            raise SystemExit(f"inferpool batch run failed:\n{result.stderr.decode()[-3000:]}")
        redis_mb = redis_peak_mb(pool.redis_url)
    with output.open() as handle:
        ok = sum(1 for line in handle if json.loads(line)["error"] is None)
    if ok != lines:
        raise SystemExit(f"only {ok} of {lines} lines succeeded")
    return {"prompts": lines, "seconds": elapsed, "prompts_per_s": lines / elapsed, "client_peak_rss_mb": rss_mb,
            "redis_peak_mb": redis_mb}  # fmt: skip


_PLAIN_CLIENT = """
import sys, time
sys.path.insert(0, {bench!r})
from plain_celery_app import app, chat
from batch_100k import chat_body
n, chars = {n}, {chars}
chat.delay(chat_body(0, chars)).get(timeout=60)
started = time.perf_counter()
results = [chat.delay(chat_body(i, chars)) for i in range(n)]
values = [r.get(timeout=600) for r in results]
elapsed = time.perf_counter() - started
assert values[-1]["choices"][0]["message"]["content"].startswith(f"echo: prompt number {{n - 1}}")
print(elapsed)
"""


def bench_plain_celery(prompts: int, workdir: Path, chars: int) -> dict[str, float]:
    server = EmbeddedRedis(workdir / "plain-redis")
    server.start()
    env = {**os.environ, "REDIS_URL": server.url}
    worker = start_plain_celery_worker(env)
    try:
        code = _PLAIN_CLIENT.format(bench=str(BENCH), n=prompts, chars=chars)
        _, rss_mb, result = run_sampled([sys.executable, "-c", code], env)
        if result.returncode != 0:
            raise SystemExit(f"plain Celery client failed:\n{result.stderr.decode()[-3000:]}")
        elapsed = float(result.stdout.decode().strip().splitlines()[-1])
        redis_mb = redis_peak_mb(server.url)
    finally:
        stop_process(worker, grace_s=10)
        server.stop()
    return {"prompts": prompts, "seconds": elapsed, "prompts_per_s": prompts / elapsed, "client_peak_rss_mb": rss_mb,
            "redis_peak_mb": redis_mb}  # fmt: skip


def run_size(args: argparse.Namespace, chars: int) -> dict[str, Any]:
    """``--repeat`` rounds of both sides at one prompt size, alternating which goes first (this host's speed
    drifts by up to 25% within minutes; a drift then hits both). Each side's figure is its median round."""
    rounds = []
    for index in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="inferpool-bench-") as tmp:
            workdir = Path(tmp)
            if index % 2 == 0:
                plain = bench_plain_celery(args.plain_prompts, workdir, chars)
                pool = bench_inferpool(args.lines, args.workers, workdir, chars)
            else:
                pool = bench_inferpool(args.lines, args.workers, workdir, chars)
                plain = bench_plain_celery(args.plain_prompts, workdir, chars)
        ratio = pool["prompts_per_s"] / plain["prompts_per_s"]
        rounds.append({"plain_celery": plain, "inferpool": pool, "ratio": ratio})
    plain_median = _median_round([r["plain_celery"] for r in rounds])
    pool_median = _median_round([r["inferpool"] for r in rounds])
    return {"prompt_chars": chars, "plain_celery": plain_median, "inferpool": pool_median,
            "ratio": pool_median["prompts_per_s"] / plain_median["prompts_per_s"],
            "round_ratios": [r["ratio"] for r in rounds], "rounds": rounds}  # fmt: skip


def _median_round(rows: list[dict[str, float]]) -> dict[str, float]:
    """The round with the median rate (the lower middle one for an even count)."""
    return sorted(rows, key=lambda row: row["prompts_per_s"])[(len(rows) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000, help="lines in the inferpool job")
    parser.add_argument("--plain-prompts", type=int, default=10_000, help="prompts sent through plain Celery")
    parser.add_argument("--workers", type=int, default=1, help="echo worker processes in the inferpool pool")
    parser.add_argument("--prompt-chars", type=int, nargs="+", default=[20], help="prompt sizes to run (chars)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of both sides per size; each side's figure is its median round")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    runs = [run_size(args, chars) for chars in args.prompt_chars]
    print(f"{'chars':>6} {'path':<28}{'prompts':>9}{'seconds':>10}{'prompts/s':>11}{'client RSS MB':>15}"
          f"{'Redis peak MB':>15}{'ratio':>8}")  # fmt: skip
    for run in runs:
        for name, key in (("plain Celery (1 task/prompt)", "plain_celery"), ("inferpool batch job", "inferpool")):
            row = run[key]
            ratio = f"{run['ratio']:.1f}x" if key == "inferpool" else ""
            print(f"{run['prompt_chars']:>6} {name:<28}{row['prompts']:>9}{row['seconds']:>10.1f}"
                  f"{row['prompts_per_s']:>11.0f}{row['client_peak_rss_mb']:>15.0f}{row['redis_peak_mb']:>15.0f}"
                  f"{ratio:>8}")  # fmt: skip
    if args.repeat > 1:
        print(f"medians of {args.repeat} rounds; each round's own ratio:")
        for run in runs:
            print(f"{run['prompt_chars']:>6} " + ", ".join(f"{ratio:.1f}x" for ratio in run["round_ratios"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
