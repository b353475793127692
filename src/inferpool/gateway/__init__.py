"""An OpenAI-compatible HTTP gateway in front of the pool: ``inferpool gateway``."""

from inferpool.gateway.app import create_app

__all__ = ["create_app"]
