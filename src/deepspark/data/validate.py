"""Driver-side checks: turn column names into `TensorSpec` objects before any job starts.

Runs on the driver and may use pyspark (imported when called). The kinds and default dtypes
come from the Spark schema; a cheap look at the first rows (``df.limit(n)``) runs the same
worker-side conversion, so a wrong shape, a null or a decoder that fails shows up here, with
the argument named, instead of inside a task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from deepspark.data.cache import cached_frame_of
from deepspark.data.columns import batch_to_tensors
from deepspark.data.spec import ColumnKind, FeedError, TensorSpec

__all__ = ["resolve_specs"]

ColumnsArg = str | Sequence[str | Sequence[str]] | None

_ROLES = {"feature": "feature_cols", "label": "label_cols"}
_INTEGRAL = ("ByteType", "ShortType", "IntegerType", "LongType")
_FLOATING = ("FloatType", "DoubleType")


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
    cols : str or list
        A column name, or a list whose items are names or nested lists of scalar column
        names; a nested list stacks its columns into one ``(n, k)`` tensor. For labels,
        ``None`` or ``[]`` means none.
    role : {"feature", "label"}
        Sets the default dtypes and the argument named in messages (``feature_cols`` or
        ``label_cols``).
    shapes : dict, optional
        Per-row shape by column name, e.g. ``{"image": (1, 28, 28)}``. Arrays without one
        take their length (or nested lengths) from the first row; decoded columns take the
        decoder's output shape on the first row.
    dtypes : dict, optional
        Torch dtype name by column name (a stacked group: its first name, or the tuple).
        Defaults: ``float32`` for features; for labels ``int64`` when the values are integers
        (class ids), ``float32`` otherwise.
    decoders : dict, optional
        Decode function by column name; required for binary and string columns.
    check_rows : int
        How many first rows to convert as a check (0 skips the look).
    sample : pyarrow.Table, optional
        First rows the caller already fetched (holding the requested columns); saves the
        look its own Spark job.

    Returns
    -------
    tuple of TensorSpec
        With every shape filled in (when the DataFrame has rows).

    Raises
    ------
    FeedError
        A missing column (the message lists the available ones), an unsupported type, a
        binary or string column without a decoder, a shape the first rows do not match, nulls
        or ragged arrays in the first rows.

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
    """
    if role not in _ROLES:
        raise ValueError(f"role={role!r}: use 'feature' or 'label'")
    arg = _ROLES[role]
    groups = _column_groups(cols, arg, allow_empty=role == "label")
    if not groups:
        return ()
    fields = {field.name: field for field in df.schema.fields}
    shapes, dtypes, decoders = dict(shapes or {}), dict(dtypes or {}), dict(decoders or {})
    for option, mapping in (("shapes", shapes), ("dtypes", dtypes), ("decoders", decoders)):
        _check_keys(option, mapping, fields)
    specs = []
    for names, stacked in groups:
        for name in names:
            _check_exists(name, fields, arg)
        data_types = [fields[name].dataType for name in names]
        kinds = [
            _kind_of(name, data_type, arg)
            for name, data_type in zip(names, data_types, strict=True)
        ]
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
        try:
            specs.append(
                TensorSpec(
                    names,
                    kind,
                    _shape(shape, names[0], arg),
                    dtype,
                    decoders.get(names[0])
                    if kind in (ColumnKind.BINARY, ColumnKind.STRING)
                    else None,
                )
            )
        except FeedError as error:
            raise FeedError(f"{arg}: {error}") from None
    if check_rows > 0:
        specs = _check_first_rows(df, specs, arg, check_rows, sample)
    return tuple(specs)


def _column_groups(
    cols: ColumnsArg, arg: str, *, allow_empty: bool
) -> list[tuple[tuple[str, ...], bool]]:
    if cols is None or (isinstance(cols, Sequence) and not isinstance(cols, str) and not cols):
        if allow_empty:
            return []
        raise FeedError(f"{arg} is empty: name at least one column")
    items = [cols] if isinstance(cols, str) else list(cols)
    groups = []
    for item in items:
        if isinstance(item, str):
            groups.append(((item,), False))
        elif isinstance(item, Sequence) and item and all(isinstance(n, str) for n in item):
            groups.append((tuple(item), True))
        else:
            raise FeedError(
                f"{arg}: {item!r} is neither a column name nor a non-empty list of names "
                "(a nested list stacks scalar columns into one tensor)"
            )
    return groups


def _check_exists(name: str, fields: Mapping[str, Any], arg: str) -> None:
    if name in fields:
        return
    available = ", ".join(fields) or "(none)"
    close = [field for field in fields if field.lower() == name.lower()]
    hint = f" (did you mean {close[0]!r}? names are matched exactly)" if close else ""
    if "." in name and not close:
        hint = " (nested fields are not read directly: select them as top-level columns)"
    raise FeedError(
        f"{arg}: column {name!r} is not in the DataFrame{hint}; available columns: {available}"
    )


def _check_keys(option: str, mapping: Mapping[Any, Any], fields: Mapping[str, Any]) -> None:
    # A typo in a key would otherwise be ignored silently. Tuple keys name stacked groups.
    unknown = [
        key
        for key in mapping
        if any(name not in fields for name in (key if isinstance(key, tuple) else (key,)))
    ]
    if unknown:
        raise FeedError(
            f"{option}: {unknown} {'is' if len(unknown) == 1 else 'are'} not DataFrame columns; "
            f"available columns: {', '.join(fields)}"
        )


def _type_name(data_type: Any) -> str:
    return type(data_type).__name__


def _kind_of(name: str, data_type: Any, arg: str) -> ColumnKind:
    type_name = _type_name(data_type)
    if type_name in _INTEGRAL or type_name in _FLOATING or type_name == "BooleanType":
        return ColumnKind.SCALAR
    if type_name == "DecimalType":
        raise FeedError(
            f"{arg}: column {name!r} is {data_type.simpleString()}; cast it to double first "
            f"(df.withColumn({name!r}, F.col({name!r}).cast('double')))"
        )
    if type_name == "ArrayType":
        element = data_type.elementType
        while _type_name(element) == "ArrayType":
            element = element.elementType
        element_name = _type_name(element)
        if element_name in _INTEGRAL or element_name in _FLOATING or element_name == "BooleanType":
            return ColumnKind.ARRAY
        raise FeedError(
            f"{arg}: column {name!r} is {data_type.simpleString()}; arrays must hold numbers "
            "(for text, use a string column with a decoder)"
        )
    if type_name == "BinaryType":
        return ColumnKind.BINARY
    if type_name in ("StringType", "VarcharType", "CharType"):
        return ColumnKind.STRING
    if hasattr(data_type, "sqlType") and data_type.simpleString() == "vector":
        return ColumnKind.VECTOR
    raise FeedError(
        f"{arg}: column {name!r} has type {data_type.simpleString()}, which cannot become a "
        "tensor; supported: numeric and boolean scalars, arrays of numbers, ML vectors, "
        "binary (with a decoder) and string (with a decoder)"
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
    sample = df.select(*columns).limit(rows)
    if hasattr(sample, "toArrow"):  # pyspark >= 4.0, classic and Connect
        return sample.toArrow()
    import pyarrow as pa

    return pa.Table.from_batches(sample._collect_as_arrow())  # pyspark 3.5, classic


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
