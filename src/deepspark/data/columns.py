"""Arrow columns to torch tensors, without per-row Python work for numeric data.

Worker side: this module never imports pyspark.

Conversion runs in two stages so that every path (inference batches, shuffled epochs, the
driver's first-rows check) shares one implementation: `prepare_column` (in
`deepspark.data.readers`) checks an Arrow column and lays it out as a numpy array of rows;
`column_tensor` picks rows from it (all, a slice, or a gather) and returns the tensor.
`batch_to_tensors` does both for a whole batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from deepspark.data.readers import Prepared, RowIndex, check_column, prepare_column
from deepspark.data.spec import ColumnKind, FeedError, TensorSpec, _numpy_dtype, normalize_specs

__all__ = [
    "ColumnKind",
    "FeedError",
    "TensorSpec",
    "batch_to_tensors",
    "check_column",
    "column_tensor",
    "filler_tensor",
    "normalize_specs",
    "prepare_column",
]


def column_tensor(prepared: Prepared, spec: TensorSpec, rows: RowIndex = None) -> torch.Tensor:
    """The tensor for ``rows`` of a prepared column (a view for slices, a gather for indices)."""
    if isinstance(prepared, np.ndarray):
        if rows is None or isinstance(rows, slice) or prepared.ndim == 1:
            selected = prepared if rows is None else prepared[rows]
        else:
            selected = np.take(prepared, rows, axis=0)  # row gathers: ~2x faster than a[rows]
        tensor = _from_numpy(selected)
        if tensor.dtype != spec.torch_dtype:
            tensor = tensor.to(spec.torch_dtype)
        return tensor
    if rows is None:
        encoded = prepared
    elif isinstance(rows, slice):
        start, stop, _ = rows.indices(len(prepared))
        encoded = prepared.slice(start, stop - start)
    else:
        encoded = prepared.take(pa.array(rows))
    return _decode(encoded, spec)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.flags.writeable:
        return torch.from_numpy(array)
    # Views of Arrow buffers are read-only in numpy. The memory is ordinary process memory
    # that nothing else reuses, so sharing it with torch is safe; torch only warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _decode(encoded: pa.Array, spec: TensorSpec) -> torch.Tensor:
    assert spec.decode is not None
    decoded = []
    for value in encoded.to_pylist():
        item = spec.decode(value)
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        decoded.append(np.asarray(item))
    if not decoded:
        return torch.zeros((0, *spec.shape), dtype=spec.torch_dtype)
    shapes = {item.shape for item in decoded}
    if len(shapes) > 1 or (spec.shape and decoded[0].shape != spec.shape):
        expected = spec.shape if spec.shape else decoded[0].shape
        found = sorted(str(shape) for shape in shapes if shape != expected)
        raise FeedError(
            f"column {spec.name!r}: the decode function returned shape {', '.join(found[:3])} "
            f"where {expected} was expected; every row must decode to the declared shape "
            "(pad or resize inside the decode function)"
        )
    stacked = np.stack(decoded)
    if stacked.dtype == np.object_:
        raise FeedError(
            f"column {spec.name!r}: the decode function returned non-numeric values; return "
            "numbers, a numpy array or a tensor"
        )
    target = _numpy_dtype(spec)
    if target is not None and stacked.dtype != target:
        stacked = stacked.astype(target)
    return column_tensor(stacked, spec)


def filler_tensor(spec: TensorSpec, rows: int) -> torch.Tensor:
    """Zeros of the declared shape: the rows of a batch from a partition that has none."""
    return torch.zeros((rows, *spec.shape), dtype=spec.torch_dtype)


# ---------------------------------------------------------------------------------------------


def batch_to_tensors(
    batch: pa.RecordBatch | pa.Table, specs: TensorSpec | Sequence[TensorSpec]
) -> tuple[torch.Tensor, ...]:
    """Convert an Arrow batch (or table) into one tensor per spec, without per-row Python work.

    Parameters
    ----------
    batch : pyarrow.RecordBatch or pyarrow.Table
        The rows, e.g. one batch a Spark task receives from ``mapInArrow``.
    specs : TensorSpec or sequence of TensorSpec
        What to build; see `TensorSpec`.

    Returns
    -------
    tuple of torch.Tensor
        One tensor of shape ``(rows, *spec.shape)`` and dtype ``spec.dtype`` per spec. A
        single numeric column whose type already matches shares the Arrow memory.

    Raises
    ------
    FeedError
        A missing column, an unsupported type, nulls, ragged arrays or vectors, or a decoded
        value of the wrong shape.

    Examples
    --------
    >>> import pyarrow as pa
    >>> batch = pa.record_batch({"x": pa.array([[1.0, 2.0], [3.0, 4.0]]), "y": [0, 1]})
    >>> x, y = batch_to_tensors(batch, [TensorSpec("x", "array", (2,)),
    ...                                 TensorSpec("y", "scalar", dtype="int64")])
    >>> x.dtype, tuple(x.shape), y.tolist()
    (torch.float32, (2, 2), [0, 1])
    """
    specs = normalize_specs(specs)
    if isinstance(batch, pa.Table):
        parts = batch.to_batches() or [_empty_batch(batch.schema)]
        if len(parts) > 1:
            converted = [batch_to_tensors(part, specs) for part in parts]
            return tuple(torch.cat(tensors) for tensors in zip(*converted, strict=True))
        batch = parts[0]
    return tuple(column_tensor(prepare_column(batch, spec), spec) for spec in specs)


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema], schema=schema)
