"""Non-finite values (NaN, inf) in the columns a model trains on, counted per column.

Worker side (no pyspark): a fit's ranks pass their input through `refuse_non_finite`, and the
driver counts the first rows it already fetched with `non_finite_counts`, so that a model is
never trained on NaN or inf without the user asking for it (``fit(allow_non_finite=True)``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from deepspark.data.spec import FeedError

__all__ = ["non_finite_counts", "non_finite_message", "refuse_non_finite"]


def _count(values: pa.Array | pa.ChunkedArray) -> int:
    """Non-finite floats anywhere inside `values` (lists, vectors and structs looked into)."""
    if isinstance(values, pa.ChunkedArray):
        return sum(_count(chunk) for chunk in values.chunks)
    kind = values.type
    if pa.types.is_floating(kind):
        finite = pc.is_finite(values)
        return int(pc.sum(pc.invert(finite)).as_py() or 0)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _count(values.flatten())
    if pa.types.is_struct(kind):  # Spark ML vectors arrive as (type, size, indices, values)
        return sum(_count(values.field(index)) for index in range(kind.num_fields))
    return 0


def non_finite_counts(batch: pa.RecordBatch | pa.Table, columns: Sequence[str]) -> dict[str, int]:
    """How many NaN or infinite values each of `columns` holds in `batch` (zero counts left out).

    Examples
    --------
    >>> import pyarrow as pa
    >>> batch = pa.record_batch({"x": [[1.0, float("nan")], [float("inf"), 2.0]], "y": [0, 1]})
    >>> non_finite_counts(batch, ["x", "y"])
    {'x': 2}
    """
    names = set(batch.schema.names)
    counts = {name: _count(batch.column(name)) for name in columns if name in names}
    return {name: count for name, count in counts.items() if count}


def non_finite_message(counts: dict[str, int], where: str) -> str:
    """The error for non-finite values: each column and its count, and what to do."""
    found = ", ".join(f"column {name!r}: {count}" for name, count in counts.items())
    return (
        f"non-finite values (NaN or inf) in {where} ({found}); a model trained on them learns "
        "NaN. Clean them in Spark (df.na.drop(), df.na.fill(...), or a filter on isnan), or "
        "pass fit(..., allow_non_finite=True) to train on them as they are"
    )


def refuse_non_finite(
    batches: Iterable[pa.RecordBatch], columns: Sequence[str], *, where: str
) -> Iterator[pa.RecordBatch]:
    """Pass `batches` through, counting non-finite values; raise at the end if any were found.

    The whole input is counted before the error, so that it gives every column's full count.

    Raises
    ------
    FeedError
        After the last batch, naming each column with non-finite values and their count.

    Examples
    --------
    >>> import pyarrow as pa
    >>> good = pa.record_batch({"x": [1.0, 2.0]})
    >>> bad = pa.record_batch({"x": [float("nan"), 3.0]})
    >>> len(list(refuse_non_finite([good], ["x"], where="rank 0's rows")))
    1
    >>> list(refuse_non_finite([good, bad], ["x"], where="rank 0"))
    Traceback (most recent call last):
    ...
    deepspark.data.spec.FeedError: non-finite values (NaN or inf) in rank 0 (column 'x': 1); ...
    """
    totals: Counter[str] = Counter()
    for batch in batches:
        totals.update(non_finite_counts(batch, columns))
        yield batch
    if totals:
        raise FeedError(non_finite_message(dict(totals), where))
