"""The pandas side of TSDataset: each per-series step runs once per id with ``groupby``.

The steps are the same functions the Spark side runs inside ``applyInPandas``
(`series_ops`, `windows`, `scaler`), so the two sides give the same rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from deepspark.timeseries import series_ops
from deepspark.timeseries.scaler import TSScaler, scaler_from_stats, series_stats
from deepspark.timeseries.series_ops import SeriesColumns


def prepare(df: pd.DataFrame, cols: SeriesColumns) -> pd.DataFrame:
    """Check column roles and types; keep the role columns, values as float64, sorted by id
    and time."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"from_pandas needs a pandas DataFrame, got {type(df).__name__}")
    roles = {
        "dt_col": [cols.dt_col],
        "target_col": cols.target_col,
        "id_col": [cols.id_col] if cols.id_col else [],
        "extra_feature_col": cols.feature_col,
    }
    for role, names in roles.items():
        missing = [name for name in names if name not in df.columns]
        if missing:
            raise ValueError(
                f"{role}={missing[0]!r} is not a column of the DataFrame; it has {list(df.columns)}"
            )
    frame = df[cols.all_cols].copy()
    if not pd.api.types.is_datetime64_any_dtype(frame[cols.dt_col]):
        try:
            frame[cols.dt_col] = pd.to_datetime(frame[cols.dt_col])
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"dt_col={cols.dt_col!r} does not hold timestamps ({error}); convert it with "
                "pandas.to_datetime first"
            ) from error
    for role, names in (("target_col", cols.target_col), ("extra_feature_col", cols.feature_col)):
        for name in names:
            if not pd.api.types.is_numeric_dtype(frame[name]) or frame[name].dtype == bool:
                raise ValueError(
                    f"{role} column {name!r} has dtype {frame[name].dtype}; targets and extra "
                    "features must be numeric: cast or encode it first"
                )
            frame[name] = frame[name].astype("float64")
    return frame.sort_values(_keys(cols), kind="stable").reset_index(drop=True)


def _keys(cols: SeriesColumns) -> list[str]:
    return [cols.id_col, cols.dt_col] if cols.id_col else [cols.dt_col]


def groups(frame: pd.DataFrame, cols: SeriesColumns) -> list[pd.DataFrame]:
    """Each series' rows, in id order."""
    if cols.id_col is None:
        return [frame]
    return [group for _, group in frame.groupby(cols.id_col, sort=True)]


def per_series(
    frame: pd.DataFrame,
    cols: SeriesColumns,
    step: Callable[[pd.DataFrame], pd.DataFrame],
    out_cols: SeriesColumns,
) -> pd.DataFrame:
    pieces = [step(group) for group in groups(frame, cols)]
    result = pd.concat(pieces, ignore_index=True) if pieces else frame.iloc[:0]
    return result[out_cols.all_cols].reset_index(drop=True)


def split(
    frame: pd.DataFrame, cols: SeriesColumns, val_ratio: float, test_ratio: float
) -> list[pd.DataFrame]:
    """Train, validation and test rows of every series, in time order."""
    if cols.id_col is not None:
        grouped = frame.groupby(cols.id_col, sort=False)
        position = grouped.cumcount().to_numpy()
        length = grouped[cols.dt_col].transform("size").to_numpy()
    else:
        position, length = np.arange(len(frame)), np.full(len(frame), len(frame))
    test_rows = np.floor(length * test_ratio)
    val_rows = np.floor(length * val_ratio)
    train_end = length - val_rows - test_rows
    parts = (
        position < train_end,
        (position >= train_end) & (position < train_end + val_rows),
        position >= train_end + val_rows,
    )
    return [frame[part].reset_index(drop=True) for part in parts]


def infer_freq(frame: pd.DataFrame, cols: SeriesColumns) -> str | None:
    answers = pd.Series([series_ops.infer_freq(g[cols.dt_col]) for g in groups(frame, cols)])
    answers = answers.dropna()
    return None if answers.empty else answers.mode().iloc[0]


def fit_scaler(frame: pd.DataFrame, cols: SeriesColumns, kind: str, per_id: bool) -> TSScaler:
    columns = cols.value_cols
    if not per_id:
        return scaler_from_stats(kind, False, columns, series_stats(frame, columns, kind), None)
    pieces = []
    for group in groups(frame, cols):
        stats = series_stats(group, columns, kind)
        stats.insert(0, cols.id_col, group[cols.id_col].iloc[0])
        pieces.append(stats)
    return scaler_from_stats(kind, True, columns, pd.concat(pieces), cols.id_col)


def naive_errors(frame: pd.DataFrame, cols: SeriesColumns, season: int) -> pd.DataFrame:
    rows = []
    for group in groups(frame, cols):
        row = series_ops.naive_errors(group, cols, season)
        if cols.id_col:
            row = {cols.id_col: group[cols.id_col].iloc[0], **row}
        rows.append(row)
    return pd.DataFrame(rows)


def windows_of(frame: pd.DataFrame, cols: SeriesColumns, cut) -> pd.DataFrame:
    pieces = [cut(group) for group in groups(frame, cols)]
    if not pieces or not len(frame):
        raise ValueError("the TSDataset has no rows")
    return pd.concat(pieces, ignore_index=True)


def sorted_rows(frame: pd.DataFrame, cols: SeriesColumns) -> pd.DataFrame:
    """The rows by id and time, the time in nanoseconds as pandas keeps it: rows collected
    by PySpark 3.5's ``toPandas`` under pandas 2 come in microseconds."""
    unit = frame[cols.dt_col].dtype
    if isinstance(unit, np.dtype) and unit.kind == "M" and unit != np.dtype("datetime64[ns]"):
        frame = frame.astype({cols.dt_col: "datetime64[ns]"})
    return frame.sort_values(_keys(cols), kind="stable").reset_index(drop=True)
