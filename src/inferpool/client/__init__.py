"""What users import: ``Client`` and ``AsyncClient``, result handles, and batch jobs."""

from inferpool.client.batches import Batches, parse_window
from inferpool.client.client import AsyncClient, AsyncResultHandle, Client, ResultHandle

__all__ = ["AsyncClient", "AsyncResultHandle", "Batches", "Client", "ResultHandle", "parse_window"]
