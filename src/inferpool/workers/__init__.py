"""Running inference: the ``Backend`` protocol, built-in backends, and the Celery worker around them."""

from inferpool.workers.backend import Backend, Generation, GenerationOutcome, available_backends, create_backend
from inferpool.workers.runtime import ChunkReport, WorkerRuntime

__all__ = [
    "Backend",
    "ChunkReport",
    "Generation",
    "GenerationOutcome",
    "WorkerRuntime",
    "available_backends",
    "create_backend",
]
