"""Starting the plain-Celery baseline's worker (bench/plain_celery_app.py), the same way for every bench."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def start_plain_celery_worker(env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``celery -A plain_celery_app worker -P threads -c 4`` (the fastest plain setup we found here)."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "plain_celery_app", "worker", "-P", "threads", "-c", "4",
         "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        cwd=BENCH, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
