"""HE work in worker processes.

TenSEAL's bindings hold the GIL, so threads give no parallel HE work. The server
process does all gRPC I/O on asyncio and hands each computation to one of N
single-process executors (spawned, never forked: grpc issue 16001). Each worker
loads the models itself and keeps its own byte-bounded cache of deserialized
keys; when it lacks a key it says so (KeyMissing) and the server resends it with
the bytes. A batch is pinned to one worker, since its running sums live there;
single items go to the least-loaded worker, so one connection uses every core.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Awaitable, Callable

from encinfer.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


class KeyMissing(Exception):
    """The worker has no deserialized copy of this key: send the bytes."""


# ---------------------------------------------------------------- worker side
# Module state of one worker process (or of the server itself with workers=0).
_models: dict = {}
_keys = None
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


def describe() -> list[dict]:
    return [m.describe() for m in _models.values()]


def _server_keys(model: Any, layout: str, key_id: str, key_bytes: bytes | None) -> Any:
    from encinfer.he.keys import load_key_bundle

    params = model.params(layout)
    slot = (key_id, params.manifest_sha256())
    keys = _keys.get(slot)
    if keys is None:
        if key_bytes is None:
            raise KeyMissing(key_id)
        keys = load_key_bundle(key_bytes, params)
        _keys.put(slot, keys)
    return keys


def predict_latency(model_name: str, key_id: str, key_bytes: bytes | None, ciphertext: bytes) -> tuple[bytes, float]:
    from encinfer.inference.catalog import find

    start = time.perf_counter()
    model = find(_models, model_name)
    keys = _server_keys(model, "latency", key_id, key_bytes)
    result = model.latency.evaluate(keys, ciphertext)
    return result, (time.perf_counter() - start) * 1000


def batch_start(batch_id: str, model_name: str, key_id: str, key_bytes: bytes | None, n_samples: int) -> None:
    from encinfer.inference.catalog import find

    model = find(_models, model_name)
    _server_keys(model, "batch", key_id, key_bytes)  # parameters checked before any compute
    _batches[batch_id] = (model.batch.start(n_samples), time.perf_counter(), [0.0])


def batch_add(batch_id: str, parts: list[tuple[int, bytes]]) -> None:
    """Adds several parts per call: one executor round trip costs about as much as a part."""
    entry = _batches.get(batch_id)
    if entry is None:
        raise NotFound(f"batch {batch_id!r} is not open (failed or finished before)")
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
        raise NotFound(f"batch {batch_id!r} is not open (failed or finished before)")
    acc, _, busy = entry
    start = time.perf_counter()
    out = acc.finish()
    busy[0] += time.perf_counter() - start
    return out, busy[0] * 1000


def batch_abort(batch_id: str) -> None:
    _batches.pop(batch_id, None)


def open_batches() -> int:
    return len(_batches)


# ---------------------------------------------------------------- server side
class WorkerPool:
    """N single-process executors; 0 means compute in the calling process."""

    def __init__(self, model_paths: list[str] | tuple[str, ...], workers: int, key_cache_bytes: int) -> None:
        self.model_paths = list(model_paths)
        self.n = workers
        self.key_cache_bytes = key_cache_bytes
        self._executors: list[Executor | None] = []
        self.load: list[int] = []
        self.models: list[dict] = []

    async def start(self) -> None:
        if self.n == 0:
            init_worker(self.model_paths, self.key_cache_bytes, "inline")
            self.load = [0]
        else:
            self._executors = [self._new_executor(i) for i in range(self.n)]
            self.load = [0] * self.n
        # Every worker loads and pre-encodes the models now, not on the first request.
        infos = await asyncio.gather(*(self.call(i, describe) for i in range(len(self.load))))
        self.models = infos[0]

    def _new_executor(self, index: int) -> Executor:
        return ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker, initargs=(self.model_paths, self.key_cache_bytes, f"{os.getpid()}-{index}"))

    def pick(self) -> int:
        return min(range(len(self.load)), key=self.load.__getitem__)

    async def call(self, index: int, fn: Callable[..., Any], *args: Any, retry: bool = False) -> Any:
        """Runs fn(*args) on worker `index`. A dead worker is replaced; with `retry` (for
        stateless calls) the call runs once more on the new one, so a worker that died
        while idle costs no request."""
        self.load[index] += 1
        try:
            if self.n == 0:
                return fn(*args)
            loop = asyncio.get_running_loop()
            for attempt in (1, 2):
                executor = self._executors[index]
                try:
                    return await loop.run_in_executor(executor, fn, *args)
                except BrokenProcessPool:
                    if self._executors[index] is executor:
                        log.error("worker process died; starting a new one", extra={"fields": {"worker": index}})
                        self._executors[index] = self._new_executor(index)
                        executor.shutdown(wait=False, cancel_futures=True)
                    if not retry or attempt == 2:
                        raise Unavailable("an inference worker stopped while computing; retry the request") from None
        finally:
            self.load[index] -= 1

    async def with_key(self, index: int, fetch: Callable[[], Awaitable[bytes]], fn: Callable[..., Any],
                       head: tuple, tail: tuple = ()) -> Any:
        """Calls fn(*head, key_bytes, *tail), sending the key bytes only if the worker lacks them."""
        retry = fn is predict_latency  # stateless: safe to run again on a replaced worker
        try:
            return await self.call(index, fn, *head, None, *tail, retry=retry)
        except KeyMissing:
            return await self.call(index, fn, *head, await fetch(), *tail, retry=retry)

    async def close(self) -> None:
        for ex in self._executors:
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
        self._executors = []


def check_batch_count(open_batches: int, limit: int) -> None:
    if open_batches >= limit:
        raise ResourceExhausted(f"at most {limit} batches may be open at once on one stream; "
                                "finish one (send its last part) before starting another")


def check_position(position: int, expected: int, total: int) -> None:
    if position != expected:
        raise InvalidArgument(f"batch part {position} arrived, expected part {expected} of {total} "
                              "(parts of a batch are sent in order)")
