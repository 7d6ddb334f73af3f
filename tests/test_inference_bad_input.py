"""Bad input to the inference service, one item per test: the exact status code, a message
a person can act on, and the server still answering correctly afterwards. Real servers
on loopback (key store on the filesystem backend, inference with 2 worker processes);
every call has a deadline, so a hang fails the test instead of stalling the suite.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterable, Iterator

import grpc
import numpy as np
import pytest
import tenseal.sealapi as seal

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import (
    ALICE,
    BOB,
    CALL_TIMEOUT,
    MODEL,
    assert_matches_plaintext,
    assert_status,
    rpc_error,
    start_stack,
    wait_for,
)

from encinfer.client.keystore import KeyStoreClient
from encinfer.common.errors import DataLoss, InvalidArgument
from encinfer.he.batch import encrypt_batch
from encinfer.he.latency import decrypt_latency, encrypt_latency
from encinfer.he.params import CkksParams
from encinfer.he.secret import SecretKeys
from encinfer.v1 import inference_pb2 as pb

pytest_plugins = ["inference_fixtures"]
pytestmark = pytest.mark.timeout(90)

Code = grpc.StatusCode
MIB = 1024 * 1024


def auth(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def item_code(answer: pb.PredictResponse) -> Code:
    return next(c for c in Code if c.value[0] == answer.status.code)


class Tenant:
    """A client with its keys for both layouts uploaded, and raw access to the service."""

    def __init__(self, stack, key_dir, token: str) -> None:
        self.stack, self.token = stack, token
        self.clf = stack.classifier(key_dir, token=token, layout="latency")
        self.secret, self.key_id = self.clf.keys("latency")
        self.layout = self.clf.layout_info("latency")
        self.batch_secret, self.batch_key_id = self.clf.keys("batch")
        self.batch_layout = self.clf.layout_info("batch")
        self.stub = stack.stub(options=[("grpc.max_send_message_length", 16 * MIB)])

    def encrypt(self, x: np.ndarray) -> bytes:
        return encrypt_latency(self.secret, x, self.layout)

    def predict(self, ciphertext: bytes, key_id: str | None = None, model: str = MODEL, token: str | None = "",
                timeout: float = CALL_TIMEOUT) -> pb.PredictResponse:
        return self.stub.Predict(
            pb.PredictRequest(model=model, key_id=self.key_id if key_id is None else key_id, request_id="r",
                              ciphertext=ciphertext),
            metadata=auth(self.token if token == "" else token), timeout=timeout)

    def stream(self, messages: Iterable[pb.PredictStreamRequest], token: str | None = "",
               timeout: float = CALL_TIMEOUT) -> dict[str, pb.PredictResponse]:
        """Every answer of one PredictStream call, by request id."""
        answers = {}
        for answer in self.stub.PredictStream(iter(messages), metadata=auth(self.token if token == "" else token),
                                              timeout=timeout):
            assert answer.request_id not in answers, f"two answers for {answer.request_id}"
            answers[answer.request_id] = answer
        return answers

    def header(self, layout: int = pb.LAYOUT_LATENCY, key_id: str | None = None) -> pb.PredictStreamRequest:
        if key_id is None:
            key_id = self.key_id if layout == pb.LAYOUT_LATENCY else self.batch_key_id
        return pb.PredictStreamRequest(header=pb.StreamHeader(model=MODEL, key_id=key_id, layout=layout))

    def close(self) -> None:
        self.clf.close()


def item(request_id: str, ciphertext: bytes, key_id: str = "") -> pb.PredictStreamRequest:
    return pb.PredictStreamRequest(item=pb.PredictRequest(request_id=request_id, key_id=key_id,
                                                          ciphertext=ciphertext))


def part(request_id: str, position: int, ciphertext: bytes, n_samples: int = 3) -> pb.PredictStreamRequest:
    return pb.PredictStreamRequest(batch_part=pb.BatchPart(request_id=request_id, position=position,
                                                           n_samples=n_samples, ciphertext=ciphertext))


@pytest.fixture(scope="module")
def stack(fs_stack):
    return fs_stack


@pytest.fixture(scope="module")
def alice(stack, tmp_path_factory):
    t = Tenant(stack, tmp_path_factory.mktemp("alice-keys"), ALICE)
    yield t
    t.close()


@pytest.fixture(scope="module")
def bob(stack, tmp_path_factory):
    t = Tenant(stack, tmp_path_factory.mktemp("bob-keys"), BOB)
    yield t
    t.close()


@pytest.fixture(scope="module")
def images(test_images):
    return test_images[0][:8]


@pytest.fixture(scope="module")
def batch_parts(alice, images) -> list[bytes]:
    """One batch of 3 samples, encrypted once: the parts every batch test sends."""
    return list(encrypt_batch(alice.batch_secret, images[:3], alice.batch_layout))


@pytest.fixture
def still_serving(alice, images, stack):
    """After the test: a good request still gets a correct answer, and no batch is left open."""
    yield
    x = images[5]
    reply = alice.predict(alice.encrypt(x))
    assert_matches_plaintext(stack.model, x[None, :], decrypt_latency(alice.secret, reply.ciphertexts[0],
                                                                      alice.layout)[None, :])
    assert wait_for(lambda: sum(stack.open_batches()) == 0), stack.open_batches()


def batch_messages(alice, parts: list[bytes], request_id: str = "b") -> Iterator[pb.PredictStreamRequest]:
    for i, ct in enumerate(parts):
        yield part(request_id, i, ct)


# ---------------------------------------------------------------- ciphertexts

def test_random_bytes_as_ciphertext_are_invalid_argument(alice, still_serving):
    err = rpc_error(lambda: alice.predict(os.urandom(32_000)))
    assert_status(err, Code.INVALID_ARGUMENT, "ciphertext")


def test_empty_ciphertext_is_invalid_argument(alice, still_serving):
    err = rpc_error(lambda: alice.predict(b""))
    assert_status(err, Code.INVALID_ARGUMENT, "ciphertext is empty")


def test_truncated_ciphertext_is_invalid_argument(alice, images, still_serving):
    ct = alice.encrypt(images[0])
    err = rpc_error(lambda: alice.predict(ct[: len(ct) // 2]))
    assert_status(err, Code.INVALID_ARGUMENT, "ciphertext")


def test_ciphertext_larger_than_any_fresh_one_is_invalid_argument(alice, images, still_serving):
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]) + bytes(300_000)))
    assert_status(err, Code.INVALID_ARGUMENT, "larger than any fresh ciphertext")


def test_ciphertext_of_other_parameters_is_invalid_argument(alice, still_serving):
    # The batch layout's parameters (one 60-bit prime) are not the latency layout's.
    plain = seal.Plaintext()
    alice.batch_secret.encoder.encode([0.5] * 8, 2.0 ** alice.batch_layout.params.input_scale_bits, plain)
    err = rpc_error(lambda: alice.predict(alice.batch_secret.encrypt_symmetric(plain)))
    assert_status(err, Code.INVALID_ARGUMENT, "ciphertext")


def test_ciphertext_at_the_wrong_scale_is_invalid_argument(alice, still_serving):
    plain = seal.Plaintext()
    alice.secret.encoder.encode([0.5] * 8, 2.0 ** (alice.layout.params.input_scale_bits - 5), plain)
    err = rpc_error(lambda: alice.predict(alice.secret.encrypt_symmetric(plain)))
    assert_status(err, Code.INVALID_ARGUMENT, "scale")


def test_ciphertext_under_another_clients_key_never_decrypts_to_scores(alice, bob, images, still_serving):
    """The server cannot tell whose secret key encrypted a ciphertext (services/he/latency.py);
    the design promises the client detects the garbage answer: DataLoss, never a silent wrong score."""
    reply = alice.predict(bob.encrypt(images[0]))  # alice's evaluation keys, bob's ciphertext
    for tenant in (alice, bob):
        with pytest.raises(DataLoss, match="not consistent"):
            decrypt_latency(tenant.secret, reply.ciphertexts[0], tenant.layout)


def test_wrong_number_of_features_is_refused_by_the_client(alice, images):
    with pytest.raises(ValueError, match="784 features"):
        alice.clf.decision_function(images[:1, :783])
    with pytest.raises(InvalidArgument, match="784 features"):
        encrypt_latency(alice.secret, images[0, :783], alice.layout)


# ---------------------------------------------------------------- names and ids

def test_unknown_model_is_not_found(alice, images, still_serving):
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]), model="no-such-model"))
    assert_status(err, Code.NOT_FOUND, f"'no-such-model' is not served here; served: {MODEL}")


def test_model_info_for_an_unknown_model_is_not_found(alice, still_serving):
    err = rpc_error(lambda: alice.stub.GetModelInfo(pb.GetModelInfoRequest(model="nope"), metadata=auth(ALICE),
                                                    timeout=CALL_TIMEOUT))
    assert_status(err, Code.NOT_FOUND, "not served here")


def test_empty_model_name_is_invalid_argument(alice, images, still_serving):
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]), model=""))
    assert_status(err, Code.INVALID_ARGUMENT, "model name is empty")


def test_an_upper_case_key_id_is_the_same_key(alice, images, still_serving):
    reply = alice.predict(alice.encrypt(images[0]), key_id=alice.key_id.upper())
    assert reply.ciphertexts


def test_unknown_key_id_is_not_found(alice, images, still_serving):
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]), key_id="ab" * 32))
    assert_status(err, Code.NOT_FOUND, "not in the key store")


@pytest.mark.parametrize("key_id", ["", "not-a-key", "ab" * 31, "ab" * 33, "ab" * 32 + "\n", "../" * 21 + "a"])
def test_malformed_key_id_is_invalid_argument(alice, images, key_id, still_serving):
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]), key_id=key_id))
    assert_status(err, Code.INVALID_ARGUMENT, "64 hex characters")


# ---------------------------------------------------------------- keys that do not fit

def upload(tenant: Tenant, secret: SecretKeys) -> str:
    with KeyStoreClient(tenant.stack.keystore_target, token=tenant.token) as ks:
        return ks.put(secret.public_bundle()).key_id


def other_keys(params: CkksParams, **changes) -> SecretKeys:
    fields = {**params.to_json(), **changes}
    return SecretKeys.generate(CkksParams.from_json(fields))


def test_key_lacking_a_galois_step_is_failed_precondition(alice, images, still_serving):
    steps = alice.layout.params.galois_steps
    key_id = upload(alice, other_keys(alice.layout.params, galois_steps=steps[:-1]))
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]), key_id=key_id))
    assert_status(err, Code.FAILED_PRECONDITION, rf"lacks Galois keys for rotation steps \[{steps[-1]}\]")


def test_key_lacking_the_conjugation_key_is_failed_precondition(alice, images, still_serving):
    key_id = upload(alice, other_keys(alice.layout.params, needs_conjugation_key=False))
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]), key_id=key_id))
    assert_status(err, Code.FAILED_PRECONDITION, "conjugation key")


def test_key_with_other_parameters_is_failed_precondition(alice, images, still_serving):
    key_id = upload(alice, other_keys(alice.layout.params, coeff_modulus_bits=(40, 29, 40)))
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]), key_id=key_id))
    assert_status(err, Code.FAILED_PRECONDITION, r"do not match.*generate keys from GetModelInfo")


def test_unfit_key_is_refused_before_the_ciphertext_is_even_read(alice, still_serving):
    key_id = upload(alice, other_keys(alice.layout.params, coeff_modulus_bits=(40, 29, 40)))
    err = rpc_error(lambda: alice.predict(os.urandom(1000), key_id=key_id))
    assert_status(err, Code.FAILED_PRECONDITION, "do not match")


def test_batch_key_for_the_latency_layout_is_failed_precondition(alice, images, still_serving):
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]), key_id=alice.batch_key_id))
    assert_status(err, Code.FAILED_PRECONDITION, "latency layout")


def test_latency_key_for_the_batch_layout_is_failed_precondition(alice, batch_parts, still_serving):
    answers = alice.stream([alice.header(pb.LAYOUT_BATCH, key_id=alice.key_id),
                            *batch_messages(alice, batch_parts)])
    assert item_code(answers["b"]) == Code.FAILED_PRECONDITION
    assert "batch layout" in answers["b"].status.message


# ---------------------------------------------------------------- sizes

def test_message_over_4_mib_is_resource_exhausted(alice, still_serving):
    err = rpc_error(lambda: alice.predict(bytes(5 * MIB)))
    assert_status(err, Code.RESOURCE_EXHAUSTED, "larger than max")


def test_stream_message_over_4_mib_is_resource_exhausted(alice, still_serving):
    err = rpc_error(lambda: alice.stream([alice.header(), item("big", bytes(5 * MIB))]))
    assert_status(err, Code.RESOURCE_EXHAUSTED, "larger than max")


# ---------------------------------------------------------------- auth

def test_missing_token_is_unauthenticated_on_every_method(alice, images, still_serving):
    calls = {
        "ListModels": lambda: alice.stub.ListModels(pb.ListModelsRequest(), timeout=CALL_TIMEOUT),
        "GetModelInfo": lambda: alice.stub.GetModelInfo(pb.GetModelInfoRequest(model=MODEL), timeout=CALL_TIMEOUT),
        "Predict": lambda: alice.predict(alice.encrypt(images[0]), token=None),
        "PredictStream": lambda: alice.stream([alice.header()], token=None),
    }
    for call in calls.values():
        assert_status(rpc_error(call), Code.UNAUTHENTICATED, "missing 'authorization: Bearer")


def test_wrong_token_is_unauthenticated(alice, images, still_serving):
    err = rpc_error(lambda: alice.predict(alice.encrypt(images[0]), token="guessed-token"))
    assert_status(err, Code.UNAUTHENTICATED, "unknown bearer token")
    err = rpc_error(lambda: alice.stream([alice.header()], token="guessed-token"))
    assert_status(err, Code.UNAUTHENTICATED, "unknown bearer token")


def test_another_tenants_key_id_is_permission_denied(alice, bob, images, still_serving):
    err = rpc_error(lambda: bob.predict(bob.encrypt(images[0]), key_id=alice.key_id))
    assert_status(err, Code.PERMISSION_DENIED, "belongs to another tenant")


def test_another_tenants_key_id_in_a_stream_is_permission_denied_for_that_item(alice, bob, images, still_serving):
    answers = bob.stream([bob.header(), item("mine", bob.encrypt(images[0])),
                          item("theirs", bob.encrypt(images[1]), key_id=alice.key_id)])
    assert item_code(answers["mine"]) == Code.OK
    assert item_code(answers["theirs"]) == Code.PERMISSION_DENIED


# ---------------------------------------------------------------- streams: one bad item

def test_one_bad_item_fails_only_that_item(alice, images, stack, still_serving):
    answers = alice.stream([
        alice.header(),
        item("good-0", alice.encrypt(images[0])),
        item("random", os.urandom(20_000)),
        item("good-2", alice.encrypt(images[2])),
        item("empty", b""),
        item("unknown-key", alice.encrypt(images[3]), key_id="cd" * 32),
        item("good-4", alice.encrypt(images[4])),
    ])
    expected = {"good-0": Code.OK, "random": Code.INVALID_ARGUMENT, "good-2": Code.OK, "empty": Code.INVALID_ARGUMENT,
                "unknown-key": Code.NOT_FOUND, "good-4": Code.OK}
    assert {rid: item_code(a) for rid, a in answers.items()} == expected
    assert "empty" in answers["empty"].status.message
    for rid, index in (("good-0", 0), ("good-2", 2), ("good-4", 4)):
        scores = decrypt_latency(alice.secret, answers[rid].ciphertexts[0], alice.layout)
        assert_matches_plaintext(stack.model, images[index][None, :], scores[None, :])


def test_one_bad_batch_fails_only_that_batch(alice, images, batch_parts, stack, still_serving):
    bad = [os.urandom(5000)] + batch_parts[1:]

    def messages():
        yield alice.header(pb.LAYOUT_BATCH)
        yield from batch_messages(alice, bad, "bad")
        yield from batch_messages(alice, batch_parts, "good")
    answers = alice.stream(messages())
    assert item_code(answers["bad"]) == Code.INVALID_ARGUMENT
    assert "batch part 0" in answers["bad"].status.message
    assert item_code(answers["good"]) == Code.OK
    from encinfer.he.batch import decrypt_batch
    scores = decrypt_batch(alice.batch_secret, list(answers["good"].ciphertexts), 3, alice.batch_layout)
    assert_matches_plaintext(stack.model, images[:3], scores)


def test_interleaved_bad_and_good_batches_each_get_their_answer(alice, images, batch_parts, still_serving):
    bad = batch_parts[:5] + [os.urandom(5000)] + batch_parts[6:]

    def messages():
        yield alice.header(pb.LAYOUT_BATCH)
        for i, (b, g) in enumerate(zip(bad, batch_parts, strict=True)):
            yield part("bad", i, b)
            yield part("good", i, g)
    answers = alice.stream(messages())
    assert item_code(answers["bad"]) == Code.INVALID_ARGUMENT
    assert item_code(answers["good"]) == Code.OK


# ---------------------------------------------------------------- streams: batch protocol

def test_batch_parts_out_of_order_are_invalid_argument(alice, batch_parts, still_serving):
    answers = alice.stream([alice.header(pb.LAYOUT_BATCH), part("b", 0, batch_parts[0]),
                            part("b", 2, batch_parts[2]), part("b", 1, batch_parts[1])])
    assert item_code(answers["b"]) == Code.INVALID_ARGUMENT
    assert "batch part 2 arrived, expected part 1" in answers["b"].status.message


def test_batch_starting_past_part_zero_is_invalid_argument(alice, batch_parts, still_serving):
    answers = alice.stream([alice.header(pb.LAYOUT_BATCH), part("b", 7, batch_parts[7])])
    assert item_code(answers["b"]) == Code.INVALID_ARGUMENT
    assert "expected part 0" in answers["b"].status.message


def test_incomplete_batch_at_stream_end_is_invalid_argument(alice, batch_parts, still_serving):
    answers = alice.stream([alice.header(pb.LAYOUT_BATCH), *list(batch_messages(alice, batch_parts))[:10]])
    assert item_code(answers["b"]) == Code.INVALID_ARGUMENT
    assert f"stream ended after 10 of {len(batch_parts)} parts" in answers["b"].status.message


def test_too_many_open_batches_is_resource_exhausted(alice, batch_parts, stack, still_serving):
    limit = stack.inference_config.max_open_batches
    answers = alice.stream([alice.header(pb.LAYOUT_BATCH),
                            *(part(f"b{i}", 0, batch_parts[0]) for i in range(limit + 1))])
    assert item_code(answers[f"b{limit}"]) == Code.RESOURCE_EXHAUSTED
    assert f"at most {limit} batches" in answers[f"b{limit}"].status.message
    assert {item_code(answers[f"b{i}"]) for i in range(limit)} == {Code.INVALID_ARGUMENT}  # never completed


def test_batch_without_sample_count_is_invalid_argument(alice, batch_parts, still_serving):
    answers = alice.stream([alice.header(pb.LAYOUT_BATCH), part("b", 0, batch_parts[0], n_samples=0)])
    assert item_code(answers["b"]) == Code.INVALID_ARGUMENT
    assert "n_samples" in answers["b"].status.message


def test_batch_larger_than_the_layout_holds_is_invalid_argument(alice, batch_parts, still_serving):
    too_many = alice.batch_layout.max_samples + 1
    answers = alice.stream([alice.header(pb.LAYOUT_BATCH),
                            *(part("b", i, ct, n_samples=too_many) for i, ct in enumerate(batch_parts))])
    assert item_code(answers["b"]) == Code.INVALID_ARGUMENT
    assert f"1 to {alice.batch_layout.max_samples} samples" in answers["b"].status.message


def test_batch_parts_without_a_header_are_invalid_argument(alice, batch_parts, still_serving):
    answers = alice.stream([part("b", 0, batch_parts[0])])
    assert item_code(answers["b"]) == Code.INVALID_ARGUMENT
    assert "header with layout LAYOUT_BATCH" in answers["b"].status.message


def test_batch_parts_on_a_latency_stream_are_invalid_argument(alice, batch_parts, still_serving):
    answers = alice.stream([alice.header(pb.LAYOUT_LATENCY), part("b", 0, batch_parts[0])])
    assert item_code(answers["b"]) == Code.INVALID_ARGUMENT


def test_latency_item_without_header_needs_model_and_key(alice, images, still_serving):
    full = pb.PredictStreamRequest(item=pb.PredictRequest(request_id="full", model=MODEL, key_id=alice.key_id,
                                                          ciphertext=alice.encrypt(images[0])))
    answers = alice.stream([full, item("bare", alice.encrypt(images[1]))])
    assert item_code(answers["full"]) == Code.OK
    assert item_code(answers["bare"]) == Code.INVALID_ARGUMENT
    assert "model name is empty" in answers["bare"].status.message


def test_header_sent_twice_is_invalid_argument(alice, still_serving):
    err = rpc_error(lambda: alice.stream([alice.header(), alice.header()]))
    assert_status(err, Code.INVALID_ARGUMENT, "header")


def test_header_after_items_is_invalid_argument(alice, images, still_serving):
    err = rpc_error(lambda: alice.stream([
        pb.PredictStreamRequest(item=pb.PredictRequest(request_id="x", model=MODEL, key_id=alice.key_id,
                                                       ciphertext=alice.encrypt(images[0]))),
        alice.header()]))
    assert_status(err, Code.INVALID_ARGUMENT, "header must be the first message")


def test_header_without_layout_is_invalid_argument(alice, still_serving):
    header = pb.PredictStreamRequest(header=pb.StreamHeader(model=MODEL, key_id=alice.key_id))
    err = rpc_error(lambda: alice.stream([header]))
    assert_status(err, Code.INVALID_ARGUMENT, "LAYOUT_LATENCY or LAYOUT_BATCH")


def test_header_for_an_unknown_model_is_not_found(alice, still_serving):
    header = pb.PredictStreamRequest(header=pb.StreamHeader(model="nope", key_id=alice.key_id,
                                                            layout=pb.LAYOUT_LATENCY))
    err = rpc_error(lambda: alice.stream([header]))
    assert_status(err, Code.NOT_FOUND, "not served here")


def test_empty_stream_message_is_invalid_argument(alice, still_serving):
    err = rpc_error(lambda: alice.stream([alice.header(), pb.PredictStreamRequest()]))
    assert_status(err, Code.INVALID_ARGUMENT, "empty stream message")


def test_stream_with_no_messages_ends_cleanly(alice, still_serving):
    assert alice.stream([]) == {}


# ---------------------------------------------------------------- cancellation and deadlines

def held_open(first: list[pb.PredictStreamRequest], gate: threading.Event) -> Iterator[pb.PredictStreamRequest]:
    """Sends `first`, then keeps the stream open until the gate opens."""
    yield from first
    gate.wait(CALL_TIMEOUT)


@pytest.mark.parametrize("parts_sent", [1, 6])
def test_cancelled_stream_frees_its_open_batch_in_the_worker(alice, batch_parts, stack, parts_sent, still_serving):
    gate = threading.Event()
    call = alice.stub.PredictStream(
        held_open([alice.header(pb.LAYOUT_BATCH), *list(batch_messages(alice, batch_parts))[:parts_sent]], gate),
        metadata=auth(ALICE), timeout=CALL_TIMEOUT)
    try:
        assert wait_for(lambda: sum(stack.open_batches()) == 1)
        call.cancel()
    finally:
        gate.set()
    assert wait_for(lambda: sum(stack.open_batches()) == 0), stack.open_batches()
    assert rpc_error(lambda: list(call)).code() == Code.CANCELLED


def test_stream_cancelled_at_once_leaves_no_batch_open(alice, batch_parts, stack, still_serving):
    # Cancel while the batch may still be starting in the worker (key check, key fetch, batch_start).
    for _ in range(5):
        gate = threading.Event()
        call = alice.stub.PredictStream(held_open([alice.header(pb.LAYOUT_BATCH), part("b", 0, batch_parts[0])],
                                                  gate), metadata=auth(ALICE), timeout=CALL_TIMEOUT)
        call.cancel()
        gate.set()
    assert wait_for(lambda: sum(stack.open_batches()) == 0), stack.open_batches()


def test_stream_past_its_deadline_is_deadline_exceeded_and_frees_its_batch(alice, batch_parts, stack, still_serving):
    gate = threading.Event()
    try:
        err = rpc_error(lambda: list(alice.stub.PredictStream(
            held_open([alice.header(pb.LAYOUT_BATCH), *list(batch_messages(alice, batch_parts))[:4]], gate),
            metadata=auth(ALICE), timeout=1.5)))
    finally:
        gate.set()
    assert err.code() == Code.DEADLINE_EXCEEDED
    assert wait_for(lambda: sum(stack.open_batches()) == 0), stack.open_batches()


def test_cancelled_latency_stream_leaves_the_server_serving(alice, images, still_serving):
    gate = threading.Event()
    call = alice.stub.PredictStream(held_open([alice.header(), *(item(str(i), alice.encrypt(x))
                                                                  for i, x in enumerate(images))], gate),
                                    metadata=auth(ALICE), timeout=CALL_TIMEOUT)
    next(call)  # the first answer is back: the rest are in flight
    call.cancel()
    gate.set()


# ---------------------------------------------------------------- the key store going away

def test_stopped_key_store_is_unavailable_for_an_uncached_key_then_recovers(alice, images, stack, still_serving):
    secret = SecretKeys.generate(alice.layout.params)
    key_id = upload(alice, secret)  # uploaded, never used: the inference service has not cached it
    ct = encrypt_latency(secret, images[0], alice.layout)
    stack.stop_keystore()
    try:
        err = rpc_error(lambda: alice.predict(ct, key_id=key_id))
        assert_status(err, Code.UNAVAILABLE, "key store is unreachable")
        # A key the service already holds keeps working while the key store is down.
        reply = alice.predict(alice.encrypt(images[1]))
        assert decrypt_latency(alice.secret, reply.ciphertexts[0], alice.layout).shape == (10,)
    finally:
        stack.start_keystore()  # same port and data; the inference service is not restarted

    def answers() -> bool:
        try:
            alice.predict(ct, key_id=key_id, timeout=5)
            return True
        except grpc.RpcError as e:
            assert e.code() == Code.UNAVAILABLE, e.details()
            return False
    assert wait_for(answers, timeout=30)
    scores = decrypt_latency(secret, alice.predict(ct, key_id=key_id).ciphertexts[0], alice.layout)
    assert_matches_plaintext(stack.model, images[:1], scores[None, :])


@pytest.fixture(scope="module")
def hung_keystore_stack(mnist_model, tmp_path_factory):
    """Inference (in-process compute) whose key store accepts connections and never answers."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    stem, model = mnist_model
    stack = start_stack(stem, model, tmp_path_factory.mktemp("hung"),
                        keystore_target=f"127.0.0.1:{hole.getsockname()[1]}", workers=0, keystore_timeout=2.0)
    yield stack
    stack.close()
    hole.close()


def hung_predict(stack, timeout: float) -> grpc.RpcError:
    stub = stack.stub()
    return rpc_error(lambda: stub.Predict(pb.PredictRequest(model=MODEL, key_id="ef" * 32, ciphertext=b"x"),
                                          metadata=auth(ALICE), timeout=timeout))


def test_client_deadline_is_honoured_while_the_key_store_hangs(hung_keystore_stack):
    assert hung_predict(hung_keystore_stack, timeout=0.5).code() == Code.DEADLINE_EXCEEDED
    reply = hung_keystore_stack.stub().ListModels(pb.ListModelsRequest(), metadata=auth(ALICE), timeout=CALL_TIMEOUT)
    assert [m.name for m in reply.models] == [MODEL]  # still serving


def test_hung_key_store_is_unavailable_after_the_services_own_timeout(hung_keystore_stack):
    err = hung_predict(hung_keystore_stack, timeout=CALL_TIMEOUT)
    assert_status(err, Code.UNAVAILABLE, "key store is unreachable")


def test_cancelled_stream_leaves_no_task_behind_on_the_server(alice, images, stack, still_serving):
    async def tasks() -> list[str]:
        return sorted(t.get_coro().__qualname__ for t in asyncio.all_tasks() if t is not asyncio.current_task())
    baseline = stack.on_server_loop(tasks())
    gate = threading.Event()
    call = alice.stub.PredictStream(held_open([alice.header(), item("0", alice.encrypt(images[0]), key_id="cd" * 32)],
                                              gate), metadata=auth(ALICE), timeout=CALL_TIMEOUT)
    assert next(call).status.code == Code.NOT_FOUND.value[0]
    call.cancel()
    gate.set()
    assert wait_for(lambda: stack.on_server_loop(tasks()) == baseline), stack.on_server_loop(tasks())


# ---------------------------------------------------------------- storage and worker failures

def test_key_corrupted_in_storage_is_data_loss(alice, images, stack, still_serving):
    secret = SecretKeys.generate(alice.layout.params)
    key_id = upload(alice, secret)  # never used: the inference service must fetch it
    stored = stack.keystore.store.backend.objects / "keys" / key_id  # the bytes (records live elsewhere)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    err = rpc_error(lambda: alice.predict(encrypt_latency(secret, images[0], alice.layout), key_id=key_id))
    assert_status(err, Code.DATA_LOSS, "corrupted; upload it again")


def test_worker_killed_while_idle_is_replaced_without_failing_a_request(alice, images, stack, still_serving):
    import signal
    import time
    pool = stack.inference.server.pool
    victim = pool.worker_pids()[0]  # the worker that serves idle-time requests first
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.2)  # let it die: the next call finds a broken worker, replaces it and runs again there
    for x in images[:4]:
        reply = alice.predict(alice.encrypt(x))
        assert decrypt_latency(alice.secret, reply.ciphertexts[0], alice.layout).shape == (10,)
    assert victim not in pool.worker_pids()


def test_worker_killed_during_a_batch_fails_that_batch_with_unavailable(alice, batch_parts, stack, still_serving):
    import signal
    messages = [alice.header(pb.LAYOUT_BATCH), *batch_messages(alice, batch_parts)]
    gate = threading.Event()

    def requests():
        yield from messages[:7]
        gate.wait(CALL_TIMEOUT)  # the batch is open in a worker: kill that worker, then send the rest
        yield from messages[7:]
    call = alice.stub.PredictStream(requests(), metadata=auth(ALICE), timeout=CALL_TIMEOUT)
    try:
        assert wait_for(lambda: sum(stack.open_batches()) == 1)
        worker = stack.open_batches().index(1)
        os.kill(stack.inference.server.pool.worker_pids()[worker], signal.SIGKILL)
    finally:
        gate.set()
    [answer] = list(call)
    assert item_code(answer) == Code.UNAVAILABLE
    assert "worker stopped" in answer.status.message
