"""docker-compose.yml and ops/registry.yaml: what can be checked without a Docker engine (tests/test_compose_stack.py
brings the stack up for real where one can run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import yaml

from inferpool import Registry

REPO = Path(__file__).resolve().parent.parent


def test_compose_requires_passwords_and_keeps_secrets_out_of_the_file() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"redis", "scheduler", "flower", "api-worker", "local-worker"} <= set(services)
    redis_command = " ".join(services["redis"]["command"])
    assert "requirepass" in redis_command
    assert "--appendonly yes" in redis_command
    assert "exit 1" in redis_command  # no password file, no Redis
    # Secrets are files mounted at /run/secrets, never environment values (docker inspect shows those).
    assert set(compose["secrets"]) == {"REDIS_PASSWORD", "INFERPOOL_FLOWER_AUTH", "OPENAI_API_KEY"}
    assert all(set(secret) == {"file"} for secret in compose["secrets"].values())
    assert "INFERPOOL_FLOWER_AUTH" in services["flower"]["secrets"]
    assert "OPENAI_API_KEY" in services["api-worker"]["secrets"]
    for name, service in services.items():
        assert "REDIS_PASSWORD" in service["secrets"], name
        environment = service.get("environment") or {}
        assert not {"REDIS_PASSWORD", "OPENAI_API_KEY", "INFERPOOL_FLOWER_AUTH"} & set(environment), name
        assert "@" not in str(environment.get("REDIS_URL", "")), name  # no password in the URL
        assert "healthcheck" in service, name
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


def test_secret_files_stand_in_for_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the compose services rely on: secret files in INFERPOOL_SECRETS_DIR named after the variables."""
    from inferpool import ConfigurationError
    from inferpool.plumbing.settings import Settings

    (tmp_path / "REDIS_PASSWORD").write_text("p@ss:w/rd\n")
    (tmp_path / "INFERPOOL_FLOWER_AUTH").write_text("ops:flower-pw\n")
    (tmp_path / "OPENAI_API_KEY").write_text("sk-from-file\n")
    monkeypatch.setenv("INFERPOOL_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings = Settings()
    url = redis.Redis.from_url(settings.require_redis_url()).connection_pool.connection_kwargs
    assert (url["host"], url["password"]) == ("redis", "p@ss:w/rd")  # quoted into the URL, read back whole
    assert settings.flower_auth == "ops:flower-pw"
    assert Settings.environment_secret("OPENAI_API_KEY") == "sk-from-file"
    assert "p@ss" not in repr(settings.model_dump(exclude={"redis_url"}))
    # A variable of the same name wins; a URL that names its password keeps it.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.setenv("REDIS_URL", "redis://:own@redis:6379/0")
    assert Settings.environment_secret("OPENAI_API_KEY") == "sk-from-env"
    assert Settings().redis_url == "redis://:own@redis:6379/0"
    assert Settings.environment_secret("../etc/passwd") == ""  # names only, no paths
    monkeypatch.setenv("INFERPOOL_SECRETS_DIR", str(tmp_path / "none"))
    assert Settings().flower_auth == ""
    # Bytes that are not UTF-8 text are a clear error naming the file or directory, not a traceback.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "REDIS_PASSWORD").write_bytes(b"\xff\xfe\x00pw")
    (bad / "ANTHROPIC_API_KEY").write_bytes(b"\xed\xa0\x80")  # an encoded lone surrogate
    monkeypatch.setenv("INFERPOOL_SECRETS_DIR", str(bad))
    with pytest.raises(ConfigurationError, match=f"secret file in {bad}.*UTF-8 text"):
        Settings()
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="ANTHROPIC_API_KEY cannot be read"):
        Settings.environment_secret("ANTHROPIC_API_KEY")
