"""The worker pool, from the server's side: N worker processes (encinfer.inference.worker),
each reached over a socket of its own from the server's event loop.

Single items go to the least-loaded worker, so one connection uses every core; a batch
is pinned to one worker. A dead worker is replaced exactly once, is always reaped, and
none outlives the server.
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
from collections.abc import Awaitable, Callable
from typing import Any

from encinfer.common.errors import Unavailable
from encinfer.inference.worker import (
    WORKER_CODE,
    KeyMissing,
    describe,
    init_worker,
    predict_coeff,
    predict_latency,
    preload_key,
)
from encinfer.modelinfo import ModelDescription

log = logging.getLogger(__name__)


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
                 on_exit: Callable[[_Worker], None] | None = None) -> None:
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
        assert self._writer is not None  # open() ran first
        try:
            self._writer.write(header + payload)
            await self._writer.drain()  # back-pressure when the worker falls behind
        except BaseException as e:
            # This call ends here: its future goes, and if the reader already failed it (the
            # worker died while a big payload was draining), its exception is taken, not left
            # for asyncio to report as never retrieved.
            self._pending.pop(call_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()
            fut.cancel()
            if isinstance(e, (ConnectionError, OSError)):
                # Dead now, even before the reader has seen EOF: a retry must wait for the
                # replacement, not write to this socket again.
                self.dead = True
                raise WorkerDied() from None
            raise
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
        self.models: list[ModelDescription] = []
        self.replacements = 0
        self._inline_holds = KeysHeld()
        self._background: set[asyncio.Task] = set()  # key preloads under way
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

    async def _ready(self, worker: _Worker) -> list[ModelDescription]:
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
        data = await fetch()
        result = await self.call(index, fn, *head, data, *tail, retry=retry)
        holds.add(slot)
        if retry and self.n > 1:
            self._spread(index, slot, data)
        return result

    def _spread(self, index: int, slot: tuple, data: bytes) -> None:
        """Hands a single-sample key that worker `index` was just sent to the other workers, in
        the background: a key's second request (the least-loaded pick is another worker) then
        finds it loaded, with encryptions of zero made while that worker was idle, instead of
        loading the key and making them on the spot (3.6-7.5 ms against 1.2 ms warm, measured)."""
        for other, worker in enumerate(self._workers):
            if other != index and slot not in worker.holds and not worker.dead:
                task = asyncio.get_running_loop().create_task(self._preload(other, worker, slot, data),
                                                              name=f"encinfer-worker-{other}-preload")
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _preload(self, index: int, worker: _Worker, slot: tuple, data: bytes) -> None:
        try:
            await self.call(index, preload_key, *slot, data)
        except Exception as e:  # noqa: BLE001 - a worker that misses it loads it with its first request
            log.debug("key preload failed", extra={"fields": {"worker": index, "error": str(e)}})
            return
        if self._workers[index] is worker:  # not replaced meanwhile: this worker holds it now
            worker.holds.add(slot)

    async def close(self, timeout: float = 3.0) -> None:
        """Stops every worker (replacements under way too) within about `timeout` + 5 s."""
        self._closing = True
        pending = [*self._replacing.values(), *self._background]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(w.close(timeout) for w in self._workers), return_exceptions=True)
        self._workers = []
        # Whatever a failed start or replacement left (a worker not yet in the list): kill, reap.
        left = [p for p in self._spawned if p.poll() is None]
        for process in left:
            process.kill()
        for process in self._spawned:
            await asyncio.to_thread(_reaped, process, 5.0)
        self._spawned.clear()
