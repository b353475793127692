"""Local HTTP emulators of the OpenAI and Anthropic APIs, for tests, benchmarks and offline development.

They speak each provider's wire format (so the official SDKs drive them unchanged), inject latency, rate
limits (429 + Retry-After), server errors, timeouts and malformed bodies on demand, and count everything
they receive, so a test can prove a limit was never exceeded.
"""

from inferpool.emulators.models import EmulatedModel, default_models
from inferpool.emulators.server import EmulatorConfig, ProviderEmulator, WindowLimit

__all__ = ["EmulatedModel", "EmulatorConfig", "ProviderEmulator", "WindowLimit", "default_models"]
