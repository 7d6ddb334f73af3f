"""The worker pool on its own (real worker processes, no gRPC): one death, one replacement;
a failed start or a close leaves no process behind; start-up checks name what to fix."""
from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from encinfer.common.errors import Unavailable
from encinfer.common.preflight import StartupError, check_port_free
from encinfer.inference import pool as pool_module
from encinfer.inference import worker
from encinfer.inference.pool import WorkerPool

pytest_plugins = ["inference_fixtures"]

BOUND = 60.0  # seconds: bounded waits on 2 busy cores, never timing assertions


def alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


async def wait_for(predicate, timeout: float = BOUND) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def test_many_calls_on_a_dead_worker_start_exactly_one_replacement(mnist_model):
    async def scenario() -> None:
        pool = WorkerPool([str(mnist_model[0])], 2, 1 << 24)
        await pool.start()
        try:
            victim = pool.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            # Every call pending on, or arriving at, the dead slot: one replacement serves them all.
            answers = await asyncio.gather(*(pool.call(0, worker.describe, retry=True) for _ in range(8)),
                                           return_exceptions=True)
            assert all(isinstance(a, list) for a in answers), answers
            assert pool.replacements == 1
            assert victim not in pool.worker_pids() and len(pool.worker_pids()) == 2
            assert not exists(victim)  # reaped: no zombie
        finally:
            pids = pool.worker_pids()
            await pool.close()
        assert not any(exists(p) for p in pids)
    asyncio.run(scenario())


def test_a_worker_that_dies_while_idle_is_replaced_before_the_next_call(mnist_model):
    async def scenario() -> None:
        pool = WorkerPool([str(mnist_model[0])], 2, 1 << 24)
        await pool.start()
        try:
            victim = pool.worker_pids()[1]
            os.kill(victim, signal.SIGKILL)
            assert await wait_for(lambda: pool.replacements == 1 and victim not in pool.worker_pids())
            # Not a retried call: it never meets the dead worker.
            assert await pool.call(1, worker.open_batches) == 0
            assert pool.replacements == 1
        finally:
            await pool.close()
    asyncio.run(scenario())


def test_a_pool_whose_workers_cannot_load_the_model_fails_and_leaves_no_process(tmp_path):
    before = set(pool_module._started)  # other tests' pools (the session's stacks) may be running

    async def scenario() -> None:
        pool = WorkerPool([str(tmp_path / "no-such-model")], 2, 1 << 24)
        with pytest.raises(Unavailable, match="exited while loading the models"):
            await pool.start()
    asyncio.run(scenario())
    assert pool_module._started <= before  # every worker this pool started was reaped


def test_close_kills_a_worker_that_does_not_exit_on_eof(mnist_model):
    async def scenario() -> None:
        pool = WorkerPool([str(mnist_model[0])], 1, 1 << 24)
        await pool.start()
        pid = pool.worker_pids()[0]
        os.kill(pid, signal.SIGSTOP)  # frozen: it can never read the EOF
        await asyncio.wait_for(pool.close(timeout=0.5), BOUND)
        assert not exists(pid)
    asyncio.run(scenario())


def test_a_busy_port_is_a_startup_error_naming_the_setting():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with pytest.raises(StartupError, match=f"port {port} on 127.0.0.1 is already in use.*ENCINFER_X"):
            check_port_free("127.0.0.1", port, "ENCINFER_X")


def test_a_free_port_and_port_0_pass_the_check():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_port_free("127.0.0.1", port, "ENCINFER_X")
    check_port_free("127.0.0.1", 0, "ENCINFER_X")


class KeyTrips:
    """A pool's calls of `fn`, as (worker, whether the key bytes went along), and its key fetches."""

    def __init__(self, pool: WorkerPool, fn, bundle: bytes) -> None:
        self.trips: list[tuple[int, bool]] = []
        self.fetches = 0
        self._bundle, real_call = bundle, pool.call

        async def counting_call(index, called, *args, **kw):
            if called is fn:
                self.trips.append((index, args[2] is not None))  # (model, key id, key bytes or None, input)
            return await real_call(index, called, *args, **kw)
        pool.call = counting_call

    async def fetch(self) -> bytes:
        self.fetches += 1
        return self._bundle


async def started_pool(stem, workers: int, model, layout: str):
    """A started pool, a new key for `layout` and one encrypted image under it."""
    from encinfer.he import coeff, latency
    from encinfer.he.secret import SecretKeys

    pool = WorkerPool([str(stem)], workers, 1 << 26)
    await pool.start()
    lay = next(m for m in pool.models if m.name == model.name).layouts[layout]
    secret = SecretKeys.generate(lay.params)
    encrypt = coeff.encrypt_coeff if layout == "coeff" else latency.encrypt_latency
    return pool, secret.public_bundle(), encrypt(secret, model_images(1)[0], lay)


def test_a_key_the_worker_lacks_goes_with_the_first_call_and_not_again(mnist_model):
    """One worker trip for a new key (the pool knows the worker has none), none with bytes after."""
    stem, model = mnist_model

    async def scenario() -> None:
        pool, bundle, ct = await started_pool(stem, 1, model, "latency")
        try:
            count = KeyTrips(pool, worker.predict_latency, bundle)
            for _ in range(3):
                await pool.with_key(0, count.fetch, worker.predict_latency, (model.name, "k" * 64), (ct,))
            assert count.trips == [(0, True), (0, False), (0, False)] and count.fetches == 1
        finally:
            await pool.close()
    asyncio.run(scenario())


def test_a_key_sent_to_one_worker_is_loaded_by_the_others_before_their_first_call(mnist_model):
    """The second request of a new key (another worker, by least-loaded pick) goes without the
    bytes: the pool handed them to the other worker in the background after the first call."""
    stem, model = mnist_model

    async def scenario() -> None:
        pool, bundle, ct = await started_pool(stem, 2, model, "coeff")
        try:
            count = KeyTrips(pool, worker.predict_coeff, bundle)
            head = (model.name, "c" * 64)
            await pool.with_key(0, count.fetch, worker.predict_coeff, head, (ct,))
            slot = ("predict_coeff", *head)
            assert await wait_for(lambda: slot in pool._workers[1].holds and not pool._background)
            await pool.with_key(1, count.fetch, worker.predict_coeff, head, (ct,))
            assert count.trips == [(0, True), (1, False)] and count.fetches == 1
            assert await pool.call(1, worker.zero_pools) != []  # its encryptions of zero are kept ready
        finally:
            await pool.close()
    asyncio.run(scenario())


def model_images(n: int):
    from encinfer import datasets
    return datasets.default_test_images(n)[0]
