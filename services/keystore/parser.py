"""The key store's parser process: clients' key bundles are parsed in a child, never in the server.

SEAL 4.3 (inside TenSEAL) parses the bytes a client uploads. encinfer.he.serial checks
every object before SEAL sees it, but a parser bug left in SEAL must cost one upload,
never the key store: the parse runs in one spawned child process (one at a time, as
before: SEAL keeps its memory pool at its peak, so parallel parses would add up). When
the child dies, the upload it was reading is answered (INVALID_ARGUMENT: the bytes
crashed the parser; UNAVAILABLE when it was SIGKILLed, by the OOM killer or an
operator, which is not the upload's fault), and one new child replaces it. A child
that dies before it has even imported the parser never read the upload: that is the
key store's fault (INTERNAL, with the likely reason), never the client's.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from encinfer.common.errors import EncinferError, InvalidArgument, Unavailable

log = logging.getLogger(__name__)


def _ignore_stop_signals() -> None:
    """In the child: a Ctrl-C or SIGTERM to the process group must not kill a parse; close() stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def preload() -> None:
    """Imports the bundle parser (and TenSEAL) in the parser process; returns nothing to pickle."""
    import encinfer.he.keys  # noqa: F401


class ParserPool:
    """Runs one parse at a time in a child process (in_process=True: in a thread, for injected fakes)."""

    def __init__(self, *, in_process: bool = False) -> None:
        self._in_process = in_process
        # Each pool's first task: the parser's import, which proves its child started.
        self._imports: weakref.WeakKeyDictionary[Executor, Future] = weakref.WeakKeyDictionary()
        self._pool = self._new()

    def _new(self) -> Executor:
        pool: Executor
        if self._in_process:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keystore-inspect")
        else:
            pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_ignore_stop_signals)
        self._imports[pool] = pool.submit(preload)  # warm, off the request path
        return pool

    def _started(self, pool: Executor) -> bool:
        first = self._imports.get(pool)
        return first is not None and first.done() and not first.cancelled() and first.exception() is None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        pool = self._pool
        if _died(pool):  # while idle: not this call's doing (checked now, not when the executor notices)
            pool = self._replace(pool)
        try:
            future = loop.run_in_executor(pool, fn, *args)
        except BrokenProcessPool:  # it died between the check and the submit
            pool = self._replace(pool)
            future = loop.run_in_executor(pool, fn, *args)
        try:
            return await future
        except BrokenProcessPool:
            codes = await _exit_codes(pool)
            started = self._started(pool)
            self._replace(pool)
            if not started:
                raise EncinferError(
                    f"the key store's parser process could not start ({_how(codes)}), so this upload was not read; "
                    "the key store's log says why (a script that runs a key store in its own process needs "
                    "`if __name__ == \"__main__\":` around its entry point: the parser process imports it)") from None
            if -signal.SIGKILL in codes:  # the OOM killer or an operator: not the upload's fault
                raise Unavailable("the key parser process was killed while reading this upload; retry shortly") \
                    from None
            raise InvalidArgument(f"this upload crashed the key parser ({_how(codes)}); it is not a valid "
                                  "encinfer key bundle: create keys with encinfer's keygen") from None

    def _replace(self, broken: Executor) -> Executor:
        """One new child per death, however many calls saw it."""
        if broken is self._pool:
            log.error("key parser process died; starting another",
                      extra={"fields": {"exit_codes": [p.exitcode for p in _processes(broken)]}})
            self._pool = self._new()
            _stop(broken)
        return self._pool

    def pid(self) -> int | None:
        """The child's process id, when one is running (for tests and logs)."""
        processes = _processes(self._pool)
        return processes[0].pid if processes else None

    def close(self) -> None:
        _stop(self._pool)


def _processes(pool: Executor) -> list:
    # concurrent.futures keeps its processes private; their exit codes say why one died.
    return list((getattr(pool, "_processes", None) or {}).values())


def _died(pool: Executor) -> bool:
    processes = _processes(pool)
    return bool(processes) and not all(p.is_alive() for p in processes)  # is_alive reaps: no waiting


async def _exit_codes(pool: Executor) -> list[int | None]:
    """The dead pool's exit codes. The executor's own thread may be reaping the child at this very
    moment (then ours reads None for an instant), so this looks again for up to a second."""
    processes = _processes(pool)
    for _ in range(100):
        codes = [p.exitcode for p in processes]
        if None not in codes:
            break
        await asyncio.sleep(0.01)
    return codes


def _how(codes: list[int | None]) -> str:
    """How the child ended, as a person reads it: "killed by SIGSEGV", "exit 1"."""
    def one(code: int | None) -> str:
        if code is None:
            return "no exit status"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit {code}"
    return ", ".join(one(c) for c in codes) or "no exit status"


def _stop(pool: Executor) -> None:
    """Stops a pool at once; a child is killed and reaped, never left behind."""
    processes = _processes(pool)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join(5)
