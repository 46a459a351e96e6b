"""Configuration from environment variables (and a ``.env`` file), validated at start."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.artifacts import parse_s3_store
from domain.webhooks import DEFAULT_SCHEDULE, parse_schedule


class ConfigError(Exception):
    """A configuration problem, reported to the operator in one line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=True)

    DATABASE_URL: str = "sqlite:///./data"
    # SPEC 8: the most PostgreSQL connections one process holds (API, worker and projection
    # runner share one pool); 8 lets ten processes fit in max_connections=100 beside the CLI's
    # two each. At least 2: the runner and a request each need one.
    DATABASE_POOL_SIZE: int = Field(default=8, ge=2, le=1000)
    # False behind PgBouncer in transaction mode (before 1.21, or without
    # max_prepared_statements): no statement is prepared on the server.
    DATABASE_PREPARED_STATEMENTS: bool = True
    PORT: int = Field(default=8080, ge=0, le=65535)
    HOST: str = "127.0.0.1"
    MEDIAMARKET_ADMIN_TOKEN: str | None = None
    MEDIAMARKET_SECRET_KEY: str | None = None
    MEDIAMARKET_DEMO: bool = True
    JOB_TTL_SECONDS: int = Field(default=1800, gt=0)
    MEDIA_ARTIFACT_TTL_SECONDS: int = Field(default=10800, gt=0)
    FEE_MULTIPLIER_BPS: int = Field(default=10000, ge=10000)
    FLAT_FEE_USDC: int = Field(default=0, ge=0)
    ARTIFACT_STORE: str = "file://./data/artifacts"
    # SPEC 7: an S3 store's service (any S3-compatible one; AWS itself when unset) and keys
    # (when unset, boto's own chain: instance role, ~/.aws).
    S3_ENDPOINT_URL: str | None = None
    AWS_ACCESS_KEY_ID: str | None = None
    AWS_SECRET_ACCESS_KEY: str | None = None
    AWS_REGION: str | None = None
    # Where clients reach this engine: a local store's signed URLs start with it, never with
    # the Host a request names (http://{HOST}:{PORT} when unset).
    PUBLIC_BASE_URL: str | None = None
    PROVIDER_BASE_URL_VENICE: str | None = None
    SIM_RENDER_SECONDS: float = Field(default=3.0, ge=0)
    PROVIDER_QUOTE_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0)
    PROVIDER_QUEUE_TIMEOUT_SECONDS: float = Field(default=30.0, gt=0)
    WORKER_CONCURRENCY: int = Field(default=256, gt=0)
    # A `mediamarket worker` serves /healthz and /metrics on this port when set (it serves no
    # API): its provider errors, job outcomes and active jobs are seen nowhere else.
    METRICS_PORT: int | None = Field(default=None, ge=1, le=65535)
    # A `mediamarket worker`'s name in the work queue (default host:pid). Give a stable one only
    # if no two running workers can share it (a StatefulSet's pod name): a restart under it then
    # takes back what its last life held at once instead of after the 10 s lease.
    WORKER_ID: str | None = Field(default=None, min_length=1, max_length=200)
    WEBHOOK_ALLOW_HTTP: bool = False
    # SPEC 7: seconds between a webhook's failed tries, comma-separated; empty: the default
    # schedule (5 s, 5 min, 30 min, 2 h, 5 h, then 10 h, for 87.6 h in all).
    WEBHOOK_RETRY_SCHEDULE: str = ""
    # SPEC 9: URLs that sellers, buyers and providers supply may reach private addresses only
    # when the operator says so; a seller's base_url only the hosts listed per provider.
    OUTBOUND_ALLOW_PRIVATE: bool = False
    PROVIDER_ALLOWED_HOSTS_VENICE: str = "api.venice.ai"
    LOG_LEVEL: str = "info"

    @field_validator("DATABASE_URL")
    @classmethod
    def _known_database(cls, value: str) -> str:
        scheme = urlparse(value).scheme
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value

    @field_validator("ARTIFACT_STORE")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value.startswith("s3://"):
            parse_s3_store(value)
        elif not value.startswith("file://"):
            raise ValueError("must start with file:// or s3://")
        return value

    @field_validator("WEBHOOK_RETRY_SCHEDULE")
    @classmethod
    def _retry_schedule(cls, value: str) -> str:
        if value.strip():
            parse_schedule(value)
        return value

    @property
    def webhook_schedule(self) -> tuple[float, ...]:
        if not self.WEBHOOK_RETRY_SCHEDULE.strip():
            return DEFAULT_SCHEDULE
        return parse_schedule(self.WEBHOOK_RETRY_SCHEDULE)

    @field_validator("S3_ENDPOINT_URL", "PUBLIC_BASE_URL")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("must be an http:// or https:// URL")
        if parsed.query or parsed.fragment:
            raise ValueError("must have no query or fragment")
        return value.rstrip("/")

    @property
    def is_sqlite(self) -> bool:
        return urlparse(self.DATABASE_URL).scheme == "sqlite"

    @property
    def data_dir(self) -> Path:
        """Where the embedded default keeps its files (SQLite databases, generated secrets)."""
        if self.is_sqlite:
            return sqlite_dir(self.DATABASE_URL)
        return Path("./data")

    @property
    def artifact_dir(self) -> Path:
        return Path(unquote(self.ARTIFACT_STORE[len("file://") :]))

    @property
    def is_s3(self) -> bool:
        return self.ARTIFACT_STORE.startswith("s3://")

    @property
    def public_base_url(self) -> str:
        return self.PUBLIC_BASE_URL or f"http://{self.HOST}:{self.PORT}"


def sqlite_dir(url: str) -> Path:
    # sqlite:///./data -> ./data and sqlite:////abs/dir -> /abs/dir
    path = urlparse(url).path
    return Path(unquote(path[1:] if path.startswith("/") else path) or ".")


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid configuration: {where}: {first['msg']}") from None
