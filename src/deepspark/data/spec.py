"""What a requested column becomes: `TensorSpec`, its kinds and dtypes, and `FeedError`.

Worker side: this module never imports pyspark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch

from deepspark.errors import DeepsparkError

__all__ = ["ColumnKind", "FeedError", "TensorSpec", "assemble", "normalize_specs"]


class FeedError(DeepsparkError, ValueError):
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
    field : tuple of str
        For a field of a struct column: the path of field names inside ``columns[0]``
        (``("b",)`` for ``s.b``); empty for a top-level column.
    place : tuple
        Where the tensor goes among the model's arguments (see `assemble`): empty for the
        next positional argument (every spec of a set, or none, has a place); otherwise the
        argument's position followed by the dict keys leading to the tensor, e.g. ``(0,
        "image")`` for ``forward({"image": ...})``.

    Examples
    --------
    >>> TensorSpec("image", "array", (1, 28, 28))
    TensorSpec(columns=('image',), kind=<ColumnKind.ARRAY: 'array'>, shape=(1, 28, 28), dtype='float32', decode=None, field=(), place=())
    >>> TensorSpec(("x1", "x2"), "scalar").shape
    (2,)
    >>> TensorSpec("meta", "array", field=("box",), place=(1, "box")).name
    'meta.box'
    """  # noqa: E501

    columns: tuple[str, ...]
    kind: ColumnKind
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    decode: Callable[[Any], Any] | None = None
    field: tuple[str, ...] = ()
    place: tuple[int | str, ...] = ()

    def __post_init__(self) -> None:
        columns = (self.columns,) if isinstance(self.columns, str) else tuple(self.columns)
        if not columns or not all(isinstance(name, str) and name for name in columns):
            raise FeedError(f"TensorSpec columns must be non-empty names, got {self.columns!r}")
        field = (self.field,) if isinstance(self.field, str) else tuple(self.field)
        if not all(isinstance(name, str) and name for name in field):
            raise FeedError(f"column {columns[0]!r}: field must be field names, got {self.field!r}")
        if field and len(columns) > 1:
            raise FeedError(f"columns {list(columns)}: a struct field is read from one column")
        place = tuple(self.place)
        if place and not (
            isinstance(place[0], int)
            and not isinstance(place[0], bool)
            and place[0] >= 0
            and all(isinstance(key, str) for key in place[1:])
        ):
            raise FeedError(
                f"column {columns[0]!r}: place must be an argument position followed by dict "
                f"keys, e.g. (0, 'image'), got {self.place!r}"
            )
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
        object.__setattr__(self, "field", field)
        object.__setattr__(self, "place", place)

    @property
    def name(self) -> str:
        """The column name (``s.b`` for a struct field), or stacked names joined by ``+``."""
        if self.field:
            return ".".join((self.columns[0], *self.field))
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


def assemble(specs: Sequence[TensorSpec], tensors: Sequence[Any]) -> tuple[Any, ...]:
    """Arrange one tensor per spec into the model's positional arguments.

    Specs without a place give one argument each, in order (the tuple of tensors itself).
    Specs with places build each argument from them: ``(1,)`` is argument 1 itself,
    ``(0, "text")`` the key ``"text"`` of argument 0, a dict; deeper keys nest dicts (the fields
    of a struct column). `deepspark.data.resolve_specs` gives places to every spec of a
    ``feature_cols`` (or ``label_cols``) dict and of a list holding struct columns.

    Examples
    --------
    >>> import torch
    >>> specs = [TensorSpec("a", "scalar", place=(0, "x")), TensorSpec("b", "scalar",
    ...                                                                place=(0, "y"))]
    >>> (arguments,) = assemble(specs, [torch.zeros(2), torch.ones(2)])
    >>> sorted(arguments)
    ['x', 'y']
    """
    if not any(spec.place for spec in specs):
        return tuple(tensors)
    arguments: dict[int, Any] = {}
    for spec, tensor in zip(specs, tensors, strict=True):
        if not spec.place:
            raise FeedError(
                f"column {spec.name!r} has no place while other specs have one; give every "
                "spec of a set a place, or none"
            )
        position, *keys = spec.place
        if not keys:
            arguments[int(position)] = tensor
            continue
        node = arguments.setdefault(int(position), {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = tensor
    if sorted(arguments) != list(range(len(arguments))):
        raise FeedError(f"the specs' places skip argument positions: {sorted(arguments)}")
    return tuple(arguments[position] for position in range(len(arguments)))


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
