"""What users import: ``Client`` and ``AsyncClient``, result handles, and batch jobs."""

from inferpool.client.batches import AsyncBatches, Batches, parse_window
from inferpool.client.client import AsyncClient, AsyncResultHandle, Client, ResultHandle

__all__ = ["AsyncBatches", "AsyncClient", "AsyncResultHandle", "Batches", "Client", "ResultHandle", "parse_window"]
