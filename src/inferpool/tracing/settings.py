"""Tracing's settings: OpenTelemetry's own environment variables, read here (the one reader of the environment)
and handed to the SDK explicitly."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The OTLP/HTTP path of traces under ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the specification's rule).
TRACES_PATH = "/v1/traces"


def _aliases(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class TracingSettings(BaseSettings):
    """OpenTelemetry tracing, opt-in with the standard ``OTEL_*`` variables (nothing is exported unless an OTLP
    endpoint or ``OTEL_TRACES_EXPORTER`` is set; ``OTEL_SDK_DISABLED=true`` turns everything off)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True, populate_by_name=True)

    sdk_disabled: bool = Field(default=False, validation_alias=_aliases("OTEL_SDK_DISABLED"))
    exporter: str = Field(
        default="", validation_alias=_aliases("OTEL_TRACES_EXPORTER"),
        description="`otlp`, `console` or `none`; unset: `otlp` when an endpoint is set, else off.",
    )  # fmt: skip
    endpoint: str = Field(
        default="", validation_alias=_aliases("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        description="The full URL spans are posted to.",
    )  # fmt: skip
    base_endpoint: str = Field(
        default="", validation_alias=_aliases("OTEL_EXPORTER_OTLP_ENDPOINT"),
        description="The collector's base URL; spans go to its /v1/traces.",
    )  # fmt: skip
    headers: str = Field(
        default="", repr=False, exclude=True,
        validation_alias=_aliases("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
        description="`key=value,...` sent with every export (a collector's credentials: never logged).",
    )  # fmt: skip
    protocol: Literal["http/protobuf", "http/json", "grpc"] = Field(
        default="http/protobuf",
        validation_alias=_aliases("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    )
    timeout_ms: int = Field(
        default=10_000, gt=0,
        validation_alias=_aliases("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"),
    )  # fmt: skip
    service_name: str = Field(default="", validation_alias=_aliases("OTEL_SERVICE_NAME"))
    resource_attributes: str = Field(default="", validation_alias=_aliases("OTEL_RESOURCE_ATTRIBUTES"))
    sampler: str = Field(default="parentbased_always_on", validation_alias=_aliases("OTEL_TRACES_SAMPLER"))
    sampler_arg: str = Field(default="", validation_alias=_aliases("OTEL_TRACES_SAMPLER_ARG"))
    schedule_delay_ms: int = Field(default=5000, gt=0, validation_alias=_aliases("OTEL_BSP_SCHEDULE_DELAY"))
    capture_content: bool = Field(
        default=False, validation_alias=_aliases("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"),
        description="Put prompts and answers in spans (gen_ai.input.messages, gen_ai.output.messages); off by "
        "default: traces then hold no text of anybody's.",
    )  # fmt: skip

    @field_validator("exporter", "sampler", mode="after")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @property
    def traces_endpoint(self) -> str:
        if self.endpoint:
            return self.endpoint
        if self.base_endpoint:
            return self.base_endpoint.rstrip("/") + TRACES_PATH
        return ""

    @property
    def enabled(self) -> bool:
        """Whether this process exports spans."""
        if self.sdk_disabled or self.exporter == "none":
            return False
        return bool(self.exporter) or bool(self.traces_endpoint)

    def parsed_headers(self) -> dict[str, str]:
        """``OTEL_EXPORTER_OTLP_HEADERS`` as a dict (values URL-decoded, as the specification says)."""
        from urllib.parse import unquote

        pairs = (part.split("=", 1) for part in self.headers.split(",") if "=" in part)
        return {unquote(key).strip(): unquote(value).strip() for key, value in pairs if key.strip()}

    def parsed_resource_attributes(self) -> dict[str, str]:
        from urllib.parse import unquote

        pairs = (part.split("=", 1) for part in self.resource_attributes.split(",") if "=" in part)
        return {unquote(key).strip(): unquote(value).strip() for key, value in pairs if key.strip()}
