"""Inference service configuration: every environment variable it reads, in one place."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from encinfer.common.auth import TokenTable
from encinfer.common.env import env_float, env_int, env_size, env_str
from encinfer.common.errors import ConfigError
from encinfer.common.rpc import TlsFiles


@dataclass(frozen=True)
class InferenceConfig:
    address: str = "127.0.0.1:50052"
    models: tuple[str, ...] = ()
    # HE work runs in worker processes (TenSEAL holds the GIL); 0 = in the server process.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    key_cache_bytes: int = 512 * 1024 * 1024
    key_recheck_seconds: float = 60.0
    # While the key store cannot re-check a cached record, the record keeps serving this long.
    key_record_max_stale_seconds: float = 3600.0
    # How long a request waits for a due re-check before it is served the cached record.
    key_recheck_wait_seconds: float = 0.25
    key_record_cache_entries: int = 10_000
    keystore_target: str = "127.0.0.1:50051"
    keystore_token: str = ""
    keystore_timeout: float = 10.0
    keystore_tls: TlsFiles | None = None
    tls: TlsFiles | None = None
    metrics_port: int = 0
    max_inflight_per_stream: int = 8
    max_open_batches: int = 4
    grace_seconds: float = 10.0
    # Bearer tokens of the callers (ENCINFER_TOKENS / ENCINFER_TOKENS_FILE); the default: auth off.
    tokens: TokenTable = field(default_factory=lambda: TokenTable(None))
    # After SIGTERM, health answers NOT_SERVING on the open port this long before it closes,
    # so pollers and load balancers see the shutdown instead of a refused connection.
    shutdown_delay: float = 1.0

    @classmethod
    def from_env(cls, models: list[str] | None = None) -> InferenceConfig:
        token = env_str("ENCINFER_KEYSTORE_TOKEN", "")
        token_file = env_str("ENCINFER_KEYSTORE_TOKEN_FILE", "")
        if token_file:
            try:
                token = Path(token_file).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ConfigError(f"ENCINFER_KEYSTORE_TOKEN_FILE={token_file} cannot be read ({e.strerror})") from None
        model_list = models or [m for m in env_str("ENCINFER_MODELS", "").split(",") if m.strip()]
        ks_tls = TlsFiles(ca=env_str("ENCINFER_KEYSTORE_TLS_CA", ""), cert=env_str("ENCINFER_KEYSTORE_TLS_CERT", ""),
                          key=env_str("ENCINFER_KEYSTORE_TLS_KEY", ""))
        tls = TlsFiles(cert=env_str("ENCINFER_TLS_CERT", ""), key=env_str("ENCINFER_TLS_KEY", ""),
                       ca=env_str("ENCINFER_TLS_CLIENT_CA", ""))
        return cls(
            address=env_str("ENCINFER_INFERENCE_ADDRESS", cls.address),
            models=tuple(m.strip() for m in model_list),
            workers=env_int("ENCINFER_WORKERS", os.cpu_count() or 1),
            key_cache_bytes=env_size("ENCINFER_KEY_CACHE_BYTES", cls.key_cache_bytes),
            key_recheck_seconds=env_float("ENCINFER_KEY_RECHECK_SECONDS", cls.key_recheck_seconds),
            key_record_max_stale_seconds=env_float("ENCINFER_KEY_RECORD_MAX_STALE_SECONDS",
                                                   cls.key_record_max_stale_seconds),
            key_recheck_wait_seconds=env_float("ENCINFER_KEY_RECHECK_WAIT_SECONDS", cls.key_recheck_wait_seconds),
            key_record_cache_entries=env_int("ENCINFER_KEY_RECORD_CACHE_ENTRIES", cls.key_record_cache_entries),
            keystore_target=env_str("ENCINFER_KEYSTORE_TARGET", cls.keystore_target),
            keystore_token=token,
            keystore_timeout=env_float("ENCINFER_KEYSTORE_TIMEOUT", cls.keystore_timeout),
            keystore_tls=ks_tls if ks_tls.enabled else None,
            tls=tls if (tls.cert and tls.key) else None,
            metrics_port=env_int("ENCINFER_METRICS_PORT", 0),
            max_inflight_per_stream=env_int("ENCINFER_MAX_INFLIGHT_PER_STREAM", cls.max_inflight_per_stream),
            max_open_batches=env_int("ENCINFER_MAX_OPEN_BATCHES", cls.max_open_batches),
            grace_seconds=env_float("ENCINFER_GRACE_SECONDS", cls.grace_seconds),
            tokens=TokenTable.from_env(),
            shutdown_delay=env_float("ENCINFER_SHUTDOWN_DELAY_SECONDS", cls.shutdown_delay),
        )
