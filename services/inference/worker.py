"""An inference worker process: loads the models, keeps a byte-bounded cache of
deserialized keys, and runs the HE calls the server sends it over its socket.

TenSEAL's bindings hold the GIL, so the server hands HE work to worker processes
(encinfer.inference.pool), each a fresh interpreter (never forked: grpc issue 16001).
A worker that lacks a key says so (KeyMissing) and the server resends it with the bytes;
a batch's running sums live in the one worker it is pinned to.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import time
from typing import TYPE_CHECKING, Any

from encinfer.common.errors import Unavailable

if TYPE_CHECKING:
    from encinfer.inference.cache import ByteLRU
    from encinfer.modelinfo import ModelDescription

log = logging.getLogger(__name__)


class KeyMissing(Exception):
    """The worker has no deserialized copy of this key: send the bytes."""


# ---------------------------------------------------------------- worker side
# Module state of one worker process (or of the server itself with workers=0).
_models: dict = {}
_keys: ByteLRU[tuple, Any] | None = None  # set by init_worker()
_batches: dict = {}
_name = "inline"


def init_worker(model_paths: list[str], key_cache_bytes: int, name: str) -> None:
    global _models, _keys, _name
    from encinfer.common import logs
    from encinfer.inference.cache import ByteLRU
    from encinfer.inference.catalog import load_catalog

    logs.configure()
    if name != "inline":
        # The server stops its workers itself, after draining: a Ctrl-C or SIGTERM sent to
        # the whole process group must not kill the work in flight.
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # One BLAS thread per worker: the workers already use every core, and nested
    # BLAS threads on a busy 2-core machine made numpy work up to 100x slower.
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    _name = name
    _models = load_catalog(model_paths)
    _keys = ByteLRU(key_cache_bytes, size_of=lambda k: k.nbytes, name=f"worker-{name}")


def die_with_parent(parent_pid: int) -> None:
    """A worker ignores SIGTERM, so it must not outlive a server that was SIGKILLed: Linux
    sends it SIGKILL when the server goes (PR_SET_PDEATHSIG). Elsewhere the worker still
    exits at its next read, when it sees EOF on its socket."""
    import signal
    import sys
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the server died before prctl took effect
        os._exit(0)


def describe() -> list[ModelDescription]:
    return [m.describe() for m in _models.values()]


def _server_keys(model: Any, layout: str, key_id: str, key_bytes: bytes | None) -> Any:
    from encinfer.he.keys import load_key_bundle

    slot = (key_id, model.manifests[layout])
    assert _keys is not None  # init_worker() ran first
    keys = _keys.get(slot)
    if keys is None:
        if key_bytes is None:
            raise KeyMissing(key_id)
        keys = load_key_bundle(key_bytes, model.params(layout))
        _keys.put(slot, keys)
    return keys


def predict_latency(model_name: str, key_id: str, key_bytes: bytes | None, ciphertext: bytes) -> tuple[bytes, float]:
    from encinfer.inference.catalog import find

    start = time.perf_counter()
    model = find(_models, model_name)
    keys = _server_keys(model, "latency", key_id, key_bytes)
    zeros = _public_keys(model, "latency", key_id, key_bytes)
    result = model.latency.evaluate(keys, ciphertext, zeros)
    _drew_from(zeros)
    return result, (time.perf_counter() - start) * 1000


def _public_keys(model: Any, layout: str, key_id: str, key_bytes: bytes | None) -> Any:
    """The public key and its pool of encryptions of zero (answers are re-randomized with them)."""
    from encinfer.he.coeff import POOL_SIZE, load_coeff_keys

    slot = (key_id, model.manifests[layout], "public")  # apart from ServerKeys: manifests may coincide
    assert _keys is not None  # init_worker() ran first
    keys = _keys.get(slot)
    if keys is None:
        if key_bytes is None:
            raise KeyMissing(key_id)
        # A batch takes one per output; a coefficient answer one per product, a rotation answer one.
        pool = 2 * model.artifact.n_outputs if layout == "batch" else POOL_SIZE
        keys = load_coeff_keys(key_bytes, model.params(layout), pool_size=pool)
        _keys.put(slot, keys)
    return keys


def _drew_from(keys: Any) -> None:
    if keys in _refill:
        _refill.remove(keys)
    _refill.append(keys)
    del _refill[:-_REFILL_KEYS]


def predict_coeff(model_name: str, key_id: str, key_bytes: bytes | None, ciphertext: bytes) -> tuple[bytes, float]:
    """The coefficient layout: the answer is re-randomized with encryptions of zero that
    `refill_idle` prepared while the worker had nothing else to do."""
    from encinfer.inference.catalog import find

    start = time.perf_counter()
    model = find(_models, model_name)
    keys = _public_keys(model, "coeff", key_id, key_bytes)
    result = model.coeff.evaluate(keys, ciphertext)
    _drew_from(keys)
    return result, (time.perf_counter() - start) * 1000


def preload_key(predict_fn: str, model_name: str, key_id: str, key_bytes: bytes) -> None:
    """Loads a key another worker was just sent, ahead of this worker's first request with
    it; its encryptions of zero are then made while this worker is idle."""
    from encinfer.inference.catalog import find

    model = find(_models, model_name)
    layout = "latency" if predict_fn == predict_latency.__name__ else "coeff"
    if layout == "latency":  # the rotation layout's Galois keys too
        _server_keys(model, layout, key_id, key_bytes)
    _drew_from(_public_keys(model, layout, key_id, key_bytes))


# Key sets whose pools of encryptions of zero were drawn from, most recent last (a few).
_refill: list = []
_REFILL_KEYS = 16


def zero_pools() -> list[tuple[int, int]]:
    """(ready, wanted) encryptions of zero of each recently used key: tests and metrics."""
    return [(keys.pooled(), keys.pool_size) for keys in _refill]


def refill_idle() -> bool:
    """One step of idle work: one encryption of zero for the most recently used key; False when none is due."""
    return any(keys.refill(1) for keys in reversed(_refill))


def batch_start(batch_id: str, model_name: str, key_id: str, key_bytes: bytes | None, n_samples: int) -> None:
    from encinfer.inference.catalog import find

    model = find(_models, model_name)
    _server_keys(model, "batch", key_id, key_bytes)  # parameters checked before any compute
    zeros = _public_keys(model, "batch", key_id, key_bytes)
    _batches[batch_id] = (model.batch.start(n_samples, zeros), time.perf_counter(), [0.0])


def batch_add(batch_id: str, parts: list[tuple[int, bytes]]) -> None:
    """Adds several parts per call: one executor round trip costs about as much as a part."""
    entry = _batches.get(batch_id)
    if entry is None:
        raise Unavailable(f"batch {batch_id!r} is not open here: the worker that held it restarted; "
                          "send the batch again")
    acc, _, busy = entry
    start = time.perf_counter()
    try:
        for position, ciphertext in parts:
            acc.add(position, ciphertext)
    except Exception:
        _batches.pop(batch_id, None)
        raise
    busy[0] += time.perf_counter() - start


def batch_finish(batch_id: str) -> tuple[list[bytes], float]:
    entry = _batches.pop(batch_id, None)
    if entry is None:
        raise Unavailable(f"batch {batch_id!r} is not open here: the worker that held it restarted; "
                          "send the batch again")
    acc, _, busy = entry
    start = time.perf_counter()
    out = acc.finish()
    busy[0] += time.perf_counter() - start
    _drew_from(acc.zeros)
    return out, busy[0] * 1000


def batch_abort(batch_id: str) -> None:
    _batches.pop(batch_id, None)


def open_batches() -> int:
    return len(_batches)


# The command a worker runs: a fresh interpreter, not multiprocessing's spawn, so there is no
# resource-tracker process and no exit-time join of children that could hang the server's exit.
WORKER_CODE = "from encinfer.inference.worker import worker_entry; worker_entry()"


def worker_entry() -> None:
    """`python -c WORKER_CODE SPEC`: SPEC is JSON with the socket's fd and worker_main's arguments."""
    from multiprocessing.connection import Connection

    from encinfer.common import logs
    logs.configure()
    spec = json.loads(sys.argv[-1])
    worker_main(Connection(spec["fd"]), spec["models"], spec["key_cache_bytes"], spec["name"], spec["parent"])


def worker_main(conn: Any, model_paths: list[str], key_cache_bytes: int, name: str, parent_pid: int = 0) -> None:
    """A worker process: calls arrive in order on one socket, answers go back on it.

    It ends quietly when the server closes its end (EOF) or goes away mid-answer (EPIPE):
    that is how a server stops its workers, never an error worth a traceback."""
    if parent_pid:
        die_with_parent(parent_pid)
    try:
        init_worker(model_paths, key_cache_bytes, name)
    except BaseException as e:  # noqa: BLE001 - one JSON line, not a traceback
        log.error("inference worker cannot start", extra={"fields": {"worker": name, "error": str(e)}})
        os._exit(1)
    while True:
        # Idle: prepare encryptions of zero (bounded: each pool fills up), one at a time so a
        # call that arrives waits at most one encryption (~0.2 ms).
        while not conn.poll(0) and refill_idle():
            pass
        try:
            call_id, fn, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the server closed its end: exit
        try:
            answer = (call_id, True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - every outcome goes back to the caller
            answer = (call_id, False, e)
        try:
            payload = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - an unpicklable result or error
            payload = pickle.dumps((call_id, False, RuntimeError(f"worker result not picklable: {e!r}")))
        try:
            conn.send_bytes(payload)
        except OSError:  # BrokenPipeError, ConnectionResetError: the server is gone
            return
