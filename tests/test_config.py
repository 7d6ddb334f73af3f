"""Configuration that cannot work is a ConfigError naming the setting; only main() turns it
into an exit code and one log line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from encinfer.common.errors import ConfigError


@pytest.mark.parametrize("name, value, reader", [
    ("ENCINFER_WORKERS", "two", "inference"),
    ("ENCINFER_KEY_CACHE_BYTES", "lots", "inference"),
    ("ENCINFER_KEYSTORE_BACKEND", "tape", "keystore"),
    ("ENCINFER_KEYSTORE_BACKEND_TIMEOUT", "soon", "keystore"),
    ("ENCINFER_TOKENS", "no-equals-sign", "keystore"),
])
def test_a_setting_that_cannot_work_is_a_config_error_naming_it(monkeypatch, name, value, reader):
    from encinfer.inference.config import InferenceConfig
    from encinfer.keystore.config import KeyStoreConfig

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name.split("_", 1)[1].split("_")[0]):
        (InferenceConfig if reader == "inference" else KeyStoreConfig).from_env()


@pytest.mark.parametrize("service", ["keystore", "inference"])
def test_a_service_with_a_bad_setting_exits_1_with_one_error_line(tmp_path, service):
    env = {"PATH": "/usr/bin:/bin", "ENCINFER_KEYSTORE_DATA_DIR": str(tmp_path / "ks"),
           "ENCINFER_MODELS": str(tmp_path / "none"),
           "ENCINFER_KEYSTORE_BACKEND" if service == "keystore" else "ENCINFER_WORKERS": "nonsense"}
    done = subprocess.run([sys.executable, "-m", "encinfer.cli", service, "serve"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    errors = [e for e in lines if e["severity"] == "ERROR"]
    assert len(errors) == 1 and "cannot start" in errors[0]["message"] and "nonsense" in errors[0]["message"]
    assert "Traceback" not in done.stdout + done.stderr
