"""Key store configuration: every environment variable the service reads, read here only.

docs/config-keystore.md lists them with defaults and meanings; keep the two in step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from encinfer.common.auth import TokenTable
from encinfer.common.env import env_bool, env_float, env_int, env_size, env_str
from encinfer.common.errors import ConfigError
from encinfer.common.rpc import TlsFiles

DAY = 24 * 3600


@dataclass(frozen=True)
class S3Settings:
    endpoint: str = "127.0.0.1:9000"
    access_key: str = ""
    secret_key: str = ""
    bucket: str = "encinfer-keys"
    secure: bool = False
    ca_file: str = ""
    region: str = ""

    @classmethod
    def from_env(cls) -> S3Settings:
        """The ENCINFER_S3_* variables, read here only (the key store and s3-init share them)."""
        return cls(
            endpoint=env_str("ENCINFER_S3_ENDPOINT", cls.endpoint),
            access_key=env_str("ENCINFER_S3_ACCESS_KEY", ""),
            secret_key=env_str("ENCINFER_S3_SECRET_KEY", ""),
            bucket=env_str("ENCINFER_S3_BUCKET", cls.bucket),
            secure=env_bool("ENCINFER_S3_SECURE", False),
            ca_file=env_str("ENCINFER_S3_CA_FILE", ""),
            region=env_str("ENCINFER_S3_REGION", ""),
        )

    def __repr__(self) -> str:  # never print the secret key in logs or tracebacks
        return (f"S3Settings(endpoint={self.endpoint!r}, bucket={self.bucket!r}, secure={self.secure}, "
                f"access_key={'set' if self.access_key else 'unset'}, region={self.region!r})")


@dataclass(frozen=True)
class KeyStoreConfig:
    address: str = "127.0.0.1:50051"
    backend: str = "fs"                      # "fs" or "s3"
    data_dir: Path = Path("./var/keystore")  # fs objects, and spool files for both backends
    s3: S3Settings = field(default_factory=S3Settings)
    backend_timeout: float = 5.0             # seconds per storage call before UNAVAILABLE
    max_key_bytes: int = 256 * 1024 * 1024
    max_keys_per_owner: int = 100
    default_ttl: int = 7 * DAY
    max_ttl: int = 30 * DAY
    cleanup_interval: float = 300.0
    health_interval: float = 2.0             # backend probe period while serving
    shutdown_grace: float = 10.0             # in-flight RPCs get this long after SIGTERM
    shutdown_delay: float = 1.0              # NOT_SERVING shown on the open port this long first
    tokens: TokenTable = field(default_factory=lambda: TokenTable(None))
    tls: TlsFiles | None = None
    metrics_port: int = 0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.backend not in ("fs", "s3"):
            raise ConfigError(f"ENCINFER_KEYSTORE_BACKEND={self.backend!r}: use fs or s3")
        if self.max_key_bytes <= 0 or self.max_keys_per_owner <= 0:
            raise ConfigError("key size and per-owner key limits must be positive")
        if not 0 < self.default_ttl <= self.max_ttl:
            raise ConfigError("need 0 < ENCINFER_KEYSTORE_DEFAULT_TTL <= ENCINFER_KEYSTORE_MAX_TTL")
        if self.backend_timeout <= 0 or self.cleanup_interval <= 0 or self.health_interval <= 0:
            raise ConfigError("timeouts and intervals must be positive")

    @property
    def spool_dir(self) -> Path:
        """Uploads and downloads pass through files here (same filesystem as fs objects)."""
        return self.data_dir / "tmp"

    def replace(self, **changes) -> KeyStoreConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls) -> KeyStoreConfig:
        cert, key = env_str("ENCINFER_TLS_CERT", ""), env_str("ENCINFER_TLS_KEY", "")
        if bool(cert) != bool(key):
            raise ConfigError("set both ENCINFER_TLS_CERT and ENCINFER_TLS_KEY, or neither")
        tls = TlsFiles(cert=cert, key=key, ca=env_str("ENCINFER_TLS_CLIENT_CA", "")) if cert else None
        return cls(
            address=env_str("ENCINFER_KEYSTORE_ADDRESS", cls.address),
            backend=env_str("ENCINFER_KEYSTORE_BACKEND", cls.backend).strip().lower(),
            data_dir=Path(env_str("ENCINFER_KEYSTORE_DATA_DIR", str(cls.data_dir))),
            s3=S3Settings.from_env(),
            backend_timeout=env_float("ENCINFER_KEYSTORE_BACKEND_TIMEOUT", cls.backend_timeout),
            max_key_bytes=env_size("ENCINFER_KEYSTORE_MAX_KEY_BYTES", cls.max_key_bytes),
            max_keys_per_owner=env_int("ENCINFER_KEYSTORE_MAX_KEYS_PER_OWNER", cls.max_keys_per_owner),
            default_ttl=env_int("ENCINFER_KEYSTORE_DEFAULT_TTL", cls.default_ttl),
            max_ttl=env_int("ENCINFER_KEYSTORE_MAX_TTL", cls.max_ttl),
            cleanup_interval=env_float("ENCINFER_KEYSTORE_CLEANUP_INTERVAL", cls.cleanup_interval),
            health_interval=env_float("ENCINFER_KEYSTORE_HEALTH_INTERVAL", cls.health_interval),
            shutdown_grace=env_float("ENCINFER_KEYSTORE_SHUTDOWN_GRACE", cls.shutdown_grace),
            shutdown_delay=env_float("ENCINFER_KEYSTORE_SHUTDOWN_DELAY", cls.shutdown_delay),
            tokens=TokenTable.from_env(),
            tls=tls,
            metrics_port=env_int("ENCINFER_METRICS_PORT", 0),
            log_level=env_str("ENCINFER_LOG_LEVEL", "INFO"),
        )
