"""docker-compose.yml and ops/registry.yaml: what can be checked without a Docker engine (none runs here)."""

from __future__ import annotations

from pathlib import Path

import yaml

from inferpool import Registry

REPO = Path(__file__).resolve().parent.parent


def test_compose_requires_passwords_and_keeps_secrets_out_of_the_file() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"redis", "scheduler", "flower", "api-worker", "local-worker"} <= set(services)
    assert "--requirepass" in services["redis"]["command"]
    assert "--appendonly yes" in services["redis"]["command"]
    assert "${REDIS_PASSWORD:?" in services["redis"]["command"]  # compose refuses to start without it
    assert services["flower"]["environment"]["INFERPOOL_FLOWER_AUTH"].startswith("${FLOWER_AUTH:?")
    assert services["api-worker"]["environment"]["OPENAI_API_KEY"].startswith("${OPENAI_API_KEY:?")
    assert "--no-auth" not in text
    for name in ("scheduler", "flower"):  # published on loopback only
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])


def test_ops_registry_is_valid_and_names_the_compose_models() -> None:
    registry = Registry.load([REPO / "ops" / "registry.yaml"])
    assert registry.get("gpt-4o-mini").backend == "openai"
    assert "smollm2-135m" in registry
