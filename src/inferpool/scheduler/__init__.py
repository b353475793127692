"""Turning requests into routed tasks: routing and batch-file parsing."""

from inferpool.scheduler.batch_input import AcceptedLine, BatchLineParser, ParsedLine, RejectedLine
from inferpool.scheduler.router import Route, Router

__all__ = ["AcceptedLine", "BatchLineParser", "ParsedLine", "RejectedLine", "Route", "Router"]
