"""HE work in worker processes.

TenSEAL's bindings hold the GIL, so threads give no parallel HE work. The server
process does all gRPC I/O on asyncio and hands each computation to one of N
worker processes (started as fresh interpreters, never forked: grpc issue 16001) over a socket each. Each worker
loads the models itself and keeps its own byte-bounded cache of deserialized
keys; when it lacks a key it says so (KeyMissing) and the server resends it with
the bytes. A batch is pinned to one worker, since its running sums live there;
single items go to the least-loaded worker, so one connection uses every core.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
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


# The command a worker runs: a fresh interpreter, not multiprocessing's spawn, so there is no
# resource-tracker process and no exit-time join of children that could hang the server's exit.
WORKER_CODE = "from encinfer.inference.workers import worker_entry; worker_entry()"


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

    def __init__(self, index: int, model_paths: list[str], key_cache_bytes: int,
                 on_exit: Callable[["_Worker"], None] | None = None) -> None:
        parent, child = socket.socketpair()
        self.index = index
        spec = {"fd": child.fileno(), "models": list(model_paths), "key_cache_bytes": key_cache_bytes,
                "name": f"{os.getpid()}-{index}", "parent": os.getpid()}
        try:
            # fork+exec of a new interpreter (never a bare fork of a process that runs gRPC).
            self.process = subprocess.Popen([sys.executable, "-c", WORKER_CODE, f"encinfer-worker-{index}",
                                             json.dumps(spec)], pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        _started.add(self.process)
        self._sock = parent
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._on_exit = on_exit
        self.dead = False
        self.ready = False  # set by the pool once the worker has loaded its models
        # (function, model, key id) this worker was sent the key bytes for: the next call
        # goes without them (a worker that evicted one answers KeyMissing once).
        self.holds = KeysHeld()

    @property
    def pid(self) -> int:
        return self.process.pid

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=1 << 20)
        self._read_task = asyncio.create_task(self._read(), name=f"encinfer-worker-{self.index}-reader")

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
            if self._on_exit is not None:
                self._on_exit(self)

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

    async def close(self, timeout: float = 3.0) -> None:
        """EOF first (the worker finishes its call and exits), SIGKILL after `timeout`, and
        always a wait: no zombie, no orphan."""
        self._on_exit = None
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
        if not await asyncio.to_thread(_reaped, self.process, timeout):
            self.process.kill()
            await asyncio.to_thread(_reaped, self.process, 5.0)
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)


# Every worker process this process started and has not reaped yet.
_started: set[subprocess.Popen] = set()


def _reaped(process: subprocess.Popen, timeout: float) -> bool:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    _started.discard(process)
    return True


def kill_workers(timeout: float = 5.0) -> None:
    """Last resort before the server process exits: SIGKILL and reap every worker still
    there (a worker ignores SIGTERM, and one left running would outlive the server)."""
    for process in list(_started):
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + timeout
    for process in list(_started):
        _reaped(process, max(0.0, deadline - time.monotonic()))


class KeysHeld:
    """The keys a worker was sent, as the pool remembers them: bounded (oldest forgotten first,
    which costs at most one KeyMissing trip), since the worker's own cache is bounded too."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._slots: dict[tuple, None] = {}

    def __contains__(self, slot: tuple) -> bool:
        return slot in self._slots

    def add(self, slot: tuple) -> None:
        self._slots.pop(slot, None)
        self._slots[slot] = None
        if len(self._slots) > self.LIMIT:
            del self._slots[next(iter(self._slots))]

    def discard(self, slot: tuple) -> None:
        self._slots.pop(slot, None)


class WorkerPool:
    """N worker processes; 0 means compute in the calling process.

    A slot whose worker died gets exactly one replacement, however many calls saw it die:
    the first to notice (the worker's reader, or a call) starts it, every other waits for it."""

    def __init__(self, model_paths: list[str] | tuple[str, ...], workers: int, key_cache_bytes: int) -> None:
        self.model_paths = list(model_paths)
        self.n = workers
        self.key_cache_bytes = key_cache_bytes
        self._workers: list[_Worker] = []
        self._replacing: dict[int, asyncio.Task] = {}
        self._closing = False
        self.load: list[int] = []
        self.models: list[dict] = []
        self.replacements = 0
        self._inline_holds = KeysHeld()
        self._spawned: set[subprocess.Popen] = set()  # every process this pool started

    async def start(self) -> None:
        if self.n == 0:
            init_worker(self.model_paths, self.key_cache_bytes, "inline")
            self.load = [0]
            self.models = describe()
            return
        self.load = [0] * self.n
        try:
            for i in range(self.n):
                self._workers.append(await self._spawn(i))
            # Every worker loads and pre-encodes the models now, not on the first request.
            infos = await asyncio.gather(*(self._ready(w) for w in self._workers))
        except BaseException:
            await self.close()
            raise
        self.models = infos[0]

    async def _spawn(self, index: int) -> _Worker:
        worker = _Worker(index, self.model_paths, self.key_cache_bytes, on_exit=self._worker_exited)
        self._spawned.add(worker.process)
        try:
            await worker.open()
        except BaseException:
            await worker.close(timeout=0)
            raise
        return worker

    async def _ready(self, worker: _Worker) -> list[dict]:
        """Waits until the worker has loaded its models (its first call answers)."""
        try:
            infos = await worker.call(describe, ())
        except WorkerDied:
            await worker.close(timeout=1)
            raise Unavailable(f"an inference worker exited while loading the models (exit code "
                              f"{worker.process.returncode}); its log line says why") from None
        worker.ready = True
        return infos

    def _worker_exited(self, worker: _Worker) -> None:
        """The worker's reader saw its socket close: replace it now, not at the next call.
        A worker that never got ready is replaced on demand only, so a worker that cannot
        start does not respawn in a loop."""
        if worker.ready and not self._closing:
            self._replace(worker.index, worker)

    def _replace(self, index: int, dead: _Worker) -> asyncio.Task | None:
        """The one replacement task of slot `index` (None when `dead` was already replaced)."""
        task = self._replacing.get(index)
        if task is None and self._workers[index] is dead and not self._closing:
            task = asyncio.get_running_loop().create_task(self._respawn(index, dead),
                                                          name=f"encinfer-worker-{index}-respawn")
            self._replacing[index] = task
            task.add_done_callback(lambda t: self._replaced(index, t))
        return task

    def _replaced(self, index: int, task: asyncio.Task) -> None:
        self._replacing.pop(index, None)
        if not task.cancelled() and task.exception() is not None:  # retrieved: waiters got Unavailable
            log.error("inference worker could not be restarted; the next call tries again", extra={"fields": {
                "worker": index, "error": str(task.exception())}})

    async def _respawn(self, index: int, dead: _Worker) -> None:
        noticed = time.monotonic()
        await dead.close(timeout=1)  # reap it: no zombie
        log.error("inference worker died; starting a new one", extra={"fields": {
            "worker": index, "pid": dead.pid, "exitcode": dead.process.returncode}})
        worker = await self._spawn(index)
        try:
            await self._ready(worker)
        except BaseException:  # cancelled by close(), or it died while loading
            await worker.close(timeout=0)
            raise
        if self._closing:
            await worker.close(timeout=1)
            return
        self._workers[index] = worker
        self.replacements += 1
        log.info("inference worker replaced", extra={"fields": {
            "worker": index, "pid": worker.pid, "seconds": round(time.monotonic() - noticed, 3)}})

    async def _live(self, index: int) -> _Worker:
        """The slot's worker, once any replacement under way has finished."""
        worker = self._workers[index]
        if worker.dead:
            if self._closing:
                raise Unavailable("the inference service is shutting down; retry on another replica")
            task = self._replace(index, worker)
            if task is not None:
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the next call tries again
                    raise Unavailable(f"an inference worker stopped and could not be restarted ({e}); "
                                      "retry the request") from None
            worker = self._workers[index]
        return worker

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

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
                worker = await self._live(index)
                try:
                    return await worker.call(fn, args)
                except WorkerDied:
                    self._replace(index, worker)
                    if not retry or attempt == 2:
                        raise Unavailable("an inference worker stopped while computing; retry the request") from None
        finally:
            self.load[index] -= 1

    async def with_key(self, index: int, fetch: Callable[[], Awaitable[bytes]], fn: Callable[..., Any],
                       head: tuple, tail: tuple = ()) -> Any:
        """Calls fn(*head, key_bytes, *tail) (head ends with the model and the key id), sending
        the key bytes only when the worker lacks them: one trip when the pool knows it does
        (a new key, a new worker), two only when the worker evicted it."""
        retry = fn in (predict_latency, predict_coeff)  # stateless: safe to run again on a replaced worker
        holds = self._workers[index].holds if self.n else self._inline_holds
        slot = (fn.__name__, *head[-2:])
        if slot in holds:
            try:
                return await self.call(index, fn, *head, None, *tail, retry=retry)
            except KeyMissing:
                holds.discard(slot)
        result = await self.call(index, fn, *head, await fetch(), *tail, retry=retry)
        holds.add(slot)
        return result

    async def close(self, timeout: float = 3.0) -> None:
        """Stops every worker (replacements under way too) within about `timeout` + 5 s."""
        self._closing = True
        replacing = list(self._replacing.values())
        for task in replacing:
            task.cancel()
        await asyncio.gather(*replacing, return_exceptions=True)
        await asyncio.gather(*(w.close(timeout) for w in self._workers), return_exceptions=True)
        self._workers = []
        # Whatever a failed start or replacement left (a worker not yet in the list): kill, reap.
        left = [p for p in self._spawned if p.poll() is None]
        for process in left:
            process.kill()
        for process in self._spawned:
            await asyncio.to_thread(_reaped, process, 5.0)
        self._spawned.clear()


def check_batch_count(open_batches: int, limit: int) -> None:
    if open_batches >= limit:
        raise ResourceExhausted(f"at most {limit} batches may be open at once on one stream; "
                                "finish one (send its last part) before starting another")


def check_position(position: int, expected: int, total: int) -> None:
    if position != expected:
        raise InvalidArgument(f"batch part {position} arrived, expected part {expected} of {total} "
                              "(parts of a batch are sent in order)")
