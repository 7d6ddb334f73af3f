"""`encinfer deploy-init`: compose's one-shot that writes credentials and TLS files into volumes."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from encinfer import deploy_init
from encinfer.common.rpc import TlsFiles, channel
from encinfer.stack import free_port, write_secrets

GROUPS = ("minio", "keystore-s3", "tokens", "tls")
VARIABLES = dict(zip(GROUPS, ("ENCINFER_INIT_MINIO_DIR", "ENCINFER_INIT_KEYSTORE_S3_DIR",
                              "ENCINFER_INIT_TOKENS_DIR", "ENCINFER_INIT_TLS_DIR"), strict=True))


def volumes(tmp_path: Path, operator: Path | None = None) -> dict[str, str]:
    env = {}
    for group, variable in VARIABLES.items():
        (tmp_path / group).mkdir(exist_ok=True)
        env[variable] = str(tmp_path / group)
    if operator is not None:
        env["ENCINFER_INIT_OPERATOR_DIR"] = str(operator)
    return env


def contents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def test_first_run_generates_every_group_owner_only(tmp_path):
    assert set(deploy_init.initialize(volumes(tmp_path)).values()) == {"generated"}
    for group in GROUPS:
        files = list((tmp_path / group).iterdir())
        assert files and all(f.stat().st_mode & 0o077 == 0 for f in files), group
    assert set(contents(tmp_path / "tls")) == {"ca.crt", "server.crt", "server.key"}


def test_inference_token_is_the_service_entry_of_the_generated_tokens(tmp_path):
    deploy_init.initialize(volumes(tmp_path))
    table = json.loads((tmp_path / "tokens" / "tokens.json").read_text())
    assert table[(tmp_path / "tokens" / "inference_keystore_token").read_text().strip()]["role"] == "service"


def test_later_runs_keep_what_is_there(tmp_path):
    env = volumes(tmp_path)
    deploy_init.initialize(env)
    before = {g: contents(tmp_path / g) for g in GROUPS}
    assert set(deploy_init.initialize(env).values()) == {"kept"}
    assert {g: contents(tmp_path / g) for g in GROUPS} == before


def test_operator_files_replace_a_whole_group_at_every_run(tmp_path):
    operator = tmp_path / "operator"
    write_secrets(operator)
    env = volumes(tmp_path, operator)
    deploy_init.initialize(env)
    (operator / "minio_root_password").write_text("rotated-password\n")
    result = deploy_init.initialize(env)
    assert result["ENCINFER_INIT_MINIO_DIR"] == "operator" and result["ENCINFER_INIT_TLS_DIR"] == "kept"
    assert (tmp_path / "minio" / "minio_root_password").read_text() == "rotated-password\n"
    assert (tmp_path / "tokens" / "tokens.json").read_text() == (operator / "tokens.json").read_text()


def test_an_incomplete_operator_group_is_generated_instead(tmp_path):
    operator = tmp_path / "operator"
    operator.mkdir()
    (operator / "minio_root_user").write_text("mine\n")
    assert deploy_init.initialize(volumes(tmp_path, operator))["ENCINFER_INIT_MINIO_DIR"] == "generated"


def test_a_missing_volume_directory_is_refused_with_its_variable(tmp_path):
    with pytest.raises(deploy_init.InvalidArgument, match="ENCINFER_INIT_TLS_DIR"):
        deploy_init.initialize({"ENCINFER_INIT_TLS_DIR": str(tmp_path / "absent")})


def test_certificate_names_the_services_and_loopback(tmp_path):
    deploy_init.initialize(volumes(tmp_path))
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"keystore", "inference", "localhost"}
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_a_grpc_server_with_the_certificate_is_verified_by_a_client_with_the_ca(tmp_path):
    deploy_init.initialize(volumes(tmp_path))
    tls = tmp_path / "tls"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = free_port()
    server.add_secure_port(f"127.0.0.1:{port}", TlsFiles(cert=str(tls / "server.crt"), key=str(tls / "server.key"))
                           .server_credentials())
    server.start()
    try:
        with channel(f"127.0.0.1:{port}", TlsFiles(ca=str(tls / "ca.crt"))) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The probe compose's health checks run, with the CA from the environment.
        probe = subprocess.run([sys.executable, "-m", "encinfer.cli", "probe", f"127.0.0.1:{port}"],
                               env={"ENCINFER_PROBE_TLS_CA": str(tls / "ca.crt"), "PATH": "/usr/bin:/bin"},
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stdout + probe.stderr
    finally:
        server.stop(None)


def test_command_exits_non_zero_with_a_one_line_reason(tmp_path):
    result = subprocess.run([sys.executable, "-m", "encinfer.cli", "deploy-init"],
                            env={"ENCINFER_INIT_TOKENS_DIR": str(tmp_path / "absent"), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "ENCINFER_INIT_TOKENS_DIR" in result.stdout + result.stderr
