"""How the inference service holds key records: shared calls per key, records served while
the key store cannot re-check them (up to a hard limit), and a bounded record cache."""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import start_stack, wait_for

from encinfer.common.errors import NotFound, Unavailable
from encinfer.inference.keys import SharedCalls

pytest_plugins = ["inference_fixtures"]
pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- shared calls

def run(coro):
    return asyncio.run(coro)


def test_callers_of_one_key_share_one_call():
    calls = []

    async def call() -> str:
        calls.append(1)
        await asyncio.sleep(0.05)
        return "record"

    async def main() -> list[str]:
        shared: SharedCalls[str, str] = SharedCalls()
        return await asyncio.gather(*(asyncio.shield(shared.start("k", call).task) for _ in range(20)))
    assert run(main()) == ["record"] * 20 and len(calls) == 1


def test_a_slow_unavailable_is_handed_to_callers_that_arrive_just_after_it():
    calls = []

    async def hung() -> str:
        calls.append(1)
        await asyncio.sleep(0.2)
        raise Unavailable("the key store did not answer")

    async def main() -> float:
        shared: SharedCalls[str, str] = SharedCalls(slow_seconds=0.1, hold_seconds=5)
        with pytest.raises(Unavailable):
            await shared.start("k", hung).task
        start = time.monotonic()
        with pytest.raises(Unavailable):
            await shared.start("k", hung).task
        return time.monotonic() - start
    assert run(main()) < 0.1 and len(calls) == 1


def test_a_fast_failure_is_not_held_the_next_caller_asks_again():
    calls = []

    async def refused() -> str:
        calls.append(1)
        raise Unavailable("connection refused")

    async def main() -> None:
        shared: SharedCalls[str, str] = SharedCalls(slow_seconds=0.1, hold_seconds=5)
        for _ in range(3):
            with pytest.raises(Unavailable):
                await shared.start("k", refused).task
    run(main())
    assert len(calls) == 3


def test_answers_are_never_held():
    calls = []

    async def gone() -> str:
        calls.append(1)
        await asyncio.sleep(0.15)
        raise NotFound("deleted")

    async def main() -> None:
        shared: SharedCalls[str, str] = SharedCalls(slow_seconds=0.1, hold_seconds=5)
        for _ in range(2):
            with pytest.raises(NotFound):
                await shared.start("k", gone).task
    run(main())
    assert len(calls) == 2


def test_a_caller_that_gives_up_does_not_cancel_the_shared_call():
    async def slow() -> str:
        await asyncio.sleep(0.2)
        return "record"

    async def main() -> str:
        shared: SharedCalls[str, str] = SharedCalls()
        flight = shared.start("k", slow)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(flight.task), 0.05)  # a client deadline
        return await shared.start("k", slow).task
    assert run(main()) == "record"


# ---------------------------------------------------------------- records through an outage

@pytest.fixture
def short_stale_stack(mnist_model, tmp_path):
    """Records due every 0.2 s, served unchecked for at most 3 s; at most 2 records cached."""
    stem, model = mnist_model
    stack = start_stack(stem, model, tmp_path, workers=0, key_recheck_seconds=0.2,
                        key_record_max_stale_seconds=3.0, key_record_cache_entries=2)
    yield stack
    stack.close()


def test_cached_record_serves_while_the_key_store_is_down_up_to_the_hard_limit(short_stale_stack, tmp_path,
                                                                                 test_images):
    stack = short_stale_stack
    x = test_images[0][0]
    with stack.classifier(tmp_path / "k", layout="latency") as clf:
        clf.predict_one(x)
        checked = time.monotonic()
        stack.stop_keystore()
        try:
            while time.monotonic() - checked < 2.0:  # due all along, served from the cache
                assert clf.predict_one(x).shape == (10,)
                time.sleep(0.1)
            time.sleep(max(0.0, checked + 3.5 - time.monotonic()))
            key_id = clf.keys("latency")[1]  # remembered: no key-store call
            with pytest.raises(Unavailable, match=r"key store is unreachable.*checked \d+ s ago, past the "
                                                  r"3 s a record is served unchecked") as info:
                clf.predict_one(x)
            assert key_id in str(info.value)
        finally:
            stack.start_keystore()
        assert wait_for(lambda: _answers(clf, x), timeout=15)


def _answers(clf, x) -> bool:
    try:
        clf.predict_one(x)
        return True
    except Unavailable:
        return False


def test_record_cache_holds_at_most_its_bound(short_stale_stack, tmp_path, test_images):
    stack = short_stale_stack
    for i in range(3):
        with stack.classifier(tmp_path / f"k{i}", layout="latency") as clf:
            clf.predict_one(test_images[0][0])

    async def cached() -> int:
        return len(stack.inference.server.keys._records)
    assert stack.on_server_loop(cached()) == 2
