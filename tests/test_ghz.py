"""Load testing with the real ghz binary: `encinfer ghz-data` payloads and configs, the exact
commands it prints, and a quick `make load` run (scripts/load.py --quick) end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("inference_fixtures")
from conftest import MINIO_BIN, REPO
from inference_fixtures import ALICE, CALL_TIMEOUT, MODEL, start_stack

from encinfer.client import ghzdata
from encinfer.common.auth import auth_metadata
from encinfer.v1 import inference_pb2 as pb

pytest_plugins = ["inference_fixtures"]

GHZ = ghzdata.ghz_binary()
needs_ghz = pytest.mark.skipif(not GHZ.is_file(), reason=f"no ghz binary at {GHZ} (make ghz-bin)")
N_IMAGES = 6


def load_script():
    name = "encinfer_load_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "load.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def served(mnist_model, tmp_path_factory):
    """Key store + inference (2 workers) in this process, and ghz-data written against them."""
    stem, model = mnist_model
    workdir = tmp_path_factory.mktemp("ghz")
    stack = start_stack(stem, model, workdir)
    try:
        data = ghzdata.write_ghz_data(stack.target, stack.keystore_target, ALICE, workdir / "out",
                                      n_predict=N_IMAGES, n_stream=N_IMAGES, batch_samples=100)
        yield stack, data
    finally:
        stack.close()


def ghz_json(argv: list[str]) -> dict:
    """Runs a ghz command line with JSON output; bounded."""
    result = subprocess.run([argv[0], "-O", "json", *argv[1:]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stream_answers(code: str) -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value("encinfer_stream_answers_total", {"code": code}) or 0.0


# ---------------------------------------------------------------------------- payloads

def test_varint_is_protobufs_base_128_encoding():
    assert ghzdata.varint(1) == b"\x01" and ghzdata.varint(300) == b"\xac\x02"


def test_predict_payload_holds_count_delimited_requests_with_the_uploaded_key(served):
    _, data = served
    messages = ghzdata.read_delimited(Path(data.scenarios["predict"].payload).read_bytes(), pb.PredictRequest)
    assert len(messages) == N_IMAGES
    assert {m.key_id for m in messages} == {data.latency_key_id} and {m.model for m in messages} == {MODEL}
    assert len({m.ciphertext for m in messages}) == N_IMAGES


def test_stream_payload_is_a_header_then_one_item_per_image(served):
    _, data = served
    messages = ghzdata.read_delimited(Path(data.scenarios["stream"].payload).read_bytes(), pb.PredictStreamRequest)
    assert [m.WhichOneof("msg") for m in messages] == ["header"] + ["item"] * N_IMAGES
    assert messages[0].header.layout == pb.LAYOUT_COEFF  # the layout the client library picks


def test_batch_payload_is_a_header_then_every_part_of_one_batch(served):
    stack, data = served
    messages = ghzdata.read_delimited(Path(data.scenarios["batch"].payload).read_bytes(), pb.PredictStreamRequest)
    parts = [m.batch_part for m in messages[1:]]
    assert messages[0].header.layout == pb.LAYOUT_BATCH and messages[0].header.key_id == data.batch_key_id
    assert [p.position for p in parts] == list(range(len(parts)))
    with stack.classifier(Path(data.out) / "keys") as clf:
        assert len(parts) == len(clf.layout_info("batch").feature_indices)


def test_predict_payloads_decrypt_to_the_plaintext_models_argmax(served):
    from encinfer.he.coeff import decrypt_coeff

    stack, data = served
    messages = ghzdata.read_delimited(Path(data.scenarios["predict"].payload).read_bytes(), pb.PredictRequest)
    assert {m.layout for m in messages} == {pb.LAYOUT_COEFF}
    with stack.classifier(Path(data.out) / "keys") as clf:
        secret, key_id = clf.keys("coeff")  # the secret ghz-data kept; the key is still uploaded
        layout = clf.layout_info("coeff")
        stub = stack.stub()
        scores = np.array([decrypt_coeff(secret, stub.Predict(m, metadata=auth_metadata(ALICE),
                                                              timeout=CALL_TIMEOUT).ciphertexts[0], layout)
                           for m in messages])
    assert key_id == data.latency_key_id
    X, _ = ghzdata.images(N_IMAGES)
    np.testing.assert_array_equal(scores.argmax(axis=1), stack.model.scores(X).argmax(axis=1))


def test_token_is_only_in_the_private_metadata_file(served):
    _, data = served
    out = Path(data.out)
    metadata = out / "metadata.json"
    assert json.loads(metadata.read_text()) == {"authorization": f"Bearer {ALICE}"}
    assert stat.S_IMODE(metadata.stat().st_mode) == 0o600
    assert ALICE not in json.dumps(ghzdata.commands(data))
    assert ALICE not in (out / "ghz-data.json").read_text()


# ---------------------------------------------------------------------------- the real ghz

@needs_ghz
@pytest.mark.parametrize("scenario", ["predict", "stream", "batch", "health"])
def test_printed_ghz_command_runs_through_reflection_without_errors(served, scenario):
    _, data = served
    before = stream_answers("OK")
    report = ghz_json(shlex.split(ghzdata.commands(data, str(GHZ))[scenario]))
    assert report["statusCodeDistribution"] == {"OK": report["count"]}, report.get("errorDistribution")
    if scenario in ("stream", "batch"):
        # The RPC status says nothing of the items: every answer in every stream was OK too
        # (a stream answers each image; a batch stream answers its one batch).
        per_call = N_IMAGES if scenario == "stream" else 1
        assert stream_answers("OK") - before == report["count"] * per_call


@needs_ghz
def test_ghz_config_file_runs_predict(served):
    _, data = served
    report = ghz_json([str(GHZ), "--config", data.scenarios["predict"].config, "-n", "20", "-c", "2",
                       "--connections", "2"])
    assert report["count"] == 20 and report["statusCodeDistribution"] == {"OK": 20}


@needs_ghz
def test_ghz_without_the_token_is_refused(served):
    _, data = served
    s = data.scenarios["predict"]
    report = ghz_json([str(GHZ), "--insecure", "--call", s.call, "-B", s.payload, "-n", "4", data.inference])
    assert report["statusCodeDistribution"] == {"Unauthenticated": 4}


def test_ghz_data_command_prints_the_commands(served, tmp_path, capsys):
    from encinfer.cli import main

    stack, _ = served
    code = main(["ghz-data", "--inference", stack.target, "--keystore", stack.keystore_target, "--token", ALICE,
                 "--out", str(tmp_path / "cli"), "-n", "2", "--no-batch"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"--call encinfer.v1.Inference.Predict -B {tmp_path / 'cli' / 'predict.bin'}" in out
    assert "--call grpc.health.v1.Health.Check" in out and "batch" not in out
    assert ALICE not in out


# ---------------------------------------------------------------------------- make load

def test_load_section_rewrite_leaves_other_sections_alone(tmp_path):
    load = load_script()
    path = tmp_path / "BENCHMARKS.md"
    bench = "<!-- bench:begin -->\n| a | b |\n<!-- bench:end -->\n"
    path.write_text(f"# Benchmarks\n\n{bench}\nafter\n")
    load.write_section(path, "LOAD TABLE", None)
    load.write_section(path, None, "SOAK TABLE")
    load.write_section(path, "NEW LOAD TABLE", None)
    text = path.read_text()
    assert bench in text and text.rstrip().endswith(load.END) and "after" in text
    assert "NEW LOAD TABLE" in text and "SOAK TABLE" in text and "\nLOAD TABLE" not in text
    assert text.count(load.BEGIN) == 1


def test_service_memory_covers_the_whole_process_tree():
    load = load_script()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in load.process_tree(os.getpid())
        assert load.memory(os.getpid())["processes"] >= 2
    finally:
        child.kill()
        child.wait()


@needs_ghz
@pytest.mark.minio
@pytest.mark.skipif(not Path(MINIO_BIN).is_file(), reason=f"no MinIO binary at {MINIO_BIN}")
def test_quick_load_run_writes_reports_table_and_plot(tmp_path):
    out = tmp_path / "load"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "load.py"), "--quick", "--out", str(out),
                             "--benchmarks", str(tmp_path / "BENCHMARKS.md"), "--chart-copy",
                             str(tmp_path / "load.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["run"]: r for r in summary["rows"]}
    assert set(runs) == {"predict-c1", "predict-c2", "predict-c4", "stream-c2", "batch-c2", "health-c4"}
    assert all(r["count"] > 0 and r["errors"] == 0 for r in runs.values()), runs
    assert runs["stream-c2"]["item_errors"] == 0 and runs["batch-c2"]["item_errors"] == 0
    assert (out / "predict-c4.json").exists() and (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| predict-c2 | Predict | 2 | 2 |" in table
    # Reports keep no bearer token.
    assert "Bearer" not in (out / "predict-c1.json").read_text()
