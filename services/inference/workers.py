"""HE work in worker processes.

TenSEAL's bindings hold the GIL, so threads give no parallel HE work. The server
process does all gRPC I/O on asyncio and hands each computation to one of N
worker processes (spawned, never forked: grpc issue 16001) over a socket each. Each worker
loads the models itself and keeps its own byte-bounded cache of deserialized
keys; when it lacks a key it says so (KeyMissing) and the server resends it with
the bytes. A batch is pinned to one worker, since its running sums live there;
single items go to the least-loaded worker, so one connection uses every core.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import socket
import struct
import time
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

    slot = (key_id, model.manifests[layout])
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
    _drew_from(acc.zeros)
    return out, busy[0] * 1000


def batch_abort(batch_id: str) -> None:
    _batches.pop(batch_id, None)


def open_batches() -> int:
    return len(_batches)


def worker_main(conn: Any, model_paths: list[str], key_cache_bytes: int, name: str) -> None:
    """A worker process: calls arrive in order on one socket, answers go back on it."""
    init_worker(model_paths, key_cache_bytes, name)
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
        conn.send_bytes(payload)


# ---------------------------------------------------------------- server side
class WorkerDied(Exception):
    """The worker process exited (killed, crashed) with calls in flight."""


class _Worker:
    """One spawned process and a socket to it, driven by the server's event loop.

    Calls are framed like multiprocessing's Connection (4-byte length, pickle), so the
    worker side stays a plain blocking loop, while this side never blocks the loop and
    needs no helper threads: about 0.1 ms per round trip, against about 0.9 ms through
    a ProcessPoolExecutor (feeder and result threads, two queue hops).
    """

    def __init__(self, index: int, model_paths: list[str], key_cache_bytes: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC
        parent, child = ctx.Pipe(duplex=True)      # a socket pair on POSIX
        self.process = ctx.Process(target=worker_main, name=f"encinfer-worker-{index}", daemon=True,
                                   args=(child, model_paths, key_cache_bytes, f"{os.getpid()}-{index}"))
        self.process.start()
        child.close()
        self._sock = socket.socket(fileno=os.dup(parent.fileno()))
        parent.close()
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self.dead = False

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=1 << 20)
        self._read_task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                (size,) = struct.unpack("!i", await self._reader.readexactly(4))
                if size == -1:
                    (size,) = struct.unpack("!Q", await self._reader.readexactly(8))
                call_id, ok, value = pickle.loads(await self._reader.readexactly(size))
                fut = self._pending.pop(call_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(value) if ok else fut.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.dead = True
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(WorkerDied())
            self._pending.clear()

    async def call(self, fn: Callable[..., Any], args: tuple) -> Any:
        if self.dead:
            raise WorkerDied()
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        payload = pickle.dumps((call_id, fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        header = struct.pack("!i", len(payload)) if len(payload) < 0x7FFFFFFF else struct.pack("!iQ", -1, len(payload))
        try:
            self._writer.write(header + payload)
            await self._writer.drain()  # back-pressure when the worker falls behind
        except (ConnectionError, OSError):
            self._pending.pop(call_id, None)
            raise WorkerDied() from None
        return await fut

    async def close(self, timeout: float = 10.0) -> None:
        self._writer.close()  # the worker sees EOF and exits
        await asyncio.to_thread(self.process.join, timeout)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 5)
        self._read_task.cancel()


class WorkerPool:
    """N worker processes; 0 means compute in the calling process."""

    def __init__(self, model_paths: list[str] | tuple[str, ...], workers: int, key_cache_bytes: int) -> None:
        self.model_paths = list(model_paths)
        self.n = workers
        self.key_cache_bytes = key_cache_bytes
        self._workers: list[_Worker] = []
        self.load: list[int] = []
        self.models: list[dict] = []

    async def start(self) -> None:
        if self.n == 0:
            init_worker(self.model_paths, self.key_cache_bytes, "inline")
            self.load = [0]
        else:
            self._workers = [await self._new_worker(i) for i in range(self.n)]
            self.load = [0] * self.n
        # Every worker loads and pre-encodes the models now, not on the first request.
        infos = await asyncio.gather(*(self.call(i, describe) for i in range(len(self.load))))
        self.models = infos[0]

    async def _new_worker(self, index: int) -> _Worker:
        worker = _Worker(index, self.model_paths, self.key_cache_bytes)
        await worker.open()
        return worker

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def pick(self) -> int:
        """The least-loaded worker; ties go round-robin, so a worker that just answered (and is
        making encryptions of zero for the next answers) is the last one asked."""
        n = len(self.load)
        self._turn = (getattr(self, "_turn", -1) + 1) % n
        return min(((self._turn + k) % n for k in range(n)), key=self.load.__getitem__)

    async def call(self, index: int, fn: Callable[..., Any], *args: Any, retry: bool = False) -> Any:
        """Runs fn(*args) on worker `index`. A dead worker is replaced; with `retry` (for
        stateless calls) the call runs once more on the new one, so a worker that died
        while idle costs no request."""
        self.load[index] += 1
        try:
            if self.n == 0:
                return fn(*args)
            for attempt in (1, 2):
                worker = self._workers[index]
                try:
                    return await worker.call(fn, args)
                except WorkerDied:
                    if self._workers[index] is worker:
                        log.error("worker process died; starting a new one", extra={"fields": {
                            "worker": index, "exitcode": worker.process.exitcode}})
                        self._workers[index] = await self._new_worker(index)
                        asyncio.ensure_future(worker.close(timeout=1))
                    if not retry or attempt == 2:
                        raise Unavailable("an inference worker stopped while computing; retry the request") from None
        finally:
            self.load[index] -= 1

    async def with_key(self, index: int, fetch: Callable[[], Awaitable[bytes]], fn: Callable[..., Any],
                       head: tuple, tail: tuple = ()) -> Any:
        """Calls fn(*head, key_bytes, *tail), sending the key bytes only if the worker lacks them."""
        retry = fn in (predict_latency, predict_coeff)  # stateless: safe to run again on a replaced worker
        try:
            return await self.call(index, fn, *head, None, *tail, retry=retry)
        except KeyMissing:
            return await self.call(index, fn, *head, await fetch(), *tail, retry=retry)

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self._workers), return_exceptions=True)
        self._workers = []


def check_batch_count(open_batches: int, limit: int) -> None:
    if open_batches >= limit:
        raise ResourceExhausted(f"at most {limit} batches may be open at once on one stream; "
                                "finish one (send its last part) before starting another")


def check_position(position: int, expected: int, total: int) -> None:
    if position != expected:
        raise InvalidArgument(f"batch part {position} arrived, expected part {expected} of {total} "
                              "(parts of a batch are sent in order)")
