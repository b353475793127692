"""Settings, read once from the environment and passed explicitly to whatever needs them.

Precedence: explicit arguments > environment variables > secret files > defaults. Standard variable names
are used where users already have them (``REDIS_URL``); everything else takes the ``INFERPOOL_`` prefix.

Secret files: a file named after a variable in the secrets directory (``INFERPOOL_SECRETS_DIR``, default
``/run/secrets``, where Docker and Compose mount secrets) stands in for that variable: ``REDIS_PASSWORD``,
``INFERPOOL_FLOWER_AUTH``, and the providers' keys (``OPENAI_API_KEY``...), so they need not be in a
container's environment, where ``docker inspect`` shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from inferpool._exceptions import ModelLoadError
from inferpool.tracing.settings import TracingSettings

#: Where secret files are looked for unless INFERPOOL_SECRETS_DIR says otherwise (Docker's secrets mount).
DEFAULT_SECRETS_DIR = "/run/secrets"


def secrets_dir() -> Path | None:
    """The secrets directory, if it exists."""
    import os

    directory = Path(os.environ.get("INFERPOOL_SECRETS_DIR") or DEFAULT_SECRETS_DIR)
    return directory if directory.is_dir() else None


def _unreadable_secret(where: object, exc: BaseException) -> Exception:
    from inferpool._exceptions import ConfigurationError

    return ConfigurationError(f"a secret file in {where} cannot be read ({exc}): it must hold UTF-8 text")


class _SecretFiles(SecretsSettingsSource):
    """pydantic-settings' secret files, with a file that is not UTF-8 text a clear ``ConfigurationError``."""

    def __call__(self) -> dict[str, Any]:
        try:
            return super().__call__()
        except SettingsError as exc:
            raise _unreadable_secret(self.secrets_dir, exc.__cause__ or exc) from exc


def _with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in it, unless it names one already (or is not a redis:// or rediss:// URL)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or parts.password is not None or "@" in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=f":{quote(password, safe='')}@{parts.netloc}"))


def _default_files_dir() -> Path:
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "inferpool" / "files"


def _default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inferpool"


class Settings(BaseSettings):
    """Everything configurable about a client, worker or local pool."""

    model_config = SettingsConfigDict(env_prefix="INFERPOOL_", extra="ignore", frozen=True)

    # (before redis_url: its validator reads this one)
    redis_password: str = Field(
        default="", repr=False, exclude=True,
        validation_alias=AliasChoices("REDIS_PASSWORD", "INFERPOOL_REDIS_PASSWORD"),
        description="Put into REDIS_URL when that URL names no password (a secret file REDIS_PASSWORD keeps it "
        "out of the environment).",
    )  # fmt: skip
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "INFERPOOL_REDIS_URL"),
        description="Redis used as Celery broker and result store. Unset: `batch run` starts a local pool.",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where converted model checkpoints are cached.",
    )
    files_dir: Path = Field(
        default_factory=_default_files_dir,
        description="The gateway's file store (uploaded batch inputs); several gateways share it (a network "
        "file system) or each keeps its own and the load balancer pins /v1/files to one.",
    )
    registry: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Extra registry YAML files, merged over the built-in one (INFERPOOL_REGISTRY, "
        "several separated by ':' ).",
    )
    models_dir: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories whose Hugging Face checkpoints and GGUF files are registered as models "
        "(INFERPOOL_MODELS_DIR, several separated by ':').",
    )
    result_ttl_s: int = Field(default=7 * 24 * 3600, gt=0, description="How long results stay in Redis.")
    visibility_timeout_s: int = Field(
        default=3600,
        gt=0,
        description="Redis-broker redelivery delay for unacknowledged tasks; at least twice the longest chunk.",
    )
    resend_stale_after_s: float | None = Field(
        default=None,
        gt=0,
        description="Re-send a batch request dispatched this long ago and still unanswered (default: 1.5 x "
        "the visibility timeout, after which Celery itself would have redelivered it).",
    )
    heartbeat_ttl_s: int = Field(default=15, gt=1, description="Seconds a worker heartbeat lives.")
    detect_interval_s: float = Field(
        default=600.0, ge=0,
        description="A worker detects its model's real capabilities (its provider's models API, its engine, its "
        "files) at start and again this often; 0: never (the registry's values stand).",
    )  # fmt: skip
    scheduler_lease_s: float = Field(
        default=6.0, ge=1.0,
        description="Life of the leading scheduler's lease (renewed every third of it): another scheduler takes "
        "over at most this long plus a third after the leader dies.",
    )  # fmt: skip
    log_level: str = Field(default="INFO")
    task_events: bool = Field(
        default=False,
        description="Workers send Celery task events from the start (Flower turns them on anyway while it runs).",
    )
    tenant: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$",
        description="Whom this client's usage is counted for (else 'default', or the request's `user` where "
        "INFERPOOL_USER_TENANTS allows it).",
    )
    user_tenants: str = Field(
        default="",
        description="Whether a request's `user` field names its tenant when the client names none: '' (never, "
        "the default: any line could bill another tenant), '*' (any usable name), or a comma-separated allow-list.",
    )
    metrics_max_tenants: int = Field(
        default=50, gt=0, description="Tenants exported as Prometheus labels; the rest are summed under 'other'."
    )
    batch_max_lines: int = Field(default=1_000_000, gt=0, description="Most lines one batch job may have.")
    batch_max_bytes: int = Field(default=2 * 1024**3, gt=0, description="Largest batch input file, in bytes.")
    batch_max_line_bytes: int = Field(default=1_000_000, gt=0, description="Largest single batch line.")
    cache_redis_url: str | None = Field(
        default=None,
        description="A separate Redis for the response cache (default: the pool's); give it its own maxmemory.",
    )
    cache_max_entries: int = Field(
        default=200_000, gt=0, description="Most answers the response cache keeps; the oldest go first."
    )
    cache_max_entry_bytes: int = Field(
        default=64 * 1024, gt=0, description="Answers larger than this (as stored JSON) are not cached."
    )
    cache_wait_s: float = Field(
        default=120.0, gt=0, description="How long a request waits for an identical one in flight to finish."
    )
    gateway_request_timeout_s: float = Field(
        default=600.0, gt=0,
        description="Longest a gateway chat request waits for its answer (then 504, and the request is stopped).",
    )  # fmt: skip
    gateway_max_in_flight: int = Field(
        default=2048, gt=0,
        description="Chat requests one gateway process holds open at once; more are answered 429 with Retry-After.",
    )  # fmt: skip
    gateway_max_in_flight_per_tenant: int = Field(
        default=256, gt=0,
        description="Chat requests one tenant may hold open on one gateway process; more are answered 429.",
    )  # fmt: skip
    gateway_idle_redis_close_s: float = Field(
        default=30.0, gt=0,
        description="How often a gateway closes the Redis connections its pool holds idle: a burst (hundreds of "
        "clients hanging up at once) opens that many, and the pool would keep them open for ever.",
    )  # fmt: skip
    files_ttl_s: int = Field(
        default=30 * 86400, gt=0,
        description="How long an uploaded file is kept (then deleted, bytes and metadata); a batch reads its input "
        "when it is created, so this only bounds how long a file may wait for its batch.",
    )  # fmt: skip
    files_max_bytes_per_tenant: int = Field(
        default=20 * 1024**3, gt=0, description="Most bytes of uploaded files one tenant may keep at once."
    )
    files_max_per_tenant: int = Field(default=1000, gt=0, description="Most uploaded files one tenant may keep.")
    provider_batch_poll_s: float = Field(
        default=30.0, gt=0, description="First wait before a provider batch's status is polled (then doubling)."
    )
    provider_batch_poll_max_s: float = Field(
        default=600.0, gt=0, description="Longest wait between two polls of a provider batch."
    )
    provider_batch_expiry_grace_s: float = Field(
        default=900.0, ge=0,
        description="After a job's completion window ends, how long its provider batches may take to be collected "
        "and cancelled (answers the provider finished are kept) before their remaining lines expire.",
    )  # fmt: skip
    provider_batch_step_timeout_s: float = Field(
        default=600.0, gt=0,
        description="How long a provider-batch step's lock lives unrenewed: the worker running a step (upload, "
        "create, collect) renews it every third of this, so only a step whose worker died (or stalled this long) "
        "is run again by another worker.",
    )  # fmt: skip

    tracing: TracingSettings = Field(
        default_factory=TracingSettings, exclude=True,
        description="OpenTelemetry tracing, from the standard OTEL_* variables (inferpool.tracing).",
    )  # fmt: skip

    flower_auth: str = Field(
        default="", repr=False,
        description="Flower's `user:password` (INFERPOOL_FLOWER_AUTH); `inferpool flower` will not start without it.",
    )  # fmt: skip
    fault_provider_batch: str = Field(
        default="",
        description="Tests only: `after-upload` or `after-create` ends a worker right after that provider call.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        directory = secrets_dir()  # only where it exists: pydantic-settings warns about a missing one
        secrets = (_SecretFiles(settings_cls, secrets_dir=directory),) if directory is not None else ()
        return (init_settings, env_settings, *secrets)

    @field_validator("redis_url")
    @classmethod
    def _password_from_its_own_setting(cls, value: str | None, info: ValidationInfo) -> str | None:
        password = info.data.get("redis_password") or ""
        return _with_password(value, password) if value and password else value

    @field_validator("registry", "models_dir", mode="before")
    @classmethod
    def _split_registry(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(p) for p in value.split(":") if p]
        return value

    @staticmethod
    def environment_secret(variable: str) -> str:
        """The value of the environment variable ``variable`` (a provider's API key, named by the registry), else
        of the secret file of that name (see the module docstring); read when asked and never kept in a settings
        object, so it cannot end up in a log or a repr."""
        import os

        value = os.environ.get(variable, "")
        directory = secrets_dir()
        if not value and directory is not None and "/" not in variable and variable not in ("", ".", ".."):
            path = directory / variable
            if path.is_file():
                try:
                    value = path.read_bytes().decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise _unreadable_secret(path, exc) from exc
        return value

    def user_registry_file(self) -> Path:
        """``$XDG_CONFIG_HOME/inferpool/registry.yaml`` (default ``~/.config/...``): merged when it exists."""
        import os

        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "inferpool" / "registry.yaml"

    def user_may_be_tenant(self, user: str) -> bool:
        """Whether the ``user`` of a request may name its tenant (see ``user_tenants``)."""
        policy = self.user_tenants.strip()
        if policy == "*":
            return True
        return user in {name.strip() for name in policy.split(",") if name.strip()}

    def gone_worker_grace_s(self) -> float:
        """How long a gone worker stays listed in its model's heartbeats: while kombu may still restore its
        unacknowledged messages to its own queues, for the live peers to hand them over."""
        return float(self.visibility_timeout_s + self.heartbeat_ttl_s)

    def stale_after_s(self) -> float:
        return self.resend_stale_after_s or 1.5 * self.visibility_timeout_s

    def with_redis_url(self, redis_url: str) -> Settings:
        """A copy of these settings pointing at another Redis."""
        return self.model_copy(update={"redis_url": redis_url})

    def require_redis_url(self) -> str:
        """The Redis URL, or a clear error saying how to set one."""
        from inferpool._exceptions import ConfigurationError

        if not self.redis_url:
            raise ConfigurationError(
                "No Redis configured: set REDIS_URL (for example redis://localhost:6379/0), "
                "or use `inferpool batch run --local` to start a local pool."
            )
        return self.redis_url


class ApiKeySource(Protocol):
    """Where a model's registry params say its API key is (``ApiParams``, a detector's target)."""

    no_api_key: bool
    api_key_file: Path | None
    api_key_env: str | None


def read_api_key(params: ApiKeySource, default_env: str) -> str:
    """The key from the secrets file or the environment; never logged, never sent anywhere but the provider."""
    if params.no_api_key:
        return "not-needed"
    if params.api_key_file is not None:
        try:
            key = params.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ModelLoadError(f"cannot read the API key file {params.api_key_file}: {exc.strerror}") from exc
        if not key:
            raise ModelLoadError(f"the API key file {params.api_key_file} is empty")
        return key
    variable = params.api_key_env or default_env
    key = Settings.environment_secret(variable).strip()
    if not key:
        raise ModelLoadError(
            f"no API key: set {variable} (or api_key_env / api_key_file in the model's registry params)"
        )
    return key
