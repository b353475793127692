"""What users import: ``Client`` and ``AsyncClient``, result handles, and batch runs."""

from inferpool.client.batch import BatchOutcome, BatchRunner
from inferpool.client.client import AsyncClient, AsyncResultHandle, Client, ResultHandle

__all__ = ["AsyncClient", "AsyncResultHandle", "BatchOutcome", "BatchRunner", "Client", "ResultHandle"]
