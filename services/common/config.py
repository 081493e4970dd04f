"""Configuration: one YAML file for the whole installation, one section per service, env overrides.

The file looks like::

    state_dir: /var/lib/microvm
    etcd_endpoints: ["127.0.0.1:2379"]
    gateway:
      listen: 127.0.0.1:50051

Every key is checked against the dataclass that declares it, so a typo fails at start with the
offending key named instead of being silently ignored. Environment variables override the file:
`MVM_STATE_DIR`, `MVM_ETCD_ENDPOINTS` (comma-separated) and `MVM_<SERVICE>_<KEY>` such as
`MVM_GATEWAY_LISTEN`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

NODE_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


@dataclasses.dataclass
class ServiceSettings:
    """Settings every service has; services extend this class with their own fields."""

    # host:port to listen on; port 0 picks a free port (registered in etcd for discovery).
    listen: str = "127.0.0.1:0"
    # Address registered for others to call (host or host:port; the port defaults to the bound one). Needed
    # when listening on 0.0.0.0 behind a name or address the host does not know itself by (a pod IP).
    advertise_address: str = ""
    # Seconds to let in-flight calls finish on SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = 10.0

    def validate(self) -> None:
        parse_address(self.listen, key="listen")
        if self.advertise_address and ":" in self.advertise_address:
            parse_address(self.advertise_address, key="advertise_address")
        if not 0 <= self.shutdown_grace_seconds <= 600:
            raise ConfigError("shutdown_grace_seconds must be between 0 and 600")


TRACE_EXPORTERS = ("none", "console", "otlp", "off")


@dataclasses.dataclass
class CommonSettings:
    """Settings shared by the whole installation."""

    state_dir: str = str(Path.home() / ".microvm")
    etcd_endpoints: list[str] = dataclasses.field(default_factory=lambda: ["127.0.0.1:2379"])
    # Seconds an instance's registration outlives its last keep-alive.
    lease_ttl_seconds: int = 3
    log_level: str = "info"
    # `none`, `console`, `otlp` or `off`: where OpenTelemetry spans go. `none` records spans but exports none (trace
    # ids are logged); `otlp` sends them over OTLP/gRPC to otlp_endpoint (an OpenTelemetry Collector, Jaeger,
    # Tempo...). `off` installs no tracer provider at all: spans are no-ops, nothing is recorded, log lines carry no
    # trace ids of this process's own (a caller's incoming trace context is still passed on).
    trace_exporter: str = "none"
    otlp_endpoint: str = "127.0.0.1:4317"
    # Mutual TLS between services with the installation's CA (<state_dir>/pki unless pki_dir is set).
    internal_tls: bool = True
    pki_dir: str = ""
    # etcd is reached over TLS, each service presenting its certificate of the same CA (etcd runs with client
    # certificate auth): nobody without one reads or writes the cluster's records.
    etcd_tls: bool = True
    # This host's name in the cluster (compute and network of one host share it); default: the host name.
    node_id: str = ""
    # Sandboxes get a NIC on the node's bridge, egress policy and exposed ports (needs CAP_NET_ADMIN).
    networking: bool = True
    # This node's labels, `key=value` each, matched by a sandbox's node selector (e.g. `zone=a`, `disk=ssd`).
    node_labels: list[str] = dataclasses.field(default_factory=list)
    # Each service's Prometheus endpoint (`GET /metrics`), host:port; port 0 picks a free one (the address is in the
    # service's registration, where Prometheus discovers it). Empty: no endpoint.
    metrics_listen: str = "127.0.0.1:0"

    @property
    def node(self) -> str:
        return self.node_id or socket.gethostname()

    @property
    def pki_path(self) -> Path:
        return Path(self.pki_dir) if self.pki_dir else Path(self.state_dir) / "pki"

    def validate(self) -> None:
        if not self.etcd_endpoints:
            raise ConfigError("etcd_endpoints must name at least one endpoint")
        for endpoint in self.etcd_endpoints:
            parse_address(endpoint, key="etcd_endpoints", allow_zero=False)
        if not 1 <= self.lease_ttl_seconds <= 300:
            raise ConfigError("lease_ttl_seconds must be between 1 and 300")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be one of debug, info, warning, error")
        if self.trace_exporter not in TRACE_EXPORTERS:
            raise ConfigError("trace_exporter must be `none`, `console`, `otlp` or `off`")
        if self.trace_exporter == "otlp":
            parse_address(self.otlp_endpoint, key="otlp_endpoint", allow_zero=False)
        if self.node_id and not NODE_ID.fullmatch(self.node_id):
            raise ConfigError(f"node_id {self.node_id!r} must match {NODE_ID.pattern}")
        if self.metrics_listen:
            parse_address(self.metrics_listen, key="metrics_listen")
        for label in self.node_labels:
            key, sep, value = label.partition("=")
            if not sep or not LABEL_KEY.fullmatch(key) or len(value) > 63:
                raise ConfigError(
                    f"node_labels: {label!r} is not key=value (key {LABEL_KEY.pattern}, value up to 63 characters)"
                )


def parse_address(value: str, *, key: str, allow_zero: bool = True) -> tuple[str, int]:
    """Splits `host:port`, raising ConfigError naming `key` when it is not a usable address."""
    host, sep, port_text = str(value).rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: {value!r} is not host:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{key}: port {port_text!r} is not a number") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ConfigError(f"{key}: port {port} is outside 0..65535")
    return host.strip("[]"), port


T = typing.TypeVar("T")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, item_type, key) for item in value]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, key)
    return value


def build_dataclass(cls: type[T], values: Mapping[str, Any] | None, prefix: str) -> T:
    """Builds `cls` from a mapping, refusing unknown keys and values of the wrong type."""
    values = values or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''}{where}: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(fields))}"
        )
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in values.items()
    }
    return cls(**kwargs)


@dataclasses.dataclass
class LoadedConfig(typing.Generic[T]):
    common: CommonSettings
    service: T


def _validate_section(settings: Any, section: str) -> None:
    try:
        settings.validate()
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(f"{section}.") else f"{section}.{message}") from None


def load_config(
    path: str | None, section: str, settings_cls: type[T], environ: Mapping[str, str] | None = None
) -> LoadedConfig[T]:
    """Reads the file (absent path: defaults), applies env overrides and validates everything.

    Every other section is validated against its own schema too, so one bad file fails every
    service (and the supervisor, before it starts anything) the same way.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
    from services.common.settings import SECTIONS

    common_fields = {f.name for f in dataclasses.fields(CommonSettings)}
    known_sections = set(SECTIONS)
    unknown = sorted(k for k in raw if k not in common_fields and k not in known_sections)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(common_fields | known_sections))}"
        )
    common_values = {k: v for k, v in raw.items() if k in common_fields}
    for name in common_fields:
        env_value = environ.get(f"MVM_{name.upper()}")
        if env_value is not None:
            common_values[name] = env_value
    common = build_dataclass(CommonSettings, common_values, "")
    common.validate()

    service_values = dict(raw.get(section) or {})
    prefix = f"MVM_{section.upper()}_"
    for name in (f.name for f in dataclasses.fields(settings_cls)):  # type: ignore[arg-type]
        env_value = environ.get(prefix + name.upper())
        if env_value is not None:
            service_values[name] = env_value
    service = build_dataclass(settings_cls, service_values, section)
    _validate_section(service, section)
    for other, other_cls in SECTIONS.items():
        if other != section and other in raw:
            _validate_section(build_dataclass(other_cls, raw[other], other), other)
    return LoadedConfig(common=common, service=service)
