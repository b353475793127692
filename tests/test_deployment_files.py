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
    for name in ("scheduler", "flower", "gateway"):  # published on loopback only
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])


def test_ops_registry_is_valid_and_names_the_compose_models() -> None:
    registry = Registry.load([REPO / "ops" / "registry.yaml"])
    assert registry.get("gpt-4o-mini").backend == "openai"
    assert "smollm2-135m" in registry


def test_the_build_context_ships_the_source_not_environments_or_secrets() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}  # fmt: skip
    assert {".git", ".venv", "**/.env", "tests/node/node_modules", "bench/results"} <= ignored
    copied = [line.split()[1:-1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY")]
    for sources in copied:
        for source in sources:
            assert (REPO / source).exists(), source
            assert source not in ignored, source
    assert "[hf,openai,anthropic,flower,gateway]" in (REPO / "Dockerfile").read_text()


def test_compose_commands_are_inferpool_commands() -> None:
    from click.testing import CliRunner

    from inferpool.cli import main

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        command = service["command"]
        result = CliRunner().invoke(main, [command[0], "--help"])
        assert result.exit_code == 0, (name, result.output)
        for option in (arg for arg in command[1:] if arg.startswith("--")):
            assert option in result.output, (name, option)
