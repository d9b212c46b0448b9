"""Batches: rows drawn from prepared windows of columns, and the one-pass inference feed.

Worker side: this module never imports pyspark.

A *window* is a run of rows whose columns are prepared (see `deepspark.data.columns`) with an
optional visiting order. A `_RowReader` walks windows and hands out row ranges; a batch is the
tensors for those ranges, one gather (or view) per column. Spilled epochs, ordered passes and
`iter_batches` all build batches this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from deepspark.data.columns import column_tensor, filler_tensor
from deepspark.data.readers import Prepared, RowIndex, prepare_column
from deepspark.data.spec import FeedError, TensorSpec, assemble, normalize_specs

__all__ = ["Batch", "iter_batches"]


@dataclass
class Batch:
    """One batch: the model's arguments and the labels, built from the feature and label specs.

    ``features`` holds one tensor per feature spec, or, where the specs have places (a
    ``feature_cols`` dict, struct columns), the arguments `deepspark.data.assemble` builds
    from them, dicts of tensors; so ``model(*batch.features)`` always calls the model.
    ``labels`` is arranged the same way from the label specs.

    Rows ``[0, num_real)`` are real data; rows after it are filler that keeps every rank's
    batch the same size (see `StepPolicy`); training masks them out of the loss and metrics.
    """

    features: tuple[Any, ...]
    labels: tuple[Any, ...]
    num_real: int

    def __len__(self) -> int:
        for value in (*self.features, *self.labels):
            tensor = _first_tensor(value)
            if tensor is not None:
                return int(tensor.shape[0])
        return 0

    def real(self) -> Batch:
        """The batch without its filler rows (views, no copy)."""
        if self.num_real == len(self):
            return self
        keep = self.num_real
        return Batch(
            tuple(_head(value, keep) for value in self.features),
            tuple(_head(value, keep) for value in self.labels),
            keep,
        )

    def as_pair(self) -> tuple[object, object]:
        """``(features, labels)`` as a PyTorch loop expects them: the one argument (a tensor or
        a dict) where there is one, a tuple where there are several, ``None`` where there are
        none."""
        return _collapse(self.features), _collapse(self.labels)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    for item in value.values() if isinstance(value, dict) else value:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _head(value: Any, rows: int) -> Any:
    """The first ``rows`` rows of a tensor, or of every tensor in a dict of them."""
    if isinstance(value, torch.Tensor):
        return value[:rows]
    return {key: _head(item, rows) for key, item in value.items()}


def _collapse(values: tuple[Any, ...]) -> object:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass
class _Window:
    """Consecutive rows with their columns prepared, and the order to visit them in."""

    prepared: list[Prepared]  # one per spec: features first, then labels
    rows: int
    order: np.ndarray | None = None  # None: natural order (rows are then views, not copies)
    only: bool = False  # the producer knows this is the whole pass: keep it for replays

    def index(self, start: int, stop: int) -> RowIndex:
        if self.order is None:
            return slice(start, stop)
        return self.order[start:stop]


class _RowReader:
    """Hands out row ranges from a sequence of windows, optionally starting over when done.

    Starting over replays the same windows in the same order (``make_windows`` is called
    again), which is how filler rows repeat real rows. A window marked ``only`` is kept rather
    than rebuilt, so a tiny partition that must repeat many times per batch stays cheap.
    Otherwise a window is released before the next one loads.
    """

    def __init__(
        self, make_windows: Callable[[], Iterator[_Window]], *, cyclic: bool, detach: bool = True
    ) -> None:
        self._make_windows = make_windows
        self._cyclic = cyclic
        self._detach = detach
        self._windows = make_windows()
        self._window: _Window | None = None
        self._position = 0
        self._windows_this_pass = 0
        self._only_window: _Window | None = None

    def read(self, count: int) -> list[tuple[_Window, RowIndex]]:
        """Up to ``count`` rows as (window, rows) pieces; fewer only when a pass is over."""
        pieces: list[tuple[_Window, RowIndex]] = []
        needed = count
        while needed > 0:
            if self._window is None or self._position >= self._window.rows:
                self._window = None
                if not self._advance():
                    break
                continue
            stop = min(self._window.rows, self._position + needed)
            piece = (self._window, self._window.index(self._position, stop))
            if stop == self._window.rows and self._detach and self._only_window is None:
                # The rows that finish a window are copied out, so that no batch (nor a
                # caller holding one) keeps the window alive while the next one loads:
                # memory holds one window, not two.
                piece = _detach(*piece)
            pieces.append(piece)
            needed -= stop - self._position
            self._position = stop
        return pieces

    def _advance(self) -> bool:
        self._position = 0
        if self._only_window is not None:
            self._window = self._only_window
            return True
        for window in self._windows:
            if window.rows:
                self._window = window
                if window.only and self._cyclic:
                    self._only_window = window
                self._windows_this_pass += 1
                return True
        if not self._cyclic or self._windows_this_pass == 0:
            return False
        self._windows = self._make_windows()
        self._windows_this_pass = 0
        return self._advance()


def _detach(window: _Window, rows: RowIndex) -> tuple[_Window, RowIndex]:
    """The given rows of a window as a small window of their own (a copy)."""
    prepared = [_subset(values, rows) for values in window.prepared]
    count = _piece_rows(window, rows)
    return _Window(prepared, count), slice(0, count)


def _subset(values: Prepared, rows: RowIndex) -> Prepared:
    if isinstance(values, np.ndarray):
        return values[rows].copy() if isinstance(rows, slice) else values[rows]
    if isinstance(rows, slice):
        return values.slice(rows.start, rows.stop - rows.start)
    return values.take(pa.array(rows))


@dataclass
class _PendingBatch:
    """Which rows a batch will hold, before any tensor is built (cheap to skip)."""

    pieces: list[tuple[_Window, RowIndex]]  # empty: a filler batch of zeros
    rows: int
    num_real: int

    def build(self, features: Sequence[TensorSpec], labels: Sequence[TensorSpec]) -> Batch:
        """Make the tensors; the pieces are let go, so their windows can be freed."""
        pieces, self.pieces = self.pieces, []
        if not pieces:
            return Batch(
                assemble(features, [filler_tensor(spec, self.rows) for spec in features]),
                assemble(labels, [filler_tensor(spec, self.rows) for spec in labels]),
                0,
            )
        tensors = []
        for position, spec in enumerate((*features, *labels)):
            parts = [column_tensor(w.prepared[position], spec, rows) for w, rows in pieces]
            tensors.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return Batch(
            assemble(features, tensors[: len(features)]),
            assemble(labels, tensors[len(features) :]),
            self.num_real,
        )


def _built(
    pending: Iterator[_PendingBatch], features: Sequence[TensorSpec], labels: Sequence[TensorSpec]
) -> Iterator[Batch]:
    # `build` empties each pending batch, so no suspended frame keeps a window alive.
    for batch in pending:
        yield batch.build(features, labels)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FeedError(f"batch_size must be a positive integer, got {batch_size!r}")


def _ordered_pending(
    windows: Callable[[], Iterator[_Window]], batch_size: int, *, detach: bool = True
) -> Iterator[_PendingBatch]:
    """Full batches in window order, then the rest; no filler.

    ``detach=False`` suits small windows (a task's input batches): rows stay views of them.
    """
    reader = _RowReader(windows, cyclic=False, detach=detach)
    while True:
        pending = _PendingBatch(reader.read(batch_size), 0, 0)
        if not pending.pieces:
            return
        pending.rows = pending.num_real = sum(_piece_rows(w, rows) for w, rows in pending.pieces)
        yield pending


def _piece_rows(window: _Window, index: RowIndex) -> int:
    if isinstance(index, slice):
        return index.stop - index.start
    return window.rows if index is None else len(index)


def iter_batches(
    batches: Iterable[pa.RecordBatch],
    features: TensorSpec | Sequence[TensorSpec],
    labels: TensorSpec | Sequence[TensorSpec] = (),
    *,
    batch_size: int,
) -> Iterator[Batch]:
    """One ordered pass over a task's input, straight to batches, with no spill (inference).

    Rows keep their order; every batch has ``batch_size`` rows but the last, which holds the
    rest; there is no filler. Fixed-width numeric columns whose type matches the spec reach
    torch without a copy (a batch that straddles two input batches is the exception: it is
    concatenated). Memory holds one input batch and one output batch at a time.

    Parameters
    ----------
    batches : iterable of pyarrow.RecordBatch
        The task's input, e.g. the iterator ``mapInArrow`` passes to its function.
    features, labels : TensorSpec or sequence of TensorSpec
        What to build (see `deepspark.data.resolve_specs`).
    batch_size : int
        Rows per batch.

    Yields
    ------
    Batch
        With ``num_real`` equal to its number of rows.

    Examples
    --------
    >>> import pyarrow as pa
    >>> from deepspark.data import TensorSpec
    >>> data = [pa.record_batch({"x": [1.0, 2.0, 3.0]}), pa.record_batch({"x": [4.0, 5.0]})]
    >>> [b.features[0].tolist() for b in iter_batches(data, TensorSpec("x", "scalar"),
    ...                                                 batch_size=2)]
    [[1.0, 2.0], [3.0, 4.0], [5.0]]
    """
    _check_batch_size(batch_size)
    features, labels = normalize_specs(features), normalize_specs(labels)
    specs = features + labels
    if not specs:
        raise FeedError("iter_batches needs at least one feature or label spec")

    def windows() -> Iterator[_Window]:
        for batch in batches:
            prepared = [prepare_column(batch, spec) for spec in specs]
            yield _Window(prepared, batch.num_rows)

    return _built(_ordered_pending(windows, batch_size, detach=False), features, labels)
