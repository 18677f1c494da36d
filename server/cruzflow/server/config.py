"""The service's config file (the role ``wrangler.toml`` plays in the seed).

Read with ``tomllib``, checked with pydantic: an unknown key or a bad value
stops the server with the file, the key and the reason.
"""

from __future__ import annotations

import importlib
import inspect
import ipaddress
import json
import os
import re
import ssl
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cruzflow.sdk.api import WorkflowEntrypoint
from cruzflow.sdk.durations import to_seconds
from cruzflow.server.auth import TokenRule, digest
from cruzflow.server.bindings import TlsFiles, WorkflowTarget
from cruzflow.server.engine import validate
from cruzflow.server.engine.errors import InvalidArgument
from cruzflow.server.engine.runtime import Limits, WorkflowSpec
from cruzflow.server.engine.schedules import Cron, ScheduleSpec, check_schedule_id
from cruzflow.server.records import CatchUp, Gate
from cruzflow.server.store.base import Store
from cruzflow.server.telemetry import Settings as TelemetrySettings


class ConfigError(Exception):
    """The config file cannot be used; the message names file, key and reason."""


def _address(value: str, example: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port, e.g. '{example}'")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Strict):
    listen: str = "127.0.0.1:50051"
    """host:port to serve gRPC on; port 0 picks a free port."""
    grace_period: str | int = "10 seconds"
    """How long in-flight attempts may finish on SIGTERM before they are cut."""
    uvloop: bool = True
    """Run on uvloop when it is installed."""
    tls_cert_file: str | None = None
    """PEM certificate chain the server presents (with tls_key_file): serve TLS."""
    tls_key_file: str | None = None
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: str | None = None
    """PEM CA certificates: clients must present a certificate signed by one (mTLS)."""
    allow_plaintext: bool = False
    """Serve without TLS on an address other than loopback (a warning is logged)."""
    allow_unauthenticated: bool = False
    """Serve without [[auth.tokens]] on an address other than loopback (a warning is logged)."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _address(value, "127.0.0.1:50051")

    @field_validator("grace_period")
    @classmethod
    def _grace(cls, value: str | int) -> str | int:
        to_seconds(value, "grace_period")
        return value


class HttpSection(_Strict):
    listen: str | None = None
    """host:port to serve HTTP on (Connect JSON/protobuf, gRPC-Web, the
    /workflows/ routes); unset: no HTTP listener. Uses [server]'s TLS files,
    tokens and limits."""
    cors_origins: list[str] = []
    """Origins whose browser pages may call the HTTP API (e.g.
    "https://app.example.com", or "*"); empty: no CORS headers."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        return None if value is None else _address(value, "127.0.0.1:8080")

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(
                    f"{origin!r} is not an origin: expected scheme://host[:port] with no "
                    f"path, e.g. 'https://app.example.com', or '*' for any"
                )
        return value


class ConsoleSection(_Strict):
    enabled: bool = True
    """Serve the web console at / of the HTTP listener ([http] listen): static
    files that call the same API as every client, with the caller's token."""
    trace_url: str = ""
    """A link to an instance's trace, with ``{trace_id}`` where its id goes,
    e.g. "http://127.0.0.1:16686/trace/{trace_id}" (Jaeger); empty: no link."""

    @field_validator("trace_url")
    @classmethod
    def _trace_url(cls, value: str) -> str:
        if value and (not re.fullmatch(r"https?://\S+", value) or "{trace_id}" not in value):
            raise ValueError(
                f"{value!r} is not a trace link template: expected an http(s) URL with "
                f"{{trace_id}} where the trace id goes, e.g. "
                f"'http://127.0.0.1:16686/trace/{{trace_id}}'"
            )
        return value


STORE_URL_ENV = "CRUZFLOW_STORE_URL"
"""The environment variable that names a PostgreSQL store; it wins over the file."""
_DEFAULT_STORE_PATH = "data/cruzflow.db"


def _check_store_url(url: str) -> None:
    """Raise ValueError unless ``url`` is a PostgreSQL URL. The message never
    shows the value: it may hold a password."""
    example = "'postgresql://user:password@host:5432/database'"
    scheme, sep, _ = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,19}", scheme):
        raise ValueError(f"expected a PostgreSQL URL such as {example}; this is not a URL")
    if scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError(
            f"expected a PostgreSQL URL such as {example}; this one's scheme is not "
            f"postgresql:// but {scheme}://"
        )


class StoreSection(_Strict):
    path: str | None = None
    """SQLite file, relative to the config file's folder: the embedded store of
    one server (the default, data/cruzflow.db)."""
    url: str | None = Field(None, repr=False)
    """PostgreSQL URL (postgresql://user:password@host:5432/database) instead of
    path: a store several servers share. CRUZFLOW_STORE_URL wins over it."""
    synchronous: str = Field("FULL", pattern="^(FULL|EXTRA)$")
    """SQLite synchronous mode; FULL or EXTRA keep every commit durable."""
    lease_period: str | int = "5 seconds"
    """PostgreSQL: how long a server's lease on its instances lives without
    renewal; a server that stops renewing has them taken over after it."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.data.get("path") is not None:
            raise ValueError(
                "give either path (a SQLite file) or url (a PostgreSQL database), not both"
            )
        _check_store_url(value)
        return value

    @field_validator("lease_period")
    @classmethod
    def _lease(cls, value: str | int) -> str | int:
        if to_seconds(value) <= 0:
            raise ValueError("must be more than 0, e.g. '5 seconds'")
        return value

    @model_validator(mode="after")
    def _environment(self) -> StoreSection:
        url = os.environ.get(STORE_URL_ENV)
        if url:
            try:
                _check_store_url(url)
            except ValueError as exc:
                raise ValueError(f"the environment variable {STORE_URL_ENV}: {exc}") from None
        elif self.url is not None and "synchronous" in self.model_fields_set:
            raise ValueError("synchronous is for a SQLite store (path), not with url")
        return self


class LimitsSection(_Strict):
    max_instance_id_length: int = Field(100, ge=1, le=1000)
    max_step_name_length: int = Field(256, ge=1, le=10_000)
    max_payload_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_steps_per_instance: int = Field(10_000, ge=1)
    max_running_instances: int = Field(10_000, ge=1)
    max_lookup_key_length: int = Field(256, ge=1, le=10_000)
    max_event_type_length: int = Field(100, ge=1, le=10_000)
    max_sleep: str | int = "365 days"
    max_batch_size: int = Field(100, ge=1, le=1000)
    retention: str | int = "30 days"
    purge_interval: str | int = "1 minute"
    purge_chunk: int = Field(500, ge=1, le=100_000)
    # Below Python's recursion limit with room to spare: params deeper than
    # this are refused before the JSON parser sees them.
    max_json_depth: int = Field(64, ge=1, le=500)
    max_watchers: int = Field(10_000, ge=1, le=1_000_000)
    max_concurrent_rpcs: int = Field(20_000, ge=1, le=1_000_000)
    schedule_grace: str | int = "1 minute"

    @field_validator("max_sleep", "retention", "schedule_grace")
    @classmethod
    def _duration(cls, value: str | int) -> str | int:
        to_seconds(value)
        return value

    @field_validator("purge_interval")
    @classmethod
    def _interval(cls, value: str | int) -> str | int:
        if to_seconds(value) <= 0:
            raise ValueError("must be more than 0, e.g. '1 minute'")
        return value


class TelemetrySection(_Strict):
    """OpenTelemetry. The standard OTEL_* environment variables win over these."""

    traces: Literal["none", "otlp", "console"] | None = None
    """Span exporter (OTEL_TRACES_EXPORTER); default none."""
    metrics: Literal["none", "otlp", "console", "prometheus"] | None = None
    """Metric exporter (OTEL_METRICS_EXPORTER); default none."""
    otlp_endpoint: str | None = Field(None, pattern=r"^https?://[^\s/]+(:\d+)?/?$")
    """OTLP/gRPC receiver, e.g. http://127.0.0.1:4317 (OTEL_EXPORTER_OTLP_ENDPOINT)."""
    service_name: str | None = None
    """service.name (OTEL_SERVICE_NAME); default the config's name."""
    metric_interval: str | int = "60 seconds"
    """How often metrics are pushed (OTEL_METRIC_EXPORT_INTERVAL)."""
    prometheus_listen: str = "127.0.0.1:9464"
    """host:port of the Prometheus scrape endpoint, with metrics = "prometheus"."""
    new_trace_after: str | int | None = None
    """Runs resumed this long after the instance's creation start a new trace
    linked to the creator's; by default every run joins the creator's trace."""
    log_format: Literal["text", "json"] = "text"
    """Server log lines: text, or one JSON object a line."""
    rpc_spans: Literal["all", "writes", "none"] = "none"
    """Server spans for every RPC, only for the writes (creates, controls,
    events), or none, the default (the caller's trace context still reaches
    the runs, and the waits that take its events): the standard gRPC
    instrumentation that makes them costs throughput (README, Performance)."""
    logs: Literal["none", "otlp", "console"] | None = None
    """Log record exporter (OTEL_LOGS_EXPORTER); default none: stderr only."""

    @field_validator("metric_interval", "new_trace_after")
    @classmethod
    def _positive(cls, value: str | int | None) -> str | int | None:
        if value is not None and to_seconds(value) <= 0:
            raise ValueError("must be more than 0, e.g. '30 seconds'")
        return value

    @field_validator("prometheus_listen")
    @classmethod
    def _prometheus(cls, value: str) -> str:
        return _address(value, "127.0.0.1:9464")


class RateLimitSection(_Strict):
    starts: int = Field(ge=1, le=1_000_000)
    """Instances that may start per ``per``, per concurrency key."""
    per: str | int
    """The window, e.g. "1 minute" (or ms)."""

    @field_validator("per")
    @classmethod
    def _window(cls, value: str | int) -> str | int:
        if to_seconds(value) * 1000 < 1:
            raise ValueError("must be at least 1 ms, e.g. '1 minute'")
        return value


class WorkflowSection(_Strict):
    binding: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name under which the workflow appears in ``env``, e.g. ONBOARDING_WORKFLOW."""
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
    """Name clients create instances by, e.g. onboarding-workflow."""
    class_name: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """The class as 'package.module:Class': the workflow is hosted here."""
    address: str | None = None
    """host:port of another cruzflow server hosting the workflow (instead of class_name)."""
    token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable holding the bearer token for ``address``."""
    tls_ca_file: str | None = None
    """PEM root certificates to check ``address``'s certificate by (relative path)."""
    tls_cert_file: str | None = None
    """PEM client certificate chain, with tls_key_file (relative path)."""
    tls_key_file: str | None = None
    """PEM private key of tls_cert_file (relative path)."""
    timeout: str | int | None = None
    """Default deadline of each call through the binding (default 10 seconds)."""
    concurrency: int | None = Field(None, ge=1, le=1_000_000)
    """At most this many instances hold a slot at once (per concurrency key);
    the rest wait ``queued``, higher priority first, then oldest first."""
    concurrency_key: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,100}(\.[A-Za-z0-9_-]{1,100}){0,15}$"
    )
    """Where the key is in the params, e.g. "user_id" or "user.id": the limits
    hold per value of it. Unset: one limit for the whole workflow."""
    rate_limit: RateLimitSection | None = None
    """At most ``starts`` instances start per ``per`` (per concurrency key)."""

    @field_validator("address")
    @classmethod
    def _remote(cls, value: str | None) -> str | None:
        return None if value is None else _address(value, "billing.internal:50051")

    @field_validator("timeout")
    @classmethod
    def _call_timeout(cls, value: str | int | None) -> str | int | None:
        if value is not None and to_seconds(value) <= 0:
            raise ValueError("must be more than 0, e.g. '30 seconds'")
        return value


class TokenSection(_Strict):
    """One accepted bearer token. There is deliberately no key for the token
    itself: a secret in the config file would end up in version control."""

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")
    """What logs and spans call the token, e.g. ci-deployer."""
    env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The environment variable holding the token."""
    file: str | None = None
    """A file holding the token (surrounding whitespace is ignored), relative path."""
    access: Literal["read", "write"]
    """read: GetStatus, WatchInstance(s), WaitInstance, ListInstances, ListWorkflows only;
    write: every method. Required, so that each token's power is stated."""
    workflows: list[str] | None = Field(None, min_length=1)
    """Only the instances of these workflows (hosted here); default all."""


class AuthSection(_Strict):
    open_reflection: bool = True
    """Serve gRPC reflection without a token (the health service always is)."""
    tokens: list[TokenSection] = []
    """The accepted tokens; none means no authentication."""


class ScheduleSection(_Strict):
    """A cron schedule: an instance of ``workflow`` at each due time."""

    id: str
    """The schedule's id, e.g. weekly-report (its instances are sched-<id>-<time>)."""
    workflow: str
    """A workflow hosted here (a [[workflows]] name with class_name)."""
    cron: str
    """Five fields, or six with seconds first, e.g. "0 9 * * MON"."""
    timezone: str = "UTC"
    """The IANA time zone the cron expression is read in, e.g. Europe/Paris."""
    params: Any = None
    """The params of every instance it creates (any TOML value, as JSON)."""
    catch_up: Literal["skip", "once"] = "once"
    """What happens to due times missed while no server ran: skip them, or
    fire the most recent once."""


class SqliteDatabaseSection(_Strict):
    binding: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name in ``env``, e.g. DB."""
    path: str
    """SQLite file, relative to the config file's folder."""


class ConfigFile(_Strict):
    name: str = "cruzflow"
    """The service's name (logs, health)."""
    python_path: list[str] = ["."]
    """Folders, relative to the config file, to import workflow modules from."""
    server: ServerSection = ServerSection()
    http: HttpSection = HttpSection()
    console: ConsoleSection = ConsoleSection()
    # Validated also when absent: CRUZFLOW_STORE_URL is checked with the section.
    store: StoreSection = Field(default_factory=dict, validate_default=True)
    limits: LimitsSection = LimitsSection()
    telemetry: TelemetrySection = TelemetrySection()
    auth: AuthSection = AuthSection()
    workflows: list[WorkflowSection] = []
    schedules: list[ScheduleSection] = []
    sqlite_databases: list[SqliteDatabaseSection] = []
    vars: dict[str, str | int | float | bool] = {}


class Config:
    """A loaded config: the file's values with paths resolved and classes imported."""

    def __init__(
        self,
        path: Path,
        data: ConfigFile,
        specs: dict[str, WorkflowSpec],
        targets: list[WorkflowTarget] | None = None,
    ) -> None:
        self.path = path
        self.file = data
        self.base = path.parent
        self.workflows = specs
        """The workflows hosted here (a remote [[workflows]] entry is only bound)."""
        self.workflow_bindings = targets or []
        """Every [[workflows]] entry, hosted here or remote, as ``self.env`` binds it."""
        self.server_tls: ServerTls | None = None
        """The [server] tls_* files' contents; None: plaintext."""
        self.tokens: list[TokenRule] = []
        """The [[auth.tokens]], resolved; empty: no authentication."""
        self.schedules: list[ScheduleSpec] = []
        """The [[schedules]], checked."""
        self.warnings: list[str] = []
        """What the service logs as warnings when it starts (plaintext or no
        authentication allowed off loopback, a token file others can read)."""

    @property
    def open_reflection(self) -> bool:
        return self.file.auth.open_reflection

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def listen(self) -> str:
        return self.file.server.listen

    @property
    def http_listen(self) -> str | None:
        return self.file.http.listen

    @property
    def grace_period(self) -> float:
        return to_seconds(self.file.server.grace_period, "grace_period")

    @property
    def store_path(self) -> Path:
        """The SQLite file (when ``store_url`` is None)."""
        return self.base / (self.file.store.path or _DEFAULT_STORE_PATH)

    @property
    def store_url(self) -> str | None:
        """The PostgreSQL URL, password included (never show it: ``redact_url``);
        CRUZFLOW_STORE_URL wins over [store] url. None: SQLite at ``store_path``."""
        return os.environ.get(STORE_URL_ENV) or self.file.store.url

    @property
    def store_lease_period_s(self) -> float:
        return to_seconds(self.file.store.lease_period)

    def postgres_store(self) -> Store:
        """The PostgreSQL store of ``store_url``."""
        from cruzflow.server.store.postgres import PostgresStore

        url = self.store_url
        assert url is not None, "no PostgreSQL store is configured"
        return PostgresStore(url, lease_period_s=self.store_lease_period_s)

    @property
    def limits(self) -> Limits:
        values = self.file.limits.model_dump()
        values["max_sleep_s"] = to_seconds(values.pop("max_sleep"))
        values["retention_s"] = to_seconds(values.pop("retention"))
        values["purge_interval_s"] = to_seconds(values.pop("purge_interval"))
        values["schedule_grace_s"] = to_seconds(values.pop("schedule_grace"))
        return Limits(**values)

    @property
    def telemetry(self) -> TelemetrySettings:
        section = self.file.telemetry
        return TelemetrySettings(
            traces=section.traces,
            metrics=section.metrics,
            otlp_endpoint=section.otlp_endpoint,
            service_name=section.service_name or self.name,
            metric_interval_s=to_seconds(section.metric_interval),
            prometheus_listen=section.prometheus_listen,
            rpc_spans=section.rpc_spans,
            logs=section.logs,
            new_trace_after_s=(
                None if section.new_trace_after is None else to_seconds(section.new_trace_after)
            ),
        )

    def database_paths(self) -> dict[str, Path]:
        return {db.binding: self.base / db.path for db in self.file.sqlite_databases}


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_config(
    path: str | Path, *, listen: str | None = None, http_listen: str | None = None
) -> Config:
    """Read, check and resolve a config file; raise ConfigError on any fault."""
    path = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if listen is not None:
        raw.setdefault("server", {})["listen"] = listen
    if http_listen is not None:
        raw.setdefault("http", {})["listen"] = http_listen
    try:
        data = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            reason = err["msg"]
            if err["type"] == "extra_forbidden":
                reason = (
                    "unknown key; check its spelling against the README's configuration section"
                )
            problems.append(f"{path}: {_where(err['loc'])}: {reason}")
        raise ConfigError("\n".join(problems)) from None
    targets = [_target(path, i, wf) for i, wf in enumerate(data.workflows)]
    _check_unique(path, data)
    server_tls = _server_tls(path, data.server)
    tokens, warnings = _tokens(path, data)
    exposed = [("server.listen", data.server.listen)]
    if data.http.listen is not None:
        exposed.append(("http.listen", data.http.listen))
    warnings[:0] = [
        warning
        for key, address in exposed
        for warning in _exposure(
            path, key, address, data.server, server_tls is not None, bool(tokens)
        )
    ]
    base = path.parent.resolve()
    for folder in data.python_path:
        entry = str((base / folder).resolve())
        if entry not in sys.path:
            sys.path.insert(0, entry)
    specs = {
        wf.name: WorkflowSpec(
            wf.name, wf.binding, wf.class_name, _import(path, i, wf.class_name), _gate(path, i, wf)
        )
        for i, wf in enumerate(data.workflows)
        if wf.class_name is not None
    }
    config = Config(path, data, specs, targets)
    config.server_tls, config.tokens, config.warnings = server_tls, tokens, warnings
    config.schedules = _schedules(path, data, specs, config.limits)
    return config


def _schedules(
    path: Path, data: ConfigFile, specs: dict[str, WorkflowSpec], limits: Limits
) -> list[ScheduleSpec]:
    """The [[schedules]], each checked as CreateSchedule checks one."""
    out: list[ScheduleSpec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(data.schedules):
        where = f"{path}: schedules[{i}]"
        try:
            check_schedule_id(entry.id, "id")
        except InvalidArgument as exc:
            raise ConfigError(f"{where}.{exc}") from None
        where = f"{where} ({entry.id!r})"
        if entry.id in seen:
            raise ConfigError(f"{where}.id: used twice (also at schedules[{seen[entry.id]}])")
        seen[entry.id] = i
        if entry.workflow not in specs:
            hosted = ", ".join(sorted(specs)) or "none"
            raise ConfigError(
                f"{where}.workflow: {entry.workflow!r} is not a workflow hosted here (with "
                f"class_name; hosted: {hosted})"
            )
        try:
            Cron(entry.cron, entry.timezone)
            params = json.dumps(entry.params, separators=(",", ":")).encode()
            validate.parse_json_field(
                params, "params", limits.max_payload_bytes, limits.max_json_depth
            )
        except InvalidArgument as exc:
            raise ConfigError(f"{where}.{exc}") from None
        out.append(
            ScheduleSpec(
                id=entry.id,
                workflow=entry.workflow,
                cron=entry.cron,
                timezone=entry.timezone,
                params=params,
                catch_up=CatchUp.SKIP if entry.catch_up == "skip" else CatchUp.ONCE,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The PEM contents of the [server] tls_* files, read when the config loads."""

    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)
    """Set: clients must present a certificate signed by one of these."""


def is_loopback(listen: str) -> bool:
    """Whether ``host:port`` listens only on this machine (127.0.0.0/8, ::1, localhost)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or a wildcard such as 0.0.0.0 (also not loopback)


def _server_tls(path: Path, server: ServerSection) -> ServerTls | None:
    where = f"{path}: server"
    if (server.tls_cert_file is None) != (server.tls_key_file is None):
        missing = "tls_key_file" if server.tls_key_file is None else "tls_cert_file"
        raise ConfigError(f"{where}.{missing}: tls_cert_file and tls_key_file go together")
    if server.tls_cert_file is None or server.tls_key_file is None:
        if server.tls_client_ca_file is not None:
            raise ConfigError(
                f"{where}.tls_client_ca_file: client certificates need TLS; set "
                f"server.tls_cert_file and server.tls_key_file too"
            )
        return None
    cert = _pem(path, where, "tls_cert_file", server.tls_cert_file)
    key = _pem(path, where, "tls_key_file", server.tls_key_file)
    ca = _pem(path, where, "tls_client_ca_file", server.tls_client_ca_file)
    assert cert is not None and key is not None
    # Checked now with Python's ssl module, so that a wrong file stops the
    # server with its key rather than failing every handshake later. Its
    # messages name the problem, never the key's content.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(
            path.parent / server.tls_cert_file,
            path.parent / server.tls_key_file,
            password=_no_password,
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{where}.tls_cert_file/tls_key_file: not a PEM certificate chain and its "
            f"unencrypted private key ({_reason(exc)})"
        ) from None
    if ca is not None:
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"{where}.tls_client_ca_file: not PEM CA certificates ({_reason(exc)})"
            ) from None
    return ServerTls(cert, key, ca)


def _no_password() -> str:
    raise ValueError("the key is encrypted; give an unencrypted key")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return str(exc) or type(exc).__name__


def _exposure(
    path: Path, key: str, listen: str, server: ServerSection, tls: bool, auth: bool
) -> list[str]:
    """Refuse to serve off loopback without TLS or tokens unless the config
    says so; the warnings to log when it does."""
    if is_loopback(listen):
        return []
    warnings = []
    where = f"{path}: {key}"
    if not tls:
        if not server.allow_plaintext:
            raise ConfigError(
                f"{where}: {listen} is not a loopback address, and the server has no "
                f"TLS; set server.tls_cert_file and server.tls_key_file, or set "
                f"server.allow_plaintext = true to serve plaintext there (e.g. behind a proxy "
                f"that terminates TLS)"
            )
        warnings.append(
            f"serving plaintext on {listen}, which is not loopback "
            f"(server.allow_plaintext = true): calls, tokens and payloads cross the network "
            f"unencrypted"
        )
    if not auth:
        if not server.allow_unauthenticated:
            raise ConfigError(
                f"{where}: {listen} is not a loopback address, and no [[auth.tokens]] "
                f"are configured; add one, or set server.allow_unauthenticated = true to let "
                f"anyone who reaches it call every method"
            )
        warnings.append(
            f"serving {listen}, which is not loopback, without authentication "
            f"(server.allow_unauthenticated = true): anyone who reaches it may call every method"
        )
    return warnings


_MIN_TOKEN_LENGTH = 16


def _tokens(path: Path, data: ConfigFile) -> tuple[list[TokenRule], list[str]]:
    """The [[auth.tokens]] with their secrets read, and warnings about them.

    Messages name the entry, its variable or file and what is wrong, never a
    token or a part of one.
    """
    hosted = sorted(wf.name for wf in data.workflows if wf.class_name is not None)
    rules: list[TokenRule] = []
    warnings: list[str] = []
    names: dict[str, int] = {}
    secrets: dict[bytes, int] = {}
    for i, entry in enumerate(data.auth.tokens):
        where = f"{path}: auth.tokens[{i}]"
        if entry.name in names:
            raise ConfigError(
                f"{where}.name: {entry.name!r} is used twice (also at auth.tokens[{names[entry.name]}])"
            )
        names[entry.name] = i
        if (entry.env is None) == (entry.file is None):
            raise ConfigError(
                f"{where}: give exactly one of env (the variable holding the token) and file "
                f"(a file holding it) for token {entry.name!r}"
            )
        if entry.env is not None:
            token = os.environ.get(entry.env, "").strip()
            if not token:
                raise ConfigError(
                    f"{where}.env: the environment variable {entry.env} is not set (or empty); "
                    f"it must hold the token {entry.name!r}"
                )
            source = f"the variable {entry.env}"
        else:
            assert entry.file is not None
            file = path.parent / entry.file
            try:
                token = file.read_text().strip()
                mode = file.stat().st_mode
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not text"
                raise ConfigError(
                    f"{where}.file: cannot read {file} for token {entry.name!r}: {reason or exc}"
                ) from None
            if not token:
                raise ConfigError(f"{where}.file: {file} is empty; it must hold the token")
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                warnings.append(
                    f"the file of token {entry.name!r} ({file}) can be read by other users; "
                    f"chmod 600 it"
                )
            source = f"the file {file}"
        if len(token) < _MIN_TOKEN_LENGTH or not all("!" <= c <= "~" for c in token):
            raise ConfigError(
                f"{where}: the token {entry.name!r} in {source} must be at least "
                f"{_MIN_TOKEN_LENGTH} printable ASCII characters without spaces; generate one "
                f"with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        hashed = digest(token)
        if hashed in secrets:
            raise ConfigError(
                f"{where}: token {entry.name!r} is the same token as "
                f"auth.tokens[{secrets[hashed]}]; give each entry its own"
            )
        secrets[hashed] = i
        workflows = None
        if entry.workflows is not None:
            for j, name in enumerate(entry.workflows):
                if name not in hosted:
                    raise ConfigError(
                        f"{where}.workflows[{j}]: {name!r} is not a workflow hosted here "
                        f"(hosted: {', '.join(hosted) or 'none'})"
                    )
            workflows = frozenset(entry.workflows)
        rules.append(TokenRule(entry.name, hashed, entry.access == "read", workflows))
    return rules, warnings


def _gate(path: Path, index: int, wf: WorkflowSection) -> Gate | None:
    """The entry's concurrency and rate limits, or None if it sets neither."""
    where = f"{path}: workflows[{index}]"
    if wf.concurrency is None and wf.rate_limit is None:
        if wf.concurrency_key is not None:
            raise ConfigError(
                f"{where}.concurrency_key: a key to limit by, but no limit; add concurrency "
                f"(instances at once per key) or rate_limit (starts per window per key)"
            )
        return None
    rate = wf.rate_limit
    return Gate(
        limit=wf.concurrency,
        starts=None if rate is None else rate.starts,
        per_ms=0 if rate is None else max(1, round(to_seconds(rate.per) * 1000)),
        key_path=tuple(wf.concurrency_key.split(".")) if wf.concurrency_key else (),
    )


_REMOTE_ONLY = ("token_env", "tls_ca_file", "tls_cert_file", "tls_key_file")


def _target(path: Path, index: int, wf: WorkflowSection) -> WorkflowTarget:
    """Check that the entry is hosted here or remote, and resolve how to call it."""
    where = f"{path}: workflows[{index}]"
    if wf.class_name is not None and wf.address is not None:
        raise ConfigError(
            f"{where}: has both class_name and address; give class_name for a workflow hosted "
            f"here, or address for one hosted by another cruzflow server"
        )
    if wf.class_name is None and wf.address is None:
        # "Field required" as pydantic words it, for a file that forgot class_name.
        raise ConfigError(
            f"{where}.class_name: Field required: give class_name for a workflow hosted here, "
            f"or address (host:port) for one hosted by another cruzflow server"
        )
    timeout = 10.0 if wf.timeout is None else to_seconds(wf.timeout)
    if wf.address is not None:
        for key in ("concurrency", "concurrency_key", "rate_limit"):
            if getattr(wf, key) is not None:
                raise ConfigError(
                    f"{where}.{key}: limits belong to the server that hosts the workflow "
                    f"(with class_name); this one is hosted by {wf.address}"
                )
    if wf.address is None:
        for key in _REMOTE_ONLY:
            if getattr(wf, key) is not None:
                raise ConfigError(
                    f"{where}.{key}: only for a workflow hosted by another server (with "
                    f"address); this one is hosted here"
                )
        return WorkflowTarget(wf.binding, wf.name, None, timeout)
    token = None
    if wf.token_env is not None:
        # The file names the variable, never the secret itself.
        token = os.environ.get(wf.token_env)
        if not token:
            raise ConfigError(
                f"{where}.token_env: the environment variable {wf.token_env} is not set (or "
                f"empty); it must hold the bearer token for {wf.address}"
            )
    if (wf.tls_cert_file is None) != (wf.tls_key_file is None):
        missing = "tls_key_file" if wf.tls_key_file is None else "tls_cert_file"
        raise ConfigError(f"{where}.{missing}: tls_cert_file and tls_key_file go together")
    tls = None
    if wf.tls_ca_file or wf.tls_cert_file:
        tls = TlsFiles(
            _pem(path, where, "tls_ca_file", wf.tls_ca_file),
            _pem(path, where, "tls_cert_file", wf.tls_cert_file),
            _pem(path, where, "tls_key_file", wf.tls_key_file),
        )
    return WorkflowTarget(wf.binding, wf.name, wf.address, timeout, token, tls)


def _pem(path: Path, where: str, key: str, name: str | None) -> bytes | None:
    if name is None:
        return None
    file = path.parent / name
    try:
        return file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}.{key}: cannot read {file}: {exc.strerror or exc}") from None


def _check_unique(path: Path, data: ConfigFile) -> None:
    seen: dict[str, str] = {}
    for i, wf in enumerate(data.workflows):
        # Only names hosted here must be unique: remote ones live on other servers.
        keys = ("name", "binding") if wf.class_name is not None else ("binding",)
        for key, value in ((key, getattr(wf, key)) for key in keys):
            where = f"workflows[{i}].{key}"
            tag = f"{key}:{value}" if key == "name" else f"binding:{value}"
            if tag in seen:
                raise ConfigError(f"{path}: {where}: {value!r} is used twice (also at {seen[tag]})")
            seen[tag] = where
    for i, db in enumerate(data.sqlite_databases):
        tag = f"binding:{db.binding}"
        where = f"sqlite_databases[{i}].binding"
        if tag in seen:
            raise ConfigError(
                f"{path}: {where}: {db.binding!r} is used twice (also at {seen[tag]})"
            )
        seen[tag] = where
    for key in data.vars:
        if f"binding:{key}" in seen:
            raise ConfigError(
                f"{path}: vars.{key}: clashes with the binding at {seen[f'binding:{key}']}"
            )


def _import(path: Path, index: int, target: str) -> type[WorkflowEntrypoint[Any]]:
    where = f"{path}: workflows[{index}].class_name"
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"{where}: cannot import module {module_name!r}: {type(exc).__name__}: {exc} "
            f"(python_path is {sys.path[0]!r} first)"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
    if not (inspect.isclass(cls) and issubclass(cls, WorkflowEntrypoint)):
        raise ConfigError(
            f"{where}: {target} is not a subclass of cruzflow.workflows.WorkflowEntrypoint"
        )
    if not inspect.iscoroutinefunction(cls.run):
        raise ConfigError(
            f"{where}: {target}.run must be defined with 'async def run(self, event, step)'"
        )
    return cls
