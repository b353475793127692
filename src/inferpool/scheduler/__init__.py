"""The scheduler service: runs batch jobs (dispatch with a window per model, cancel, expiry, recovery, the
lease between several schedulers). Routing and batch-line parsing run in the client (``inferpool.client``);
their names stay importable from here for code written before they moved."""

from inferpool.client.batch_lines import AcceptedLine, BatchLineParser, ParsedLine, RejectedLine
from inferpool.client.routing import Route, Router

__all__ = ["AcceptedLine", "BatchLineParser", "ParsedLine", "RejectedLine", "Route", "Router"]
