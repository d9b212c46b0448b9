"""Inputs besides Spark DataFrames: pandas, pandas-on-Spark, and dicts of numpy arrays.

Driver side. `Estimator.fit`, `evaluate` and `predict` hand every input to this module and get
a Spark DataFrame back. An in-memory input (pandas, numpy) is converted once: each needed
column becomes one Arrow array (numeric numpy data without a copy), and the table, cut into one
Arrow batch per worker, goes to Spark as one DataFrame (no pandas round trip, no Python
object per row). A pandas-on-Spark DataFrame is already distributed: it is only unwrapped
(``to_spark``).
`prediction_input` (its own module) gives `predict`'s result back as the type it was given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa

from deepspark.context.spark_versions import frame_from_arrow

if TYPE_CHECKING:
    import pyspark.pandas as ps
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "InputData",
    "InputKind",
    "SparkFrame",
    "as_spark_frame",
    "training_frames",
]

InputData: TypeAlias = "DataFrame | pd.DataFrame | ps.DataFrame | Mapping[str, np.ndarray]"

# Hidden columns: the position of each in-memory row, and a pandas-on-Spark frame's index.
ROW_COLUMN = "__deepspark_row"
INDEX_COLUMN_PREFIX = "__deepspark_index_"

ACCEPTED = (
    "a Spark DataFrame, a pandas DataFrame, a pandas-on-Spark DataFrame "
    "(pyspark.pandas.DataFrame), a dict of numpy arrays {column name: array with one row "
    "per example}, or a data creator: a function (config, batch_size) -> DataLoader"
)

# Spark has no unsigned integers and no half floats: the smallest exact wider type.
_WIDER = {
    np.dtype(np.uint8): np.dtype(np.int16),
    np.dtype(np.uint16): np.dtype(np.int32),
    np.dtype(np.uint32): np.dtype(np.int64),
    np.dtype(np.float16): np.dtype(np.float32),
}


class InputKind(str, Enum):
    """What a user handed to fit, evaluate or predict."""

    SPARK = "Spark DataFrame"
    PANDAS = "pandas DataFrame"
    PANDAS_ON_SPARK = "pandas-on-Spark DataFrame"
    ARRAYS = "dict of numpy arrays"

    @classmethod
    def of(cls, data: Any, argument: str) -> InputKind:
        """The kind of `data`; anything else is refused with the accepted types."""
        if _is_spark_frame(data):
            return cls.SPARK
        if isinstance(data, pd.DataFrame):
            return cls.PANDAS
        if _is_pandas_on_spark(data):
            return cls.PANDAS_ON_SPARK
        if isinstance(data, Mapping):
            return cls.ARRAYS
        hint = ""
        if isinstance(data, np.ndarray):
            hint = "; name the array's column with a dict, e.g. {'features': array}"
        elif isinstance(data, pd.Series):
            hint = "; make it a frame first, e.g. series.to_frame()"
        raise TypeError(f"{argument}: got a {type(data).__name__}; give {ACCEPTED}{hint}")


@dataclass(frozen=True)
class SparkFrame:
    """An input as a Spark DataFrame, and what the conversion learnt on the way.

    ``shapes`` holds the per-row shape of each array column made from in-memory arrays (a
    dict value of shape ``(N, 8, 8)`` gives ``(8, 8)``).
    """

    frame: DataFrame
    kind: InputKind
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def feature_shapes(self, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The shapes learnt here, overridden by those the user gave."""
        if not self.shapes:
            return dict(given) if given is not None else None
        return {**self.shapes, **(given or {})}


def as_spark_frame(
    data: InputData,
    argument: str,
    *,
    columns: Mapping[str, Any] | None = None,
    partitions: int | None = None,
    session: SparkSession | None = None,
    row_index: bool = False,
) -> SparkFrame:
    """`data` as a Spark DataFrame; in-memory data is converted once, on the driver.

    Parameters
    ----------
    data : Spark, pandas or pandas-on-Spark DataFrame, or dict of numpy arrays
        The input. A Spark DataFrame comes back as it is.
    argument : str
        The argument's name, for error messages (``"df"``, ``"validation_data"``).
    columns : dict, optional
        Column arguments by name (``{"feature_cols": ..., "label_cols": ...}``); only the
        columns they name are converted from pandas or numpy. Default: every column.
    partitions : int, optional
        Partitions for in-memory data (e.g. the number of workers); default: the session's
        task slots.
    session : SparkSession, optional
        Where in-memory data goes; default: deepspark's current session.
    row_index : bool
        Add the row's position as a hidden ``__deepspark_row`` column (in-memory data), or keep
        a pandas-on-Spark frame's index as hidden ``__deepspark_index_<level>`` columns.

    Returns
    -------
    SparkFrame

    Raises
    ------
    TypeError
        `data` is of no accepted type, or a column holds objects that are not numbers,
        equal-shaped lists of numbers, strings or bytes.
    ValueError
        No rows, a missing column, arrays of different lengths, or ragged rows.
    RuntimeError
        In-memory data and no running Spark session.

    Examples
    --------
    >>> import numpy as np, deepspark as ds
    >>> spark = ds.init_context(cores=2)  # doctest: +SKIP
    >>> arrays = {"image": np.zeros((6, 8, 8), "float32"), "label": np.arange(6)}
    >>> converted = as_spark_frame(arrays, "df")  # doctest: +SKIP
    >>> converted.frame.schema.simpleString(), converted.shapes  # doctest: +SKIP
    ('struct<image:array<float>,label:bigint>', {'image': (8, 8)})
    """
    kind = InputKind.of(data, argument)
    if kind is InputKind.SPARK:
        return SparkFrame(data, kind)
    if kind is InputKind.PANDAS_ON_SPARK:
        return SparkFrame(_unwrap_pandas_on_spark(data, row_index), kind)
    arrays = _columns_of(data, kind, argument, columns)
    spark = session if session is not None else _current_session(argument, kind)
    table, shapes = _arrow_table(arrays, argument)
    if row_index:
        if ROW_COLUMN in table.column_names:
            raise ValueError(f"{argument}: the column name {ROW_COLUMN!r} is deepspark's own")
        table = table.append_column(ROW_COLUMN, pa.array(np.arange(table.num_rows)))
    if partitions is None:
        from deepspark.context.topology import task_slots

        partitions = task_slots(spark)
    return SparkFrame(_distribute(spark, table, partitions), kind, shapes)


def training_frames(
    df: InputData,
    validation_data: InputData | None,
    feature_cols: Any,
    label_cols: Any,
    *,
    num_workers: int | None,
    feature_shapes: Mapping[str, Any] | None,
) -> tuple[DataFrame, DataFrame | None, dict[str, Any] | None]:
    """The training rows, the validation rows and the feature shapes of fit and evaluate.

    In-memory data is spread over at least ``num_workers`` partitions (every free task slot
    by default), so that every rank gets rows.
    """
    InputKind.of(df, "df")
    if validation_data is not None:
        InputKind.of(validation_data, "validation_data")  # refused before df is converted
    columns = {"feature_cols": feature_cols, "label_cols": label_cols}
    # in-memory rows join the session of a distributed argument, if there is one
    session = _session_of(df) or _session_of(validation_data)
    train = as_spark_frame(df, "df", columns=columns, partitions=num_workers, session=session)
    shapes = train.feature_shapes(feature_shapes)
    if validation_data is None:
        return train.frame, None, shapes
    validation = as_spark_frame(
        validation_data,
        "validation_data",
        columns=columns,
        partitions=num_workers,
        session=train.frame.sparkSession,
    )
    return train.frame, validation.frame, validation.feature_shapes(shapes)


# --- in-memory data to Arrow --------------------------------------------------------------------


def _columns_of(
    data: Any, kind: InputKind, argument: str, columns: Mapping[str, Any] | None
) -> dict[str, np.ndarray | pa.Array]:
    """The needed columns of a pandas frame or dict, each as one numpy or Arrow array."""
    available = [str(label) for label in data]
    if kind is InputKind.ARRAYS:
        if not data:
            raise ValueError(f"{argument}: the dict holds no arrays; give {ACCEPTED}")
        bad_keys = [key for key in data if not isinstance(key, str)]
        if bad_keys:
            raise TypeError(
                f"{argument}: dict keys are column names and must be strings; found "
                f"{bad_keys[:3]!r}"
            )
    elif data.shape[0] == 0:
        raise ValueError(f"{argument}: the pandas DataFrame is empty (no rows); give it rows")
    labels = _requested(columns, data, kind, argument, available)
    found: dict[str, np.ndarray | pa.Array] = {}
    for label in labels:
        name = str(label)  # Spark's column names are strings
        if kind is InputKind.PANDAS:
            found[name] = _pandas_column(data, label, argument)
        else:
            found[name] = _dict_value(data[label], name, argument)
    lengths = {name: len(values) for name, values in found.items()}
    if kind is InputKind.ARRAYS and len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name!r}: {rows}" for name, rows in lengths.items())
        raise ValueError(
            f"{argument}: the dict's arrays have different numbers of rows ({listed}); every "
            "array needs one row per example"
        )
    if kind is InputKind.ARRAYS and not any(lengths.values()):
        raise ValueError(f"{argument}: the dict's arrays are empty (no rows); give them rows")
    return found


def _requested(
    columns: Mapping[str, Any] | None,
    data: Any,
    kind: InputKind,
    argument: str,
    available: list[str],
) -> list[Any]:
    """The columns the column arguments ask for (all without them); each must be in `data`."""
    from deepspark.training.driver.checks import flat_names

    if columns is None:
        return list(data)
    names: list[str] = []
    for column_argument, cols in columns.items():
        try:
            requested = flat_names(cols)
        except TypeError:  # a malformed argument: the column checks explain it later
            return list(data)
        for name in requested:
            if not isinstance(name, str):
                continue  # the column checks refuse it with their own message
            if name not in data:
                what = "pandas DataFrame" if kind is InputKind.PANDAS else "dict"
                hint = ""
                if kind is InputKind.PANDAS and not all(isinstance(c, str) for c in data):
                    hint = " (column labels must be strings: df.columns = df.columns.astype(str))"
                raise ValueError(
                    f"{column_argument}: column {name!r} is not in {argument} (a {what}); "
                    f"available columns: {', '.join(available) or '(none)'}{hint}"
                )
            if name not in names:
                names.append(name)
    return names


def _pandas_column(frame: pd.DataFrame, name: Any, argument: str) -> np.ndarray | pa.Array:
    series = frame[name]
    if isinstance(series, pd.DataFrame):
        raise ValueError(
            f"{argument}: the pandas DataFrame has {series.shape[1]} columns named {name!r}; "
            "rename them so each name is unique"
        )
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        raise TypeError(
            f"{argument}: column {name!r} is categorical; give its codes or values, e.g. "
            f"df[{name!r}] = df[{name!r}].cat.codes"
        )
    if pd.api.types.is_object_dtype(dtype):
        if pd.api.types.infer_dtype(series, skipna=False) in ("string", "bytes"):
            return pa.Array.from_pandas(series)  # text or bytes, for a decoder
        return _stacked(series.to_numpy(), name, argument, "pandas DataFrame")
    if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
        return series.to_numpy()
    return pa.Array.from_pandas(series)  # nullable and Arrow-backed dtypes, dates


def _dict_value(value: Any, name: str, argument: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError:  # numpy refuses nested lists of different lengths
        raise ValueError(_ragged_message(argument, name, "dict", list(value))) from None
    if array.ndim == 0:
        raise ValueError(
            f"{argument}: {name!r} is a single value ({type(value).__name__}), not an array "
            "with one row per example"
        )
    if array.dtype == object:
        if array.ndim > 1:
            raise TypeError(_not_numeric_message(argument, name, "dict", array.reshape(-1)))
        return _stacked(array, name, argument, "dict")
    if array.dtype.kind not in "biufUS" or (array.dtype.kind in "US" and array.ndim > 1):
        raise TypeError(_not_numeric_message(argument, name, "dict", array.reshape(-1)))
    return array


def _stacked(cells: np.ndarray, name: str, argument: str, what: str) -> np.ndarray:
    """Cells that each hold a number or an equal-shaped array of numbers, as one array."""
    try:
        stacked = np.stack(list(cells))
    except ValueError:
        raise ValueError(_ragged_message(argument, name, what, cells)) from None
    if stacked.dtype.kind not in "biuf":
        raise TypeError(_not_numeric_message(argument, name, what, cells))
    return stacked


def _ragged_message(argument: str, name: str, what: str, cells: Any) -> str:
    shapes: list[str] = []
    for cell in cells:
        try:
            shape = str(np.shape(cell)) if cell is not None else "None"
        except ValueError:
            shape = "a ragged nested list"
        if shape not in shapes:
            shapes.append(shape)
        if len(shapes) == 3:
            break
    return (
        f"{argument}: column {name!r} of the {what} is ragged: its rows hold values of shapes "
        f"{', '.join(shapes)}; every row needs the same shape (pad or filter the rows, and "
        "fill missing values)"
    )


def _not_numeric_message(argument: str, name: str, what: str, cells: Any) -> str:
    kinds = []
    for cell in cells:
        if not isinstance(cell, (int, float, bool, np.number, np.bool_)) and (
            type(cell).__name__ not in kinds
        ):
            kinds.append(type(cell).__name__)
        if len(kinds) == 3:
            break
    found = ", ".join(kinds) or "non-numeric values"
    return (
        f"{argument}: column {name!r} of the {what} holds {found}, which cannot become a "
        "tensor column; give numbers, equal-length lists or arrays of numbers, or strings or "
        "bytes (with decoders=)"
    )


def _arrow_table(
    arrays: Mapping[str, np.ndarray | pa.Array], argument: str
) -> tuple[pa.Table, dict[str, tuple[int, ...]]]:
    """One Arrow column per array; a row of shape ``(d1, d2, ...)`` becomes a flat list."""
    columns: dict[str, pa.Array] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, values in arrays.items():
        if isinstance(values, pa.Array):
            columns[name] = values
            continue
        values = _spark_dtype(values, name, argument)
        row_shape = tuple(int(size) for size in values.shape[1:])
        if not row_shape:
            columns[name] = pa.array(values)
            continue
        width = math.prod(row_shape)
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        offsets = np.arange(0, len(values) * width + 1, width)
        if offsets[-1] < 2**31:
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)
        else:
            columns[name] = pa.LargeListArray.from_arrays(pa.array(offsets), flat)
        shapes[name] = row_shape
    return pa.table(columns), shapes


def _spark_dtype(values: np.ndarray, name: str, argument: str) -> np.ndarray:
    """Numbers in a type Spark has, exactly: unsigned and half types widen."""
    if values.dtype.kind in "US":
        return values
    if values.dtype == np.uint64:
        if values.size and values.max() > np.iinfo(np.int64).max:
            raise ValueError(
                f"{argument}: column {name!r} is uint64 with values above the int64 range, "
                "which Spark cannot hold; scale or cast them"
            )
        return values.astype(np.int64)
    wider = _WIDER.get(values.dtype)
    return values.astype(wider) if wider is not None else values


def _distribute(spark: SparkSession, table: pa.Table, partitions: int) -> DataFrame:
    """The table as a Spark DataFrame of at least `partitions` partitions, rows in order.

    Spark keeps a small table in the plan as a local relation, spread over the application's
    default parallelism (every task slot); a larger one becomes one partition per Arrow batch
    (batches over ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows are split), so the
    table goes as one batch per slice of rows.
    """
    from deepspark.context.identity import is_connect

    rows_per_partition = max(1, -(-table.num_rows // max(1, partitions)))
    sliced = pa.Table.from_batches(
        table.to_batches(max_chunksize=rows_per_partition), schema=table.schema
    )
    frame = frame_from_arrow(spark, sliced)
    if is_connect(spark) and partitions > 1:
        # Spark Connect ships the table as one local relation, in one partition
        frame = frame.repartition(partitions)
    return frame


# --- sessions -----------------------------------------------------------------------------------


def _is_spark_frame(data: Any) -> bool:
    from deepspark.context.identity import is_connect

    if is_connect(data):
        return type(data).__name__ == "DataFrame"
    if not type(data).__module__.startswith("pyspark.sql"):
        return False
    from pyspark.sql import DataFrame

    return isinstance(data, DataFrame)


def _session_of(data: Any) -> SparkSession | None:
    if _is_spark_frame(data):
        return data.sparkSession
    if _is_pandas_on_spark(data):
        return _unwrap_pandas_on_spark(data, keep_index=False).sparkSession
    return None


def _is_pandas_on_spark(data: Any) -> bool:
    # by module, so that pyspark.pandas (slow to import) is imported only by its users
    return type(data).__module__.startswith("pyspark.pandas") and type(data).__name__ == (
        "DataFrame"
    )


def _current_session(argument: str, kind: InputKind) -> SparkSession:
    """deepspark's running session, else pyspark's active one; none is an error."""
    from deepspark.context.session import current_session

    session = current_session()
    if session is None:
        from pyspark.sql import SparkSession

        session = SparkSession.getActiveSession()
    if session is None:
        raise RuntimeError(
            f"{argument}: a {kind.value} is distributed through Spark, and no Spark session is "
            "running; start one first with ds.init_context() (import deepspark as ds)"
        )
    return session


# --- pandas-on-Spark ----------------------------------------------------------------------------


def _unwrap_pandas_on_spark(data: Any, keep_index: bool) -> DataFrame:
    """The frame's Spark DataFrame; its index stays out unless asked for (hidden columns)."""
    with warnings.catch_warnings():
        # pandas-on-Spark advises that to_spark drops the index: here that is the point
        warnings.filterwarnings("ignore", message=".*index_col.*is not specified.*")
        if not keep_index:
            return data.to_spark()
    hidden = [f"{INDEX_COLUMN_PREFIX}{level}" for level in range(data.index.nlevels)]
    return data.to_spark(index_col=hidden)
