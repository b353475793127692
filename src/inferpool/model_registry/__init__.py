"""What models exist, what they can do and how they are served."""

from inferpool.model_registry.registry import Registry, parse_registry_text
from inferpool.model_registry.spec import Capabilities, ModelSpec, Pricing, RegistryFile, ServingSpec

__all__ = ["Capabilities", "ModelSpec", "Pricing", "Registry", "RegistryFile", "ServingSpec", "parse_registry_text"]
