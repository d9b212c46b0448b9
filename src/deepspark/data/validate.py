"""Driver-side checks: turn column names into `TensorSpec` objects before any job starts.

Runs on the driver and may use pyspark (imported when called). The kinds and default dtypes
come from the Spark schema; a cheap look at the first rows (``df.limit(n)``) runs the same
worker-side conversion, so a wrong shape, a null or a decoder that fails shows up here, with
the argument named, instead of inside a task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deepspark.context.spark_versions import collect_arrow
from deepspark.data.cache import cached_frame_of
from deepspark.data.columns import batch_to_tensors
from deepspark.data.spec import ColumnKind, FeedError, TensorSpec

__all__ = ["resolve_specs"]

ColumnsArg = str | Sequence[str | Sequence[str]] | Mapping[str, str | Sequence[str]] | None

_ROLES = {"feature": "feature_cols", "label": "label_cols"}
_INTEGRAL = ("ByteType", "ShortType", "IntegerType", "LongType")
_FLOATING = ("FloatType", "DoubleType")


@dataclass(frozen=True)
class _Group:
    """One entry of a columns argument: the columns of one tensor (or of one struct's dict)."""

    names: tuple[str, ...]
    stacked: bool  # a list of scalar columns stacked into one (n, k) tensor
    key: str | None  # the entry's key in a dict argument


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def resolve_specs(
    df: Any,
    cols: ColumnsArg,
    *,
    role: str,
    shapes: Mapping[str, Any] | None = None,
    dtypes: Mapping[Any, Any] | None = None,
    decoders: Mapping[str, Callable[[Any], Any]] | None = None,
    check_rows: int = 8,
    sample: Any = None,
) -> tuple[TensorSpec, ...]:
    """Check the requested columns of a DataFrame and describe the tensors they become.

    Parameters
    ----------
    df : pyspark.sql.DataFrame
        Classic or Spark Connect.
    cols : str, list or dict
        A column name, or a list whose items are names or nested lists of scalar column
        names; a nested list stacks its columns into one ``(n, k)`` tensor (a nested list of
        one non-scalar column is that column). A dict ``{name: column or list}`` makes one
        argument, a dict of tensors under those names: ``feature_cols={"text": "tokens",
        "image": ["pixels"]}`` calls ``forward({"text": ..., "image": ...})``. A struct column
        becomes a dict of its fields' tensors at its place (nested structs nest dicts); its
        fields follow the rules of top-level columns. For labels, ``None`` or ``[]`` means
        none.
    role : {"feature", "label"}
        Sets the default dtypes and the argument named in messages (``feature_cols`` or
        ``label_cols``).
    shapes : dict, optional
        Per-row shape by column name, e.g. ``{"image": (1, 28, 28)}``; a struct field is
        named by its path, ``"meta.box"``. Arrays without one take their length (or nested
        lengths) from the first row; decoded columns take the decoder's output shape on the
        first row.
    dtypes : dict, optional
        Torch dtype name by column name (a stacked group: its first name, or the tuple; a
        struct field: its path, or the struct's name for all its fields).
        Defaults: ``float32`` for features; for labels ``int64`` when the values are integers
        (class ids), ``float32`` otherwise.
    decoders : dict, optional
        Decode function by column name (or struct field path); required for binary and
        string columns.
    check_rows : int
        How many first rows to convert as a check (0 skips the look).
    sample : pyarrow.Table, optional
        First rows the caller already fetched (holding the requested columns); saves the
        look its own Spark job.

    Returns
    -------
    tuple of TensorSpec
        With every shape filled in (when the DataFrame has rows). With a dict or a struct
        column every spec has a place (see `deepspark.data.assemble`); otherwise none has.

    Raises
    ------
    FeedError
        A missing column (the message lists the available ones), an unsupported type (of a
        column or of a struct field), a binary or string column without a decoder, a shape
        the first rows do not match, nulls or ragged arrays in the first rows.

    Examples
    --------
    >>> import deepspark as ds
    >>> spark = ds.init_context(cores=2)  # doctest: +SKIP
    >>> df = spark.createDataFrame([([0.0] * 4, 1)], "x array<float>, y int")  # doctest: +SKIP
    >>> [(s.columns, s.kind.value, s.shape, s.dtype)
    ...  for s in resolve_specs(df, ["x"], role="feature")]  # doctest: +SKIP
    [(('x',), 'array', (4,), 'float32')]
    >>> resolve_specs(df, "y", role="label")[0].dtype  # doctest: +SKIP
    'int64'
    >>> [s.place for s in resolve_specs(df, {"pixels": "x"}, role="feature")]  # doctest: +SKIP
    [(0, 'pixels')]
    """
    if role not in _ROLES:
        raise ValueError(f"role={role!r}: use 'feature' or 'label'")
    arg = _ROLES[role]
    groups = _column_groups(cols, arg, allow_empty=role == "label")
    if not groups:
        return ()
    fields = {field.name: field for field in df.schema.fields}
    shapes, dtypes, decoders = dict(shapes or {}), dict(dtypes or {}), dict(decoders or {})
    known = _known_names(fields)
    # named as the user passed them: feature_shapes serves labels too, dtypes go by role
    for option, mapping in (
        ("feature_shapes", shapes),
        (f"{role}_dtypes", dtypes),
        ("decoders", decoders),
    ):
        _check_keys(option, mapping, known)
    for group in groups:
        for name in group.names:
            _check_exists(name, fields, arg if group.key is None else f"{arg}[{group.key!r}]")
    structured = isinstance(cols, Mapping) or any(
        _is_struct(fields[name].dataType) for group in groups for name in group.names
    )
    options = _Options(role, arg, shapes, dtypes, decoders)
    specs: list[TensorSpec] = []
    for position, group in enumerate(groups):
        place: tuple[int | str, ...] = ()
        if structured:
            place = (0, group.key) if group.key is not None else (position,)
        names = group.names
        data_types = [fields[name].dataType for name in names]
        if len(names) == 1 and _is_struct(data_types[0]):
            specs.extend(_struct_specs(names[0], (), data_types[0], place, options))
            continue
        kinds = [
            _kind_of(name, data_type, arg)
            for name, data_type in zip(names, data_types, strict=True)
        ]
        stacked = group.stacked and not (len(names) == 1 and kinds[0] is not ColumnKind.SCALAR)
        if stacked and any(kind is not ColumnKind.SCALAR for kind in kinds):
            bad = [n for n, k in zip(names, kinds, strict=True) if k is not ColumnKind.SCALAR]
            raise FeedError(
                f"{arg}: the nested list {list(names)} stacks scalar columns into one tensor, "
                f"but {bad} {'is' if len(bad) == 1 else 'are'} not scalar; list such columns "
                "on their own"
            )
        kind = kinds[0]
        dtype = _dtype_for(names, stacked, dtypes, role, data_types)
        shape = shapes.get(names[0], ()) if not stacked else (len(names),)
        specs.append(_spec(names, kind, shape, dtype, decoders.get(names[0]), arg, place=place))
    if check_rows > 0:
        specs = _check_first_rows(df, specs, arg, check_rows, sample)
    return tuple(specs)


@dataclass(frozen=True)
class _Options:
    role: str
    arg: str
    shapes: Mapping[str, Any]
    dtypes: Mapping[Any, Any]
    decoders: Mapping[str, Callable[[Any], Any]]


def _spec(
    names: tuple[str, ...],
    kind: ColumnKind,
    shape: Any,
    dtype: Any,
    decoder: Callable[[Any], Any] | None,
    arg: str,
    **where: Any,
) -> TensorSpec:
    label = ".".join((names[0], *where.get("field", ())))
    try:
        return TensorSpec(
            names,
            kind,
            _shape(shape, label, arg),
            dtype,
            decoder if kind in (ColumnKind.BINARY, ColumnKind.STRING) else None,
            **where,
        )
    except FeedError as error:
        raise FeedError(f"{arg}: {error}") from None


def _struct_specs(
    column: str,
    path: tuple[str, ...],
    data_type: Any,
    place: tuple[int | str, ...],
    options: _Options,
) -> list[TensorSpec]:
    """One spec per (nested) field of a struct column, placed under the field names."""
    label = ".".join((column, *path))
    if not data_type.fields:
        raise FeedError(f"{options.arg}: struct column {label!r} has no fields")
    specs: list[TensorSpec] = []
    for field in data_type.fields:
        field_path = (*path, field.name)
        full = ".".join((column, *field_path))
        if _is_struct(field.dataType):
            specs.extend(
                _struct_specs(column, field_path, field.dataType, (*place, field.name), options)
            )
            continue
        kind = _kind_of(full, field.dataType, options.arg, what="struct field")
        dtype = options.dtypes.get(full) or options.dtypes.get(column)
        if dtype is None:
            dtype = _dtype_for((full,), False, {}, options.role, [field.dataType])
        specs.append(
            _spec(
                (column,),
                kind,
                options.shapes.get(full, ()),
                dtype,
                options.decoders.get(full),
                options.arg,
                field=field_path,
                place=(*place, field.name),
            )
        )
    return specs


def _is_struct(data_type: Any) -> bool:
    return _type_name(data_type) == "StructType"


def _known_names(fields: Mapping[str, Any]) -> set[str]:
    """Top-level column names and the dotted paths of struct fields (``meta.box``)."""
    known: set[str] = set()

    def visit(prefix: str, data_type: Any) -> None:
        known.add(prefix)
        if _is_struct(data_type):
            for field in data_type.fields:
                visit(f"{prefix}.{field.name}", field.dataType)

    for name, field in fields.items():
        visit(name, field.dataType)
    return known


def _column_groups(cols: ColumnsArg, arg: str, *, allow_empty: bool) -> list[_Group]:
    if cols is None or (
        isinstance(cols, (Sequence, Mapping)) and not isinstance(cols, str) and not cols
    ):
        if allow_empty:
            return []
        raise FeedError(f"{arg} is empty: name at least one column")
    if isinstance(cols, Mapping):
        groups = []
        for key, item in cols.items():
            if not isinstance(key, str) or not key:
                raise FeedError(
                    f"{arg}: the dict's keys name the model's inputs and must be non-empty "
                    f"strings, got {key!r}"
                )
            group = _group(item, f"{arg}[{key!r}]", key)
            groups.append(group)
        return groups
    items = [cols] if isinstance(cols, str) else list(cols)
    return [_group(item, arg, None) for item in items]


def _group(item: Any, where: str, key: str | None) -> _Group:
    if isinstance(item, str):
        return _Group((item,), False, key)
    if (
        isinstance(item, Sequence)
        and not isinstance(item, str)
        and item
        and all(isinstance(n, str) for n in item)
    ):
        return _Group(tuple(item), True, key)
    raise FeedError(
        f"{where}: {item!r} is neither a column name nor a non-empty list of names "
        "(a nested list stacks scalar columns into one tensor)"
    )


def _check_exists(name: str, fields: Mapping[str, Any], arg: str) -> None:
    if name in fields:
        return
    available = ", ".join(fields) or "(none)"
    close = [field for field in fields if field.lower() == name.lower()]
    hint = f" (did you mean {close[0]!r}? names are matched exactly)" if close else ""
    if "." in name and not close:
        hint = (
            f" (a struct field is not read on its own: name the struct column "
            f"{name.split('.')[0]!r} for a dict of all its fields, or select the field as a "
            "top-level column)"
        )
    raise FeedError(
        f"{arg}: column {name!r} is not in the DataFrame{hint}; available columns: {available}"
    )


def _check_keys(option: str, mapping: Mapping[Any, Any], known: set[str]) -> None:
    # A typo in a key would otherwise be ignored silently. Tuple keys name stacked groups;
    # dotted keys name struct fields.
    unknown = [
        key
        for key in mapping
        if any(name not in known for name in (key if isinstance(key, tuple) else (key,)))
    ]
    if unknown:
        top_level = sorted(name for name in known if "." not in name)
        raise FeedError(
            f"{option}: {unknown} "
            f"{'is not a DataFrame column' if len(unknown) == 1 else 'are not DataFrame columns'} "
            f"(nor a struct field such as 'column.field'); available columns: "
            f"{', '.join(top_level)}"
        )


def _type_name(data_type: Any) -> str:
    return type(data_type).__name__


def _kind_of(name: str, data_type: Any, arg: str, what: str = "column") -> ColumnKind:
    type_name = _type_name(data_type)
    if type_name in _INTEGRAL or type_name in _FLOATING or type_name == "BooleanType":
        return ColumnKind.SCALAR
    if type_name == "DecimalType":
        raise FeedError(
            f"{arg}: {what} {name!r} is {data_type.simpleString()}; cast it to double first "
            f"(F.col({name!r}).cast('double'))"
        )
    if type_name == "ArrayType":
        element = data_type.elementType
        while _type_name(element) == "ArrayType":
            element = element.elementType
        element_name = _type_name(element)
        if element_name in _INTEGRAL or element_name in _FLOATING or element_name == "BooleanType":
            return ColumnKind.ARRAY
        raise FeedError(
            f"{arg}: {what} {name!r} is {data_type.simpleString()}; arrays must hold numbers "
            "(for text, use a string column with a decoder)"
        )
    if type_name == "BinaryType":
        return ColumnKind.BINARY
    if type_name in ("StringType", "VarcharType", "CharType"):
        return ColumnKind.STRING
    if hasattr(data_type, "sqlType") and data_type.simpleString() == "vector":
        return ColumnKind.VECTOR
    raise FeedError(
        f"{arg}: {what} {name!r} has type {data_type.simpleString()}, which cannot become a "
        "tensor; supported: numeric and boolean scalars, arrays of numbers, ML vectors, "
        "binary (with a decoder), string (with a decoder) and structs of these"
    )


def _is_integral(data_type: Any) -> bool:
    while _type_name(data_type) == "ArrayType":
        data_type = data_type.elementType
    return _type_name(data_type) in _INTEGRAL


def _dtype_for(
    names: tuple[str, ...],
    stacked: bool,
    dtypes: Mapping[Any, Any],
    role: str,
    data_types: Sequence[Any],
) -> str:
    for key in (names, names[0]) if stacked else (names[0],):
        if key in dtypes:
            return dtypes[key]
    if role == "label" and all(_is_integral(t) for t in data_types):
        return "int64"
    return "float32"


def _shape(shape: Any, name: str, arg: str) -> tuple[int, ...]:
    if isinstance(shape, int):
        return (shape,)
    try:
        return tuple(int(size) for size in shape)
    except TypeError:
        raise FeedError(f"{arg}: shapes[{name!r}]={shape!r} is not a tuple of ints") from None


def first_rows(df: Any, columns: list[str], rows: int) -> Any:
    """The first `rows` rows of `columns` as a pyarrow Table (one small Spark job).

    For a DataFrame kept by `deepspark.cache`, the rows come from the cache's sample, with
    no Spark job.
    """
    cached = cached_frame_of(df)
    if cached is not None:
        kept = cached.first_rows(columns, rows)
        if kept is not None:
            return kept
    return collect_arrow(df.select(*columns).limit(rows))


def _check_first_rows(
    df: Any, specs: list[TensorSpec], arg: str, rows: int, sample: Any = None
) -> list[TensorSpec]:
    columns = list(dict.fromkeys(name for spec in specs for name in spec.columns))
    if sample is None or not set(columns) <= set(sample.column_names):
        sample = first_rows(df, columns, rows)
    if sample.num_rows == 0:
        return specs
    resolved = []
    for spec in specs:
        try:
            (tensor,) = batch_to_tensors(sample, [spec])
        except FeedError as error:
            raise FeedError(f"{arg}: {error} (found in the first {sample.num_rows} rows)") from None
        except Exception as error:  # a user decoder failing is reported with its column
            raise FeedError(
                f"{arg}: decoding column {spec.name!r} failed on the first rows: "
                f"{type(error).__name__}: {error}"
            ) from error
        if not spec.shape and spec.kind is not ColumnKind.SCALAR:
            spec = dataclasses.replace(spec, shape=tuple(tensor.shape[1:]))
        resolved.append(spec)
    return resolved
