"""A per-process LRU cache of loaded models, bounded by a byte budget.

Spark reuses a Python worker across tasks (``spark.python.worker.reuse``, on by default), and
this module's state lives as long as that worker, so a model is deserialised once per Python
worker and reused by every later task and job that asks for the same model identity.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

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


class SizedLRUCache(Generic[Value]):
    """Keys to values, least recently used evicted first once the byte budget is exceeded.

    The newest entry always stays, even when it alone is larger than the budget: a model
    that is too big for the budget is still loaded once per task rather than refused.
    """

    def __init__(self, budget_bytes: int, size_of: Callable[[Value], int]) -> None:
        self.budget_bytes = budget_bytes
        self._size_of = size_of
        self._entries: OrderedDict[str, tuple[Value, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loads = self._hits = self._evictions = 0

    def get_or_load(self, key: str, load: Callable[[], Value]) -> Value:
        """The cached value for ``key``, loading (and counting the load) on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return entry[0]
            # Loading under the lock: two threads asking for one model load it once.
            value = load()
            self._loads += 1
            self._entries[key] = (value, self._size_of(value))
            self._evict()
            return value

    def resize(self, budget_bytes: int) -> None:
        """Change the byte budget, evicting at once if the cache is over it."""
        with self._lock:
            self.budget_bytes = budget_bytes
            self._evict()

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(
                loads=self._loads,
                hits=self._hits,
                evictions=self._evictions,
                entries=len(self._entries),
                nbytes=sum(size for _, size in self._entries.values()),
                budget_bytes=self.budget_bytes,
            )

    def _evict(self) -> None:
        total = sum(size for _, size in self._entries.values())
        while total > self.budget_bytes and len(self._entries) > 1:
            _, (_, size) = self._entries.popitem(last=False)
            total -= size
            self._evictions += 1
