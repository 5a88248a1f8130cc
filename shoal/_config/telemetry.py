"""The observability options: Ray's ``logging_config`` and shoal's tracing options."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shoal._config.strict import _Strict

#: Log levels ``logging_config.log_level`` accepts, by name (a number is one of their values).
LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
# What every logging.LogRecord has: the only names additional_log_standard_attrs may list.
_LOG_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"asctime", "message"}


class LoggingConfig(_Strict):
    """Ray Serve's ``logging_config`` (``ray.serve.schema.LoggingConfig``): how a
    deployment's replicas, or the proxy and controller, log (see docs/logging.md)."""

    encoding: Literal["TEXT", "JSON"] = Field(
        "TEXT", description="TEXT: one formatted line per record; JSON: one JSON object per line."
    )
    log_level: str | int = Field(
        "INFO", description="Lowest level logged (DEBUG, INFO, WARNING, ERROR, CRITICAL)."
    )
    logs_dir: str | None = Field(
        None, min_length=1, description="Directory of the log files (null: the instance's)."
    )
    enable_access_log: bool = Field(True, description="Log one line per request served.")
    additional_log_standard_attrs: list[str] = Field(
        default_factory=list, description="LogRecord attributes added to each line (e.g. name)."
    )

    @field_validator("encoding", mode="before")
    @classmethod
    def _encoding(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str | int) -> str:
        # Kept as the level's name, so a config written back reads as Ray's.
        if isinstance(value, int):
            for name, number in LOG_LEVELS.items():
                if number == value:
                    return name
        elif value.upper() in LOG_LEVELS:
            return value.upper()
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (or their numbers 10..50)")

    @field_validator("additional_log_standard_attrs")
    @classmethod
    def _attributes(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in _LOG_RECORD_ATTRS]
        if unknown:
            raise ValueError(
                f"{unknown} are not LogRecord attributes: use some of {sorted(_LOG_RECORD_ATTRS)}"
            )
        return value

    @property
    def level(self) -> int:
        """``log_level`` as a number (``logging.INFO``...)."""
        return LOG_LEVELS[str(self.log_level)]


class TracingOptions(_Strict):
    """OpenTelemetry tracing (off by default; docs/tracing.md).

    Either shoal exports the spans (``exporter``: "otlp", "console" or "file", with
    ``sampling_ratio``), or ``setup_hook`` installs the user's own TracerProvider in
    every shoal process: not both. An option that does not apply to the choice made
    (``path`` without the file exporter, ``endpoint`` without OTLP...) is refused, as
    is any option while ``enabled`` is false.
    """

    enabled: bool = Field(False, description="Trace requests (needs pip install 'shoal[tracing]').")
    sampling_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces recorded (parent-based: a sampled incoming "
        "traceparent is always honoured).",
    )
    exporter: Literal["otlp", "console", "file"] = Field(
        "otlp", description="Where spans go: an OTLP collector, stdout, or a JSON-lines file."
    )
    endpoint: str | None = Field(
        None,
        min_length=1,
        description="OTLP collector (null: the OTel default, localhost:4317 for grpc, "
        "http://localhost:4318/v1/traces for http/protobuf, or OTEL_EXPORTER_OTLP_* "
        "variables).",
    )
    protocol: Literal["grpc", "http/protobuf"] = Field("grpc", description="OTLP transport.")
    path: str | None = Field(
        None,
        min_length=1,
        description="The file exporter's JSON-lines file (every process appends).",
    )
    setup_hook: str | None = Field(
        None,
        min_length=1,
        description="Import path 'module:function' called with no arguments once in every "
        "shoal process to install your own TracerProvider (instead of an exporter).",
    )

    @field_validator("setup_hook")
    @classmethod
    def _hook_path(cls, value: str | None) -> str | None:
        if value is not None:
            module, _, function = value.partition(":")
            parts = [*module.split("."), *function.split(".")]
            if not module or not function or not all(part.isidentifier() for part in parts):
                raise ValueError(
                    "must be an import path 'module:function' (e.g. 'my_app.tracing:setup')"
                )
        return value

    @model_validator(mode="after")
    def _coherent(self) -> TracingOptions:
        # Options away from their defaults (not ``model_fields_set``: the options travel to
        # every worker as a full dict, where every field counts as set).
        given = {
            name
            for name, info in type(self).model_fields.items()
            if name != "enabled" and getattr(self, name) != info.default
        }
        if not self.enabled:
            if given:
                raise ValueError(
                    f"{sorted(given)} set while tracing is off: add enabled: true (or remove them)"
                )
            return self
        if self.setup_hook is not None:
            clash = given & {"sampling_ratio", "exporter", "endpoint", "protocol", "path"}
            if clash:
                raise ValueError(
                    f"setup_hook={self.setup_hook!r} installs your own TracerProvider: "
                    f"{sorted(clash)} do not apply to it (configure sampling and export in "
                    "the provider the hook installs), remove them"
                )
            return self
        unfit = {
            "otlp": given & {"path"},
            "console": given & {"endpoint", "protocol", "path"},
            "file": given & {"endpoint", "protocol"},
        }[self.exporter]
        if unfit:
            raise ValueError(f"{sorted(unfit)} do not apply to exporter={self.exporter!r}")
        if self.exporter == "file" and self.path is None:
            raise ValueError("exporter='file' needs a path: the JSON-lines file to append to")
        return self
