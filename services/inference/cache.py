"""A least-recently-used map bounded by bytes, not entries: one 50 MB key set and a
hundred 1 MB ones should cost what they weigh."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CACHE_EVENTS = Counter("encinfer_key_cache_events_total", "Key cache hits, misses and evictions", ["cache", "event"])
CACHE_BYTES = Gauge("encinfer_key_cache_bytes", "Bytes held by a key cache", ["cache"])


class ByteLRU(Generic[K, V]):
    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int], name: str = "keys") -> None:
        self.capacity = capacity_bytes
        self._size_of = size_of
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.name = name

    def get(self, key: K) -> V | None:
        hit = self._items.get(key)
        if hit is None:
            CACHE_EVENTS.labels(self.name, "miss").inc()
            return None
        self._items.move_to_end(key)
        CACHE_EVENTS.labels(self.name, "hit").inc()
        return hit[0]

    def put(self, key: K, value: V) -> None:
        size = self._size_of(value)
        self.pop(key)
        self._items[key] = (value, size)
        self.bytes += size
        # Keep at least the newest entry even when it alone exceeds the capacity.
        while self.bytes > self.capacity and len(self._items) > 1:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old
            CACHE_EVENTS.labels(self.name, "eviction").inc()
        CACHE_BYTES.labels(self.name).set(self.bytes)

    def pop(self, key: K) -> V | None:
        hit = self._items.pop(key, None)
        if hit is None:
            return None
        self.bytes -= hit[1]
        CACHE_BYTES.labels(self.name).set(self.bytes)
        return hit[0]

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
