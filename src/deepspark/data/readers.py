"""Stage 1 of the conversion: an Arrow column, checked, as a numpy array of rows.

Worker side: this module never imports pyspark.

``prepare_column`` turns one Arrow column into a numpy array of shape ``(rows, *shape)`` in the
target dtype. A single fixed-width numeric column whose type already matches is a view of the
Arrow buffer (no copy); arrays are a view of their flat values, reshaped. Copies happen only
where the layout forces one: stacking several scalar columns, casting to another dtype, Arrow
booleans (bit-packed) and Spark ML vectors (densified). Binary and string columns stay Arrow
arrays until a batch of rows is decoded (`deepspark.data.columns.column_tensor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepspark.data.spec import ColumnKind, FeedError, TensorSpec, _numpy_dtype

__all__ = ["Prepared", "RowIndex", "check_column", "prepare_column"]

Prepared = np.ndarray | pa.Array
"""A prepared column: a numpy array ``(rows, *shape)``, or an Arrow array awaiting decode."""

RowIndex = slice | np.ndarray | None
"""Which rows of a prepared column to turn into a tensor: all, a slice, or positions."""


def prepare_column(
    batch: pa.RecordBatch, spec: TensorSpec, out: np.ndarray | None = None
) -> Prepared:
    """Turn ``spec``'s column(s) of ``batch`` into an array of shape ``(rows, *shape)``.

    With ``out`` (a preallocated ``(rows, *shape)`` array) the values are written there, cast
    on the way, and ``out`` is returned; without it the result is a zero-copy view of the Arrow
    buffers when the type already matches. Binary and string columns return the checked Arrow
    array; ``out`` does not apply to them.

    Examples
    --------
    >>> import numpy as np, pyarrow as pa
    >>> batch = pa.record_batch({"img": pa.array([[1.0, 2.0, 3.0, 4.0]], pa.list_(pa.float32()))})
    >>> values = prepare_column(batch, TensorSpec("img", "array", (2, 2)))
    >>> values.shape, np.shares_memory(values, batch.column(0).values.to_numpy())
    ((1, 2, 2), True)
    """
    arrays = _arrays(batch, spec)
    rows = batch.num_rows
    if spec.kind is ColumnKind.SCALAR:
        target = _numpy_dtype(spec)
        if len(arrays) == 1:
            values = _numeric(arrays[0], spec.name).reshape((rows, *spec.shape))
            if out is not None:
                out[...] = values
                return out
            return values if target is None or values.dtype == target else values.astype(target)
        if out is None:
            dtype = target if target is not None else np.dtype(np.float32)
            out = np.empty((rows, len(arrays)), dtype=dtype)
        for position, (name, array) in enumerate(zip(spec.columns, arrays, strict=True)):
            out[:, position] = _numeric(array, name)
        return out
    if spec.kind is ColumnKind.ARRAY:
        return _prepare_array(arrays[0], spec, out)
    if spec.kind is ColumnKind.VECTOR:
        return _prepare_vector(arrays[0], spec, out)
    return _prepare_encoded(arrays[0], spec)


def check_column(batch: pa.RecordBatch, spec: TensorSpec) -> tuple[int, ...]:
    """Check nulls, types and per-row lengths without converting values; return the row shape.

    Cheap: it reads validity counts and list offsets, never the values themselves, so a whole
    spilled partition can be checked before the first step.
    """
    arrays = _arrays(batch, spec)
    if spec.kind is ColumnKind.SCALAR:
        names = spec.columns if len(arrays) > 1 else (spec.name,)
        for name, array in zip(names, arrays, strict=True):
            _check_numeric_type(array.type, name)
            _check_no_nulls(array, name, "values")
        return spec.shape
    if spec.kind is ColumnKind.ARRAY:
        _, _, shape = _array_layout(arrays[0], spec)
        return shape
    if spec.kind is ColumnKind.VECTOR:
        return (_vector_layout(arrays[0], spec).dim,)
    _prepare_encoded(arrays[0], spec)
    return spec.shape


def _arrays(batch: pa.RecordBatch, spec: TensorSpec) -> list[pa.Array]:
    """The Arrow arrays ``spec`` reads: its columns, or the struct field it names."""
    if not spec.field:
        return [_column(batch, name) for name in spec.columns]
    array = _column(batch, spec.columns[0])
    path = [spec.columns[0]]
    for name in spec.field:
        where = ".".join(path)
        if not pa.types.is_struct(array.type):
            raise FeedError(f"column {where!r} has type {array.type}, not a struct")
        if array.type.get_field_index(name) < 0:
            fields = ", ".join(f.name for f in array.type) or "(none)"
            raise FeedError(f"struct column {where!r} has no field {name!r}; its fields: {fields}")
        _check_no_nulls(array, where, "structs")
        array = array.field(name)
        path.append(name)
    return [array]


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    index = batch.schema.get_field_index(name)
    if index < 0:
        available = ", ".join(batch.schema.names) or "(none)"
        raise FeedError(f"column {name!r} is not in the data; available columns: {available}")
    return batch.column(index)


def _check_no_nulls(array: pa.Array, name: str, what: str) -> None:
    nulls = array.null_count
    if nulls:
        raise FeedError(
            f"column {name!r} has {nulls} null {what} in a batch of {len(array)} rows; models "
            f"cannot take nulls: drop or fill them in Spark first "
            f"(df.na.drop(subset=[{name!r}]) or df.na.fill(...))"
        )


def _check_numeric_type(arrow_type: pa.DataType, name: str) -> None:
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return
    if pa.types.is_boolean(arrow_type):
        return
    hint = " (cast it to double in Spark)" if pa.types.is_decimal(arrow_type) else ""
    raise FeedError(
        f"column {name!r} has type {arrow_type}, which is not numeric{hint}; numeric scalars, "
        "arrays of numbers, ML vectors, binary and string columns are supported"
    )


def _numeric(array: pa.Array, name: str) -> np.ndarray:
    """A numeric Arrow array as numpy: zero-copy except for booleans (bit-packed in Arrow)."""
    _check_numeric_type(array.type, name)
    _check_no_nulls(array, name, "values")
    return array.to_numpy(zero_copy_only=False)


def _is_list(arrow_type: pa.DataType) -> bool:
    return (
        pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
        or pa.types.is_fixed_size_list(arrow_type)
    )


def _array_layout(array: pa.Array, spec: TensorSpec) -> tuple[pa.Array, int, tuple[int, ...]]:
    """Walk the list levels of an array column: (flat values, rows, row shape), all checked."""
    name = spec.name
    if not _is_list(array.type):
        raise FeedError(
            f"column {name!r} has type {array.type}, not an array of numbers; declare it as a "
            "scalar, vector, binary or string column instead"
        )
    rows = len(array)
    values: pa.Array = array
    level_sizes: list[int] = []
    depth = 0
    while _is_list(values.type):
        what = "arrays" if depth == 0 else "nested arrays"
        _check_no_nulls(values, name, what)
        if pa.types.is_fixed_size_list(values.type):
            size = values.type.list_size
            values = values.flatten()
        else:
            offsets = values.offsets.to_numpy()
            lengths = np.diff(offsets)
            size = int(lengths[0]) if lengths.size else 0
            if depth == 0 and spec.shape and not _is_list(values.type.value_type):
                size = spec.row_numel  # a flat array: every row holds the whole shape
            if lengths.size and (lengths != size).any():
                _raise_ragged(name, spec, lengths, size, depth)
            values = values.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        level_sizes.append(size)
        depth += 1
    _check_numeric_type(values.type, name)
    _check_no_nulls(values, name, "array elements")
    if spec.shape:
        found = math.prod(level_sizes)
        if rows and found != spec.row_numel:
            raise FeedError(
                f"column {name!r}: declared shape {spec.shape} needs {spec.row_numel} values per "
                f"row, but its rows hold {' x '.join(map(str, level_sizes))} = {found}; fix "
                "shapes=... or the data"
            )
        return values, rows, spec.shape
    return values, rows, tuple(level_sizes)


def _raise_ragged(name: str, spec: TensorSpec, lengths: np.ndarray, size: int, depth: int) -> None:
    wrong = np.flatnonzero(lengths != size)
    found = np.unique(lengths[wrong])
    found_text = ", ".join(str(int(length)) for length in found[:5])
    if depth == 0:
        declared = f" (shape {spec.shape})" if spec.shape else " (the first row's length)"
        where = f"{wrong.size} of {lengths.size} rows, first at row {int(wrong[0])}"
    else:
        declared = ""
        where = f"{wrong.size} of {lengths.size} nested arrays at depth {depth}"
    raise FeedError(
        f"column {name!r} is ragged: expected arrays of length {size}{declared}, found length "
        f"{found_text} in {where}; pad or filter the rows in Spark so every row has the same "
        "length"
    )


def _prepare_array(array: pa.Array, spec: TensorSpec, out: np.ndarray | None) -> np.ndarray:
    values, rows, shape = _array_layout(array, spec)
    flat = values.to_numpy(zero_copy_only=False)
    if out is not None:
        out.reshape(rows, -1)[...] = flat.reshape(rows, -1)
        return out
    target = _numpy_dtype(spec)
    result = flat.reshape((rows, *shape))
    return result if target is None or result.dtype == target else result.astype(target)


@dataclass
class _VectorLayout:
    dim: int
    dense: np.ndarray  # bool per row
    offsets: np.ndarray  # values offsets per row (rows + 1), into `values`
    values: pa.Array  # child values of the `values` list, starting at offsets[0]
    indices: pa.Array  # flattened indices of the sparse rows, in row order


def _vector_layout(array: pa.Array, spec: TensorSpec) -> _VectorLayout:
    """Read the (type, size, indices, values) struct that Spark ML vectors arrive as."""
    name = spec.name
    arrow_type = array.type
    fields = (
        {arrow_type.field(i).name for i in range(arrow_type.num_fields)}
        if pa.types.is_struct(arrow_type)
        else set()
    )
    if not {"type", "size", "indices", "values"} <= fields:
        raise FeedError(
            f"column {name!r} has type {arrow_type}, not a Spark ML vector "
            "(struct<type, size, indices, values>)"
        )
    _check_no_nulls(array, name, "vectors")
    children = dict(
        zip(
            [arrow_type.field(i).name for i in range(arrow_type.num_fields)],
            array.flatten(),
            strict=True,
        )
    )
    dense = children["type"].to_numpy(zero_copy_only=False) == 1
    values_list = children["values"]
    offsets = values_list.offsets.to_numpy()
    lengths = np.diff(offsets)
    sizes = pc.fill_null(children["size"], 0).to_numpy(zero_copy_only=False)
    dims = np.where(dense, lengths, sizes)
    rows = len(array)
    if spec.shape:
        dim = spec.shape[0]
        if len(spec.shape) != 1:
            raise FeedError(
                f"column {name!r} is a vector column; its shape is (size,), not {spec.shape}"
            )
    else:
        dim = int(dims[0]) if rows else 0
    if rows and (dims != dim).any():
        wrong = np.flatnonzero(dims != dim)
        found = ", ".join(str(int(size)) for size in np.unique(dims[wrong])[:5])
        declared = f"shape {spec.shape}" if spec.shape else "the first row"
        raise FeedError(
            f"column {name!r} has vectors of different sizes: expected {dim} ({declared}), "
            f"found size {found} in {wrong.size} of {rows} rows, first at row {int(wrong[0])}"
        )
    values = values_list.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    _check_no_nulls(values, name, "vector values")
    indices = children["indices"].flatten()
    sparse_values = int(lengths[~dense].sum())
    if len(indices) != sparse_values:
        raise FeedError(
            f"column {name!r}: sparse vectors hold {len(indices)} indices for {sparse_values} "
            "values; the vector data is malformed"
        )
    return _VectorLayout(dim, dense, offsets, values, indices)


def _prepare_vector(array: pa.Array, spec: TensorSpec, out: np.ndarray | None) -> np.ndarray:
    layout = _vector_layout(array, spec)
    rows = len(array)
    target = _numpy_dtype(spec) or np.dtype(np.float32)
    values = layout.values.to_numpy(zero_copy_only=False)
    if layout.dense.all():
        dense = values.reshape(rows, layout.dim)
        if out is not None:
            out[...] = dense
            return out
        return dense.astype(target, copy=dense.dtype != target)
    if out is None:
        out = np.zeros((rows, layout.dim), dtype=target)
    else:
        out[...] = 0
    # Scatter every stored value to (row, column): dense rows store positions 0..dim-1,
    # sparse rows store their indices; both in row order, so one assignment places them all.
    lengths = np.diff(layout.offsets)
    value_rows = np.repeat(np.arange(rows), lengths)
    value_columns = np.empty(values.size, dtype=np.int64)
    dense_values = layout.dense[value_rows]
    starts = layout.offsets[:-1] - layout.offsets[0]
    positions = np.arange(values.size) - starts[value_rows]
    value_columns[dense_values] = positions[dense_values]
    sparse_columns = layout.indices.to_numpy(zero_copy_only=False)
    if sparse_columns.size and (sparse_columns.min() < 0 or sparse_columns.max() >= layout.dim):
        raise FeedError(
            f"column {spec.name!r}: a sparse vector has an index outside 0..{layout.dim - 1}"
        )
    value_columns[~dense_values] = sparse_columns
    out[value_rows, value_columns] = values
    return out


def _prepare_encoded(array: pa.Array, spec: TensorSpec) -> pa.Array:
    name = spec.name
    arrow_type = array.type
    if spec.kind is ColumnKind.BINARY:
        ok = (
            pa.types.is_binary(arrow_type)
            or pa.types.is_large_binary(arrow_type)
            or pa.types.is_fixed_size_binary(arrow_type)
        )
    else:
        ok = pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    if not ok:
        raise FeedError(
            f"column {name!r} has type {arrow_type}, not {spec.kind.value}; declare its kind "
            "to match the data"
        )
    _check_no_nulls(array, name, "values")
    return array
