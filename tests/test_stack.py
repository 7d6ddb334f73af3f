"""`encinfer s3-init` against the real MinIO, and `encinfer stack`: deploy/compose.yml's
topology run on loopback without Docker, end to end."""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import urllib3
from conftest import MINIO_BIN, free_port, unique_bucket
from minio import Minio
from minio.error import S3Error
from minio_front import MinioFront, starting

from encinfer import stack as stack_mod
from encinfer.cli import build_parser
from encinfer.common.auth import auth_metadata
from encinfer.common.errors import InvalidArgument, Unauthenticated, Unavailable
from encinfer.keystore.s3init import S3InitConfig, init_storage, keystore_policy
from encinfer.stack import Stack, StackError, Translator, start_order, write_secrets
from encinfer.v1 import keystore_pb2, keystore_pb2_grpc

needs_minio = pytest.mark.skipif(not os.access(MINIO_BIN, os.X_OK), reason=f"no MinIO binary at {MINIO_BIN}")


def has_command(*words: str) -> bool:
    """Whether `encinfer WORDS...` exists (other engineers add service commands)."""
    parser = build_parser()
    for word in words:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            return False
        parser = sub.choices[word]
    return True


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def bare_minio(endpoint: str, access_key: str, secret_key: str) -> Minio:
    return Minio(endpoint=endpoint, access_key=access_key, secret_key=secret_key, secure=False,
                 http_client=urllib3.PoolManager(retries=urllib3.Retry(total=0)))


# ---------------------------------------------------------------------------- translation

def translator(tmp_path: Path) -> Translator:
    return Translator(
        ports={"minio": {9000: 1111}, "keystore": {50051: 2222, 9101: 3333}},
        secrets={"tokens": tmp_path / "tokens.json"},
        paths={"minio": {"/data": tmp_path / "minio-data"}},
        image_paths={"/app/models": tmp_path / "models"},
    )


def test_service_names_in_addresses_become_loopback_ports(tmp_path):
    assert translator(tmp_path)("keystore", "minio:9000") == "127.0.0.1:1111"


def test_wildcard_listen_address_becomes_the_services_own_loopback_port(tmp_path):
    assert translator(tmp_path)("keystore", "0.0.0.0:50051") == "127.0.0.1:2222"


def test_metrics_port_variable_is_remapped(tmp_path):
    assert translator(tmp_path)("keystore", "9101", "ENCINFER_METRICS_PORT") == "3333"


def test_health_check_url_targets_the_local_port(tmp_path):
    url = translator(tmp_path)("minio", "http://127.0.0.1:9000/minio/health/live")
    assert url == "http://127.0.0.1:1111/minio/health/live"


def test_secret_paths_become_local_files(tmp_path):
    assert translator(tmp_path)("keystore", "/run/secrets/tokens") == str(tmp_path / "tokens.json")


def test_volume_paths_are_mapped_by_whole_path_components(tmp_path):
    t = translator(tmp_path)
    assert t("minio", "/data") == str(tmp_path / "minio-data")
    assert t("minio", "/database") == "/database"


def test_image_paths_in_lists_are_mapped(tmp_path):
    value = translator(tmp_path)("inference", "/app/models/mnist,/app/models/other")
    assert value == f"{tmp_path}/models/mnist,{tmp_path}/models/other"


def test_port_a_service_does_not_publish_is_refused(tmp_path):
    with pytest.raises(StackError, match="50052"):
        translator(tmp_path)("keystore", "0.0.0.0:50052")


def test_dependencies_start_first():
    compose = stack_mod.load_compose()
    assert start_order(compose["services"], ["inference"]) == ["init", "minio", "s3-init", "keystore", "inference"]


def test_a_subset_starts_only_what_it_needs():
    compose = stack_mod.load_compose()
    assert start_order(compose["services"], ["s3-init"]) == ["init", "minio", "s3-init"]


def test_dependency_cycle_is_refused():
    services = {"a": {"depends_on": ["b"]}, "b": {"depends_on": {"a": {"condition": "service_healthy"}}}}
    with pytest.raises(StackError, match="cycle"):
        start_order(services, ["a"])


@needs_minio
def test_every_service_gets_exactly_the_variables_compose_sets(tmp_path):
    compose = stack_mod.load_compose()["services"]
    stack = Stack(tmp_path, free_ports=True, services=list(compose))
    stack.prepare()
    for name in compose:
        assert set(stack.env(name)) == set(compose[name].get("environment") or {}), name


def test_stack_leaves_out_web_unless_asked(tmp_path):
    assert "web" in stack_mod.load_compose()["services"] and "web" in stack_mod.ON_REQUEST
    assert "web" not in Stack(tmp_path, free_ports=True).order
    assert Stack(tmp_path, free_ports=True, services=["web"]).order[-3:] == ["keystore", "inference", "web"]


@needs_minio
def test_stack_points_web_at_the_loopback_ports_of_both_services(tmp_path):
    stack = Stack(tmp_path, free_ports=True, services=["web"])
    stack.prepare()
    env = stack.env("web")
    assert env["ENCINFER_KEYSTORE_TARGET"] == stack.address("keystore", 50051)
    assert env["ENCINFER_INFERENCE_TARGET"] == stack.address("inference", 50052)
    assert env["ENCINFER_WEB_ADDRESS"] == stack.address("web", 8080)
    assert stack.services["web"].health[-3:] == [stack.address("web", 8080), "--http", "/healthz"]


def test_http_health_check_is_healthy_while_web_serves_and_not_after(tmp_path):
    from encinfer.web import Upstreams, WebServer

    # The upstreams are never called: /healthz answers without them.
    upstreams = Upstreams(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    server = WebServer(f"127.0.0.1:{free_port()}", upstreams).start()
    test = ["CMD", "encinfer", "probe", f"127.0.0.1:{server.port}", "--http", "/healthz"]
    try:
        assert stack_mod.run_health_check(test)
        assert not stack_mod.run_health_check([*test[:-1], "/no-such-page"])
    finally:
        server.stop()
    assert not stack_mod.run_health_check(test, timeout=1.0)


@needs_minio
def test_init_writes_into_the_stack_volumes_and_reads_the_secrets_dir(tmp_path):
    stack = Stack(tmp_path / "work", free_ports=True, secrets_dir=tmp_path / "mine")
    stack.prepare()
    env = stack.env("init")
    assert env["ENCINFER_INIT_OPERATOR_DIR"] == str(tmp_path / "mine")
    assert all(env[v].startswith(str(tmp_path / "work" / "volumes"))
               for v in env if v.endswith("_DIR") and "OPERATOR" not in v)
    assert not [v for v in env.values() if "/run/encinfer" in v]
    assert (tmp_path / "mine" / "tokens.json").is_file()  # written like `encinfer stack secrets`


@needs_minio
def test_inference_environment_has_no_storage_variable(tmp_path):
    stack = Stack(tmp_path, free_ports=True)
    stack.prepare()
    assert not [k for k in stack.env("inference") if k.startswith(("ENCINFER_S3_", "MINIO_"))]


# ---------------------------------------------------------------------------- secrets

def test_secrets_are_kept_unless_forced(tmp_path):
    write_secrets(tmp_path)
    before = (tmp_path / "minio_root_password").read_text()
    assert write_secrets(tmp_path) == []
    write_secrets(tmp_path, force=True)
    assert (tmp_path / "minio_root_password").read_text() != before


def test_inference_token_is_the_service_entry_of_the_tokens_file(tmp_path):
    write_secrets(tmp_path)
    table = json.loads((tmp_path / "tokens.json").read_text())
    token = (tmp_path / "inference_keystore_token").read_text().strip()
    assert table[token] == {"owner": "inference", "role": "service"}


def test_demo_token_is_a_tenant_token(tmp_path):
    write_secrets(tmp_path)
    table = json.loads((tmp_path / "tokens.json").read_text())
    assert table[(tmp_path / "demo_token").read_text().strip()]["role"] == "tenant"


def test_secrets_directory_is_private(tmp_path):
    write_secrets(tmp_path / "secrets")
    assert (tmp_path / "secrets").stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------------------- s3-init

def s3init_config(minio_server, **changes) -> S3InitConfig:
    values = dict(endpoint=minio_server.endpoint, bucket=unique_bucket("init"),
                  access_key="ks-" + os.urandom(5).hex(), secret_key=os.urandom(12).hex(),
                  root_user=minio_server.access_key, root_password=minio_server.secret_key, wait_seconds=5)
    values.update(changes)
    return S3InitConfig(**values)


def test_s3_init_refuses_the_root_user_as_key_store_user():
    config = S3InitConfig(access_key="root-x", secret_key="y" * 16, root_user="root-x", root_password="z" * 16)
    with pytest.raises(InvalidArgument, match="differ"):
        init_storage(config)


def test_s3_init_refuses_missing_credentials():
    with pytest.raises(InvalidArgument, match="ENCINFER_S3_ROOT_PASSWORD"):
        init_storage(S3InitConfig(access_key="ks-user", secret_key="y" * 16, root_user="root"))


def test_keystore_policy_names_only_its_bucket():
    resources = {r for s in keystore_policy("b1")["Statement"] for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::b1", "arn:aws:s3:::b1/*"}


@pytest.mark.minio
def test_s3_init_creates_a_bucket_the_key_store_user_can_use(minio_server):
    config = s3init_config(minio_server)
    init_storage(config)
    client = bare_minio(config.endpoint, config.access_key, config.secret_key)
    client.put_object(bucket_name=config.bucket, object_name="keys/k", data=io.BytesIO(b"x"), length=1)
    response = client.get_object(bucket_name=config.bucket, object_name="keys/k")
    try:
        assert response.read() == b"x"
    finally:
        response.close()
        response.release_conn()


@pytest.mark.minio
def test_key_store_user_cannot_touch_another_bucket(minio_server):
    config = s3init_config(minio_server)
    init_storage(config)
    other = unique_bucket("other")
    bare_minio(config.endpoint, config.root_user, config.root_password).make_bucket(bucket_name=other)
    client = bare_minio(config.endpoint, config.access_key, config.secret_key)
    with pytest.raises(S3Error) as err:
        list(client.list_objects(bucket_name=other))
    assert err.value.code == "AccessDenied"


@pytest.mark.minio
def test_key_store_user_cannot_create_buckets(minio_server):
    config = s3init_config(minio_server)
    init_storage(config)
    with pytest.raises(S3Error) as err:
        bare_minio(config.endpoint, config.access_key, config.secret_key).make_bucket(bucket_name=unique_bucket("new"))
    assert err.value.code == "AccessDenied"


@pytest.mark.minio
def test_s3_init_twice_is_fine(minio_server):
    config = s3init_config(minio_server)
    first, second = init_storage(config), init_storage(config)
    assert (first.bucket_created, first.user_created) == (True, True)
    assert (second.bucket_created, second.user_created) == (False, False)


@pytest.mark.minio
def test_s3_init_with_a_wrong_root_password_is_unauthenticated(minio_server):
    with pytest.raises(Unauthenticated, match="root credentials"):
        init_storage(s3init_config(minio_server, root_password="not-the-password"))


@pytest.mark.minio
@pytest.mark.parametrize("s3, admin", [(3, 0), (0, 3), (2, 2)])
def test_s3_init_waits_for_a_minio_still_initializing_its_s3_and_admin_apis(minio_server, s3, admin):
    with MinioFront(minio_server.endpoint, starting(s3, admin)) as front:
        config = s3init_config(minio_server, endpoint=front.endpoint)
        result = init_storage(config)
    assert len(front.refused) == s3 + admin
    assert (result.bucket_created, result.user_created) == (True, True)
    assert bare_minio(minio_server.endpoint, config.access_key, config.secret_key).bucket_exists(
        bucket_name=config.bucket)


@pytest.mark.minio
def test_s3_init_takes_a_bucket_its_own_retried_call_had_already_made(minio_server):
    """Seen in the scale suite: the bucket was made, the answer said "not initialized", and the retry
    found the bucket there (BucketAlreadyOwnedByYou)."""
    made = []

    def refuse(method: str, path: str) -> str | None:
        if method == "PUT" and path.split("?")[0].count("/") == 1 and not made:
            made.append(path)
            return "after:XMinioServerNotInitialized"
        return None
    with MinioFront(minio_server.endpoint, refuse) as front:
        config = s3init_config(minio_server, endpoint=front.endpoint)
        result = init_storage(config)
    assert made and result.bucket_created
    assert bare_minio(minio_server.endpoint, config.access_key, config.secret_key).bucket_exists(
        bucket_name=config.bucket)


@pytest.mark.minio
def test_s3_init_gives_up_on_a_minio_that_never_initializes_after_its_wait(minio_server):
    from encinfer.common.errors import FailedPrecondition

    with MinioFront(minio_server.endpoint, starting(10_000, 0)) as front, \
            pytest.raises(FailedPrecondition, match="XMinioServerNotInitialized.*still so after waiting 1 s"):
        init_storage(s3init_config(minio_server, endpoint=front.endpoint, wait_seconds=1))
    assert 2 <= len(front.refused) <= 5


def test_s3_init_without_a_server_is_unavailable_after_its_wait():
    config = S3InitConfig(endpoint=f"127.0.0.1:{free_port()}", access_key="ks-user", secret_key="y" * 16,
                          root_user="root", root_password="z" * 16, wait_seconds=0.5)
    with pytest.raises(Unavailable, match="did not answer"):
        init_storage(config)


# ---------------------------------------------------------------------------- the stack, running

needs_keystore = pytest.mark.skipif(not has_command("keystore", "serve"), reason="`encinfer keystore serve` missing")
needs_inference = pytest.mark.skipif(not has_command("inference", "serve"), reason="`encinfer inference serve` missing")


@pytest.fixture(scope="module")
def keystore_stack(tmp_path_factory):
    if not os.access(MINIO_BIN, os.X_OK):
        pytest.skip(f"no MinIO binary at {MINIO_BIN}")
    if not has_command("keystore", "serve"):
        pytest.skip("`encinfer keystore serve` missing")
    with Stack(tmp_path_factory.mktemp("stack"), free_ports=True, services=["keystore"]) as stack:
        yield stack


@pytest.mark.minio
def test_stack_key_store_answers_a_tenant(keystore_stack):
    with grpc.insecure_channel(keystore_stack.address("keystore", 50051)) as ch:
        reply = keystore_pb2_grpc.KeyStoreStub(ch).ListKeys(
            keystore_pb2.ListKeysRequest(), metadata=auth_metadata(keystore_stack.token("demo")), timeout=10)
    assert list(reply.keys) == []


@pytest.mark.minio
def test_stack_key_store_refuses_a_caller_without_token(keystore_stack):
    with grpc.insecure_channel(keystore_stack.address("keystore", 50051)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            keystore_pb2_grpc.KeyStoreStub(ch).ListKeys(keystore_pb2.ListKeysRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.minio
def test_stack_key_store_runs_as_its_own_storage_user(keystore_stack):
    env = process_env(keystore_stack.pid("keystore"))
    secrets_dir = keystore_stack.secrets_dir
    assert env["ENCINFER_S3_ACCESS_KEY"] == (secrets_dir / "keystore_s3_access_key").read_text().strip()
    root_password = (secrets_dir / "minio_root_password").read_text().strip()
    assert root_password not in env.values()
    assert not [k for k in env if k.startswith(("MINIO_", "ENCINFER_S3_ROOT"))]


@pytest.mark.minio
def test_stack_publishes_key_store_metrics(keystore_stack):
    address = keystore_stack.address("keystore", 9101)
    with urllib3.PoolManager().request("GET", f"http://{address}/metrics", preload_content=False) as reply:
        assert reply.status == 200


@pytest.mark.minio
@needs_keystore
def test_stack_stops_every_process(tmp_path):
    with Stack(tmp_path, free_ports=True, services=["keystore"]) as stack:
        pids = [stack.pid(name) for name in ("minio", "keystore")]
        assert all(pids)
    assert not any(alive(pid) for pid in pids)


@pytest.mark.minio
@needs_minio
def test_stack_reports_a_failed_init_and_stops_what_it_started(tmp_path):
    stack = Stack(tmp_path, free_ports=True, services=["s3-init"],
                  env={"s3-init": {"ENCINFER_S3_ROOT_PASSWORD_FILE": str(tmp_path / "missing")}})
    with pytest.raises(StackError, match="s3-init failed"):
        stack.start()
    assert not alive(stack.pids["minio"])


@pytest.mark.minio
@needs_minio
def test_stack_up_command_runs_for_a_while_and_exits_cleanly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "encinfer.cli", "stack", "up", "--only", "s3-init", "--free-ports", "--for", "0.5",
         "--workdir", str(tmp_path), "--secrets-dir", str(tmp_path / "secrets")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "encinfer stack is up" in result.stdout and "tokens.json" in result.stdout


@pytest.mark.minio
@needs_minio
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stack_up_command_stops_everything_on_a_signal(tmp_path, sig):
    process = subprocess.Popen(
        [sys.executable, "-m", "encinfer.cli", "stack", "up", "--only", "s3-init", "--free-ports",
         "--workdir", str(tmp_path), "--secrets-dir", str(tmp_path / "secrets")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started = {}
        for line in process.stdout:  # bounded: the stack prints its summary or exits
            if line.startswith("{") and json.loads(line).get("message") == "started":
                entry = json.loads(line)
                started[entry["service"]] = entry["service_pid"]
            if "encinfer stack is up" in line:
                break
        process.send_signal(sig)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()
    assert started["minio"] and not alive(started["minio"])


@pytest.mark.minio
@pytest.mark.slow
@needs_minio
@needs_inference
def test_stack_predicts_on_encrypted_images_end_to_end(tmp_path):
    # client -> inference -> key store (its own token) -> MinIO (the key store's own user).
    import numpy as np

    from encinfer.client.classifier import EncryptedClassifier
    from encinfer.datasets import load_mnist
    from encinfer.inference.artifact import load_model

    X, _ = load_mnist(split="test")
    X = X[:3]
    with Stack(tmp_path, free_ports=True, env={"inference": {"ENCINFER_WORKERS": "1"}}) as stack:
        inference_env = process_env(stack.pid("inference"))
        with EncryptedClassifier(inference=stack.address("inference", 50052),
                                 keystore=stack.address("keystore", 50051), model="mnist",
                                 token=stack.token("demo"), layout="latency", key_dir=tmp_path / "keys") as clf:
            scores = clf.decision_function(X)
        plaintext = load_model(stack.models_dir / "mnist").scores(X)
    assert np.array_equal(scores.argmax(axis=1), plaintext.argmax(axis=1))
    assert np.abs(scores - plaintext).max() < 1e-3
    assert not [k for k in inference_env if k.startswith(("ENCINFER_S3_", "MINIO_"))]


@pytest.mark.minio
@pytest.mark.slow
@needs_minio
@needs_inference
def test_stack_runs_web_when_asked_and_its_gateway_reaches_inference(tmp_path):
    # browser's gRPC-Web -> web -> inference, with a tenant token, all from compose's `web` service.
    import urllib.request

    from encinfer.v1 import inference_pb2 as pb
    from encinfer.web import static_dir

    if not (static_dir() / "vendor" / "node-seal" / "seal_throws.wasm").is_file():
        pytest.skip("node-seal is not in the page's files: run `make web-deps`")
    with Stack(tmp_path, free_ports=True, services=["web"], env={"inference": {"ENCINFER_WORKERS": "1"}}) as stack:
        url = f"http://{stack.address('web', 8080)}"
        call = urllib.request.Request(f"{url}/encinfer.v1.Inference/ListModels", data=b"\0\0\0\0\0", headers={
            "content-type": "application/grpc-web+proto", "authorization": f"Bearer {stack.token('demo')}"})
        with urllib.request.urlopen(call, timeout=30) as reply:
            body = reply.read()
    length = int.from_bytes(body[1:5], "big")
    assert body[0] == 0 and b"grpc-status: 0" in body[5 + length:]
    assert "mnist" in [m.name for m in pb.ListModelsResponse.FromString(body[5:5 + length]).models]
