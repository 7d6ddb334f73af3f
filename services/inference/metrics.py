"""Metrics of the inference service that live outside its server process.

HE work runs in worker processes, each with its own cache of deserialized keys;
their counters sit in the workers' own registries and would never reach the
server's /metrics. So on each scrape the server asks every worker for its key
cache samples (a cheap call through the worker's queue) and exports them in the
same families as its own key-bytes cache, labelled `cache="worker-<pid>-<i>"`.
A worker busy for longer than the scrape allows answers at the next scrape; its
last answer is exported meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from encinfer.inference import cache

log = logging.getLogger(__name__)

FAMILIES = ("encinfer_key_cache_events", "encinfer_key_cache_bytes")
SCRAPE_WAIT_SECONDS = 2.0


def worker_samples() -> list[tuple[str, dict[str, str], float]]:
    """Runs in a worker: its key cache samples as (sample name, labels, value)."""
    out = []
    for family in REGISTRY.collect():
        if family.name in FAMILIES:
            out += [(s.name, dict(s.labels), s.value) for s in family.samples if not s.name.endswith("_created")]
    return out


class KeyCacheCollector:
    """The key cache families: this process's caches plus every worker's, merged."""

    def __init__(self) -> None:
        self.pool: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._last: dict[int, list] = {}

    def attach(self, pool: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.loop, self._last = pool, loop, {}

    def describe(self):
        # Registration must not call collect(): it would wait on the event loop it runs on.
        return [CounterMetricFamily("encinfer_key_cache_events", "Key cache hits, misses and evictions",
                                    labels=["cache", "event"]),
                GaugeMetricFamily("encinfer_key_cache_bytes", "Bytes held by a key cache", labels=["cache"])]

    def collect(self):
        families = {f.name: f for m in (cache.CACHE_EVENTS, cache.CACHE_BYTES) for f in m.collect()}
        for samples in self._worker_samples().values():
            for name, labels, value in samples:
                family = families["encinfer_key_cache_events" if name.endswith("_total")
                                  else "encinfer_key_cache_bytes"]
                family.add_sample(name, labels, value)
        yield from families.values()

    def _worker_samples(self) -> dict[int, list]:
        pool, loop = self.pool, self.loop
        if pool is None or loop is None or pool.n == 0 or loop.is_closed():
            return {}  # no workers: the caches are this process's own, already counted
        try:
            fresh = asyncio.run_coroutine_threadsafe(self._ask(pool), loop).result(SCRAPE_WAIT_SECONDS)
            self._last.update(fresh)
        except Exception as e:  # noqa: BLE001 - a scrape must never fail for this; stale numbers instead
            log.debug("worker metrics not refreshed", extra={"fields": {"error": repr(e)}})
        return self._last

    @staticmethod
    async def _ask(pool: Any) -> dict[int, list]:
        indices = range(len(pool.load))
        answers = await asyncio.gather(*(pool.call(i, worker_samples) for i in indices), return_exceptions=True)
        return {i: a for i, a in zip(indices, answers, strict=True) if not isinstance(a, BaseException)}


_collector: KeyCacheCollector | None = None


def export_worker_caches(pool: Any) -> None:
    """Makes /metrics include the workers' key caches (call once the pool runs, on its loop)."""
    global _collector
    if _collector is None:
        _collector = KeyCacheCollector()
        for metric in (cache.CACHE_EVENTS, cache.CACHE_BYTES):
            REGISTRY.unregister(metric)
        REGISTRY.register(_collector)
    _collector.attach(pool, asyncio.get_running_loop())
