"""What users import: ``Client`` and ``AsyncClient``, result handles, batch jobs and pipelines."""

from inferpool.client.batches import AsyncBatches, Batches, parse_window
from inferpool.client.client import AsyncClient, Client
from inferpool.client.handles import AsyncResultHandle, ResultHandle
from inferpool.client.pipelines import AsyncPipelines, Pipelines

__all__ = [
    "AsyncBatches",
    "AsyncClient",
    "AsyncPipelines",
    "AsyncResultHandle",
    "Batches",
    "Client",
    "Pipelines",
    "ResultHandle",
    "parse_window",
]
