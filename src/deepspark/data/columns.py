"""Arrow columns to torch tensors: what a requested column is, and how its values are converted.

Worker side: this module never imports pyspark.

Conversion runs in two stages so that every path (inference batches, shuffled epochs, the
driver's first-rows check) shares one implementation:

* ``prepare_column`` turns one Arrow column into a numpy array of shape ``(rows, *shape)`` in
  the target dtype. A single fixed-width numeric column whose type already matches is a view
  of the Arrow buffer (no copy); arrays are a view of their flat values, reshaped. Copies
  happen only where the layout forces one: stacking several scalar columns, casting to another
  dtype, Arrow booleans (bit-packed), and Spark ML vectors (densified). Binary and string
  columns stay Arrow arrays until a batch of rows is decoded.
* ``column_tensor`` picks rows (all, a slice, or a gather by index) from a prepared column and
  returns the torch tensor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

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


class FeedError(ValueError):
    """Data that cannot be fed to a model as asked.

    The message names the column or argument, what was found, and what to do about it.
    """


class ColumnKind(str, Enum):
    """How a DataFrame column becomes a tensor."""

    SCALAR = "scalar"  # numeric or boolean; several may stack into one (n, k) tensor
    ARRAY = "array"  # array<numeric> (possibly nested), reshaped to a declared per-row shape
    VECTOR = "vector"  # Spark ML / MLlib Vector, dense or sparse, densified
    BINARY = "binary"  # bytes, through a user decode function
    STRING = "string"  # text, through a user decode function (e.g. a tokenizer)


_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64"}
# numpy has no bfloat16: such columns are prepared as float32 and cast by torch per batch.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name) for name in _TORCH_DTYPES if name != "bfloat16"
}

Prepared = np.ndarray | pa.Array
"""A prepared column: a numpy array ``(rows, *shape)``, or an Arrow array awaiting decode."""

RowIndex = slice | np.ndarray | None
"""Which rows of a prepared column to turn into a tensor: all, a slice, or positions."""


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, built from one column or from several scalar columns stacked.

    Parameters
    ----------
    columns : tuple of str
        One column name, or several scalar columns that stack into an ``(n, k)`` tensor.
        A single string is accepted.
    kind : ColumnKind
        How the column is read (a plain string such as ``"array"`` is accepted).
    shape : tuple of int
        Per-row shape: ``()`` for a scalar (``(1,)`` gives it an ``(n, 1)`` tensor), ``(k,)``
        for ``k`` stacked scalars or a vector,
        e.g. ``(1, 28, 28)`` for an array. For array, vector, binary and string columns an
        empty shape means "take it from the data" (``resolve_specs`` always fills it in, which
        fixed-shape filler batches for empty partitions rely on).
    dtype : str
        The torch dtype name: ``"float32"`` (default), ``"int64"`` for class ids, ``"float16"``,
        ``"bfloat16"``, ``"float64"``, ``"int8"``... ``"bool"``. A ``torch.dtype`` is accepted.
    decode : callable, optional
        Required for binary (``bytes -> array``) and string (``str -> array or list``) columns;
        called once per row; every row must decode to the same shape.

    Examples
    --------
    >>> TensorSpec("image", "array", (1, 28, 28))
    TensorSpec(columns=('image',), kind=<ColumnKind.ARRAY: 'array'>, shape=(1, 28, 28), dtype='float32', decode=None)
    >>> TensorSpec(("x1", "x2"), "scalar").shape
    (2,)
    """  # noqa: E501

    columns: tuple[str, ...]
    kind: ColumnKind
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    decode: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        columns = (self.columns,) if isinstance(self.columns, str) else tuple(self.columns)
        if not columns or not all(isinstance(name, str) and name for name in columns):
            raise FeedError(f"TensorSpec columns must be non-empty names, got {self.columns!r}")
        try:
            kind = ColumnKind(self.kind)
        except ValueError:
            kinds = ", ".join(repr(k.value) for k in ColumnKind)
            raise FeedError(
                f"column {columns[0]!r}: kind={self.kind!r} is not known; use one of {kinds}"
            ) from None
        shape = (self.shape,) if isinstance(self.shape, int) else tuple(self.shape)
        if not all(isinstance(size, (int, np.integer)) and size > 0 for size in shape):
            raise FeedError(
                f"column {columns[0]!r}: shape must be positive integers, got {self.shape!r}"
            )
        shape = tuple(int(size) for size in shape)
        if len(columns) > 1:
            if kind is not ColumnKind.SCALAR:
                raise FeedError(
                    f"columns {list(columns)}: only scalar columns can be stacked into one "
                    f"tensor, but kind={kind.value!r}; list the {kind.value} column on its own"
                )
            if shape not in ((), (len(columns),)):
                raise FeedError(
                    f"columns {list(columns)}: {len(columns)} stacked scalar columns have shape "
                    f"({len(columns)},), not {shape}"
                )
            shape = (len(columns),)
        elif kind is ColumnKind.SCALAR and shape not in ((), (1,)):
            raise FeedError(
                f"column {columns[0]!r} is a scalar column, so its shape is () (or (1,) for an "
                f"(n, 1) tensor), not {shape}; for more values per row use an array or vector "
                "column, or stack several scalar columns"
            )
        if kind in (ColumnKind.BINARY, ColumnKind.STRING):
            if self.decode is None:
                raise FeedError(
                    f"column {columns[0]!r} is a {kind.value} column and needs a decode "
                    f"function ({'bytes' if kind is ColumnKind.BINARY else 'str'} -> array), "
                    f"e.g. decoders={{{columns[0]!r}: my_decode}}"
                )
        elif self.decode is not None:
            raise FeedError(
                f"column {columns[0]!r} is a {kind.value} column; decode functions apply to "
                "binary and string columns only"
            )
        if not callable(self.decode) and self.decode is not None:
            raise FeedError(f"column {columns[0]!r}: decode must be callable, got {self.decode!r}")
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", _dtype_name(self.dtype, columns[0]))

    @property
    def name(self) -> str:
        """The column name, or the stacked names joined by ``+``, for messages."""
        return "+".join(self.columns)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @property
    def row_numel(self) -> int:
        """Values per row (1 for a scalar); 0 when the shape is still to be taken from data."""
        if not self.shape and self.kind is not ColumnKind.SCALAR:
            return 0
        return math.prod(self.shape)


def normalize_specs(specs: TensorSpec | Sequence[TensorSpec] | None) -> tuple[TensorSpec, ...]:
    """Accept one spec, a sequence of specs or nothing; always return a tuple."""
    if specs is None:
        return ()
    if isinstance(specs, TensorSpec):
        return (specs,)
    result = tuple(specs)
    for spec in result:
        if not isinstance(spec, TensorSpec):
            raise FeedError(
                f"expected TensorSpec objects (from deepspark.data.resolve_specs), got {spec!r}"
            )
    return result


def _dtype_name(dtype: Any, column: str) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    if name not in _TORCH_DTYPES:
        known = ", ".join(sorted(_TORCH_DTYPES))
        raise FeedError(f"column {column!r}: dtype {dtype!r} is not supported; use one of {known}")
    return name


def _numpy_dtype(spec: TensorSpec) -> np.dtype | None:
    return _NUMPY_DTYPES.get(spec.dtype)


# ---------------------------------------------------------------------------------------------
# Stage 1: Arrow column -> prepared numpy array (or Arrow array for decode kinds).


def prepare_column(
    batch: pa.RecordBatch, spec: TensorSpec, out: np.ndarray | None = None
) -> Prepared:
    """Turn ``spec``'s column(s) of ``batch`` into an array of shape ``(rows, *shape)``.

    With ``out`` (a preallocated ``(rows, *shape)`` array) the values are written there, cast
    on the way, and ``out`` is returned; without it the result is a zero-copy view of the Arrow
    buffers when the type already matches. Binary and string columns return the checked Arrow
    array; ``out`` does not apply to them.
    """
    arrays = [_column(batch, name) for name in spec.columns]
    rows = batch.num_rows
    if spec.kind is ColumnKind.SCALAR:
        target = _numpy_dtype(spec)
        if len(arrays) == 1:
            values = _numeric(arrays[0], spec.columns[0]).reshape((rows, *spec.shape))
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
    arrays = [_column(batch, name) for name in spec.columns]
    if spec.kind is ColumnKind.SCALAR:
        for name, array in zip(spec.columns, arrays, strict=True):
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
    name = spec.columns[0]
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
    name = spec.columns[0]
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
    name = spec.columns[0]
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


# ---------------------------------------------------------------------------------------------
# Stage 2: prepared column -> tensor for some rows.


def column_tensor(prepared: Prepared, spec: TensorSpec, rows: RowIndex = None) -> torch.Tensor:
    """The tensor for ``rows`` of a prepared column (a view for slices, a gather for indices)."""
    if isinstance(prepared, np.ndarray):
        selected = prepared if rows is None else prepared[rows]
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
