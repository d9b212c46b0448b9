"""`predict`'s input besides Spark DataFrames, and its result back as the type it was given.

Driver side. `prediction_input` converts the rows through `inputs.as_spark_frame` and says how
to give the result back: a pandas DataFrame with its index and row order, a numpy array (a
dict of arrays), a pandas-on-Spark DataFrame, or predict's own Spark DataFrame.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa

from deepspark.context.spark_versions import collect_arrow
from deepspark.training.driver.inputs import (
    INDEX_COLUMN_PREFIX,
    ROW_COLUMN,
    InputData,
    InputKind,
    SparkFrame,
    as_spark_frame,
)

if TYPE_CHECKING:
    import pyspark.pandas as ps
    from pyspark.sql import DataFrame

__all__ = ["PredictionInput", "Predictions", "prediction_input"]

Predictions: TypeAlias = (
    "DataFrame | pd.DataFrame | ps.DataFrame | np.ndarray | dict[str, np.ndarray]"
)


@dataclass(frozen=True)
class PredictionInput:
    """The rows `predict` scores, its options, and how to give the result back as it came."""

    source: SparkFrame
    options: dict[str, Any]
    restore: Callable[[DataFrame], Predictions]

    @property
    def frame(self) -> DataFrame:
        return self.source.frame


def prediction_input(
    df: InputData, feature_cols: Any, *, output_col: Any, options: Mapping[str, Any]
) -> PredictionInput:
    """Convert `df` for `predict`, and the function that turns its result into `df`'s type.

    A pandas DataFrame gets back a copy of itself (or of its ``passthrough_cols``) with the
    prediction column(s), index and row order kept; a dict of arrays gets a numpy array (a
    dict of arrays when predict adds several columns); a pandas-on-Spark DataFrame gets a
    pandas-on-Spark DataFrame with its index; a Spark DataFrame, predict's own result.
    """
    options = dict(options)
    kind = InputKind.of(df, "df")
    if kind is InputKind.SPARK:
        return PredictionInput(SparkFrame(df, kind), options, _unchanged)
    passthrough = options.get("passthrough_cols")
    if kind is InputKind.ARRAYS and passthrough is not None:
        raise ValueError(
            "passthrough_cols: predict on a dict of arrays returns the predictions alone; "
            "drop passthrough_cols, or pass a pandas DataFrame to get columns back"
        )
    if kind is InputKind.PANDAS:
        _check_pandas_outputs(df, output_col, passthrough)
    source = as_spark_frame(df, "df", columns={"feature_cols": feature_cols}, row_index=True)
    options["feature_shapes"] = source.feature_shapes(options.get("feature_shapes"))
    if kind is InputKind.PANDAS_ON_SPARK:
        hidden = [name for name in source.frame.columns if name.startswith(INDEX_COLUMN_PREFIX)]
        if passthrough is not None:
            options["passthrough_cols"] = [*hidden, *passthrough]
        index_names = list(df.index.names)
        return PredictionInput(
            source, options, lambda result: _as_pandas_on_spark(result, hidden, index_names)
        )
    # In-memory rows: only the row position travels back with the predictions.
    options["passthrough_cols"] = [ROW_COLUMN]
    inputs = set(source.frame.columns)
    if kind is InputKind.PANDAS:
        kept = df if passthrough is None else df[list(passthrough)]
        return PredictionInput(source, options, lambda result: _as_pandas(result, inputs, kept))
    return PredictionInput(source, options, lambda result: _as_arrays(result, inputs))


# --- results back to the input's type -----------------------------------------------------------


def _unchanged(result: DataFrame) -> DataFrame:
    return result


def _check_pandas_outputs(frame: pd.DataFrame, output_col: Any, passthrough: Any) -> None:
    outputs = [output_col] if isinstance(output_col, str) else list(output_col or [])
    taken = [name for name in outputs if name in frame.columns]
    if taken:
        raise ValueError(
            f"output_col={output_col!r}: {taken} already exist in the pandas DataFrame; choose "
            "another name or drop the column first"
        )
    missing = [name for name in passthrough or [] if name not in frame.columns]
    if missing:
        raise ValueError(
            f"passthrough_cols {missing!r} are not columns of the pandas DataFrame (it has "
            f"{list(frame.columns)!r})"
        )


def _collected(result: DataFrame, inputs: set[str]) -> tuple[pa.Table, list[str]]:
    """The result's rows in their original order, and the columns predict added."""
    table = collect_arrow(result)
    added = [name for name in table.column_names if name not in inputs]
    table = table.select([ROW_COLUMN, *added]).sort_by(ROW_COLUMN)
    return table, added


def _as_pandas(result: DataFrame, inputs: set[str], kept: pd.DataFrame) -> pd.DataFrame:
    table, added = _collected(result, inputs)
    if table.num_rows != len(kept):
        raise RuntimeError(f"predict returned {table.num_rows} rows for {len(kept)}")
    taken = [name for name in added if name in kept.columns]
    if taken:
        raise ValueError(
            f"predict's output columns {taken} already exist in the pandas DataFrame; name "
            "the outputs otherwise (output_col=...) or drop those columns first"
        )
    predictions = {name: table.column(name).to_pandas().to_numpy() for name in added}
    return kept.assign(**predictions)


def _as_arrays(result: DataFrame, inputs: set[str]) -> np.ndarray | dict[str, np.ndarray]:
    table, added = _collected(result, inputs)
    arrays = {name: _numpy_column(table.column(name)) for name in added}
    return arrays[added[0]] if len(added) == 1 else arrays


def _numpy_column(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An Arrow column as a numpy array; equal-length lists become extra dimensions."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    list_type = array.type
    if not (
        pa.types.is_list(list_type)
        or pa.types.is_large_list(list_type)
        or pa.types.is_fixed_size_list(list_type)
    ):
        return array.to_numpy(zero_copy_only=False)
    import pyarrow.compute as pc

    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if array.null_count or len(array) == 0 or (lengths != lengths[0]).any():
        return array.to_numpy(zero_copy_only=False)  # ragged: one array per row
    inner = _numpy_column(array.flatten())
    return inner.reshape(len(array), int(lengths[0]), *inner.shape[1:])


def _as_pandas_on_spark(result: DataFrame, hidden: list[str], names: list[Any]) -> Any:
    frame = result.pandas_api(index_col=hidden)
    frame.index.names = names
    return frame
