"""A per-process LRU cache of loaded models, bounded by a byte budget.

Spark reuses a Python worker across tasks (``spark.python.worker.reuse``, on by default), and
this module's state lives as long as that worker, so a model is deserialised once per Python
worker and reused by every later task and job that asks for the same model identity.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import cachetools

__all__ = ["CacheInfo", "SizedLRUCache"]

Value = TypeVar("Value")


@dataclass(frozen=True)
class CacheInfo:
    """A snapshot of a cache: how often it loaded, hit and evicted, and what it holds."""

    loads: int
    hits: int
    evictions: int
    entries: int
    nbytes: int
    budget_bytes: int


class _CountingLRU(cachetools.LRUCache):
    """cachetools' LRU cache of ``(value, size)`` entries that counts what it evicts."""

    def __init__(self, budget_bytes: int, on_evict: Callable[[], None]) -> None:
        super().__init__(maxsize=budget_bytes, getsizeof=lambda entry: entry[1])
        self._on_evict = on_evict

    def popitem(self):  # cachetools calls it for each eviction, least recently used first
        item = super().popitem()
        self._on_evict()
        return item


class SizedLRUCache(Generic[Value]):
    """Keys to values, least recently used evicted first once the byte budget is exceeded.

    A `cachetools.LRUCache` sized by each value's bytes. The newest entry always stays, even
    when it alone is larger than the budget (cachetools refuses such a value): a model that is
    too big for the budget is still loaded once per task rather than refused.
    """

    def __init__(self, budget_bytes: int, size_of: Callable[[Value], int]) -> None:
        self.budget_bytes = budget_bytes
        self._size_of = size_of
        self._entries = _CountingLRU(budget_bytes, self._count_eviction)
        # the one entry larger than the whole budget, when the newest is such
        self._oversized: tuple[str, tuple[Value, int]] | None = None
        self._lock = threading.Lock()
        self._loads = self._hits = self._evictions = 0

    def _count_eviction(self) -> None:
        self._evictions += 1

    def get_or_load(self, key: str, load: Callable[[], Value]) -> Value:
        """The cached value for ``key``, loading (and counting the load) on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None and self._oversized is not None and self._oversized[0] == key:
                entry = self._oversized[1]
            if entry is not None:
                self._hits += 1
                return entry[0]
            # Loading under the lock: two threads asking for one model load it once.
            value = load()
            self._loads += 1
            self._store(key, (value, self._size_of(value)))
            return value

    def _store(self, key: str, entry: tuple[Value, int]) -> None:
        if self._oversized is not None:  # the newest no longer: it goes first
            self._oversized = None
            self._count_eviction()
        if entry[1] <= self.budget_bytes:
            self._entries[key] = entry
            return
        while self._entries:
            self._entries.popitem()
        self._oversized = (key, entry)

    def resize(self, budget_bytes: int) -> None:
        """Change the byte budget, evicting at once if the cache is over it."""
        with self._lock:
            kept = []
            while self._entries:  # least recently used first, not counted as evicted here
                kept.append(cachetools.LRUCache.popitem(self._entries))
            oversized, self._oversized = self._oversized, None
            self.budget_bytes = budget_bytes
            self._entries = _CountingLRU(budget_bytes, self._count_eviction)
            for key, entry in kept:
                self._store(key, entry)
            if oversized is not None:
                self._store(*oversized)

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._oversized = None

    def info(self) -> CacheInfo:
        with self._lock:
            oversized = [] if self._oversized is None else [self._oversized[1][1]]
            return CacheInfo(
                loads=self._loads,
                hits=self._hits,
                evictions=self._evictions,
                entries=len(self._entries) + len(oversized),
                nbytes=int(self._entries.currsize) + sum(oversized),
                budget_bytes=self.budget_bytes,
            )
