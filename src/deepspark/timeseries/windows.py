"""Rolling windows over one series, and forecasts back into rows with timestamps.

A window of `lookback` steps holds every value column (targets first, then extra features),
flattened step by step into ``lookback * input_size`` float32 numbers; its label holds the
next `horizon` steps of the targets, flattened the same way. Spark tasks call these functions
per id (``applyInPandas``); the pandas TSDataset calls them per group. No pyspark here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from deepspark.timeseries.scaler import TSScaler
from deepspark.timeseries.series_ops import SeriesColumns, sort_series

X_COL, Y_COL = "x", "y"


@dataclass(frozen=True)
class WindowSpec:
    """What `roll` cuts: plain values, carried to the tasks."""

    cols: SeriesColumns
    lookback: int
    horizon: int

    @property
    def input_size(self) -> int:
        return len(self.cols.value_cols)

    @property
    def output_size(self) -> int:
        return len(self.cols.target_col)


def _describe(frame: pd.DataFrame, cols: SeriesColumns) -> str:
    if cols.id_col is None or not len(frame):
        return "the series"
    return f"series {frame[cols.id_col].iloc[0]!r}"


def check_series(frame: pd.DataFrame, spec: WindowSpec, needed: int) -> None:
    """Refuse a series too short for one window, with repeated timestamps, or with gaps."""
    cols = spec.cols
    if len(frame) < needed:
        raise ValueError(
            f"{_describe(frame, cols)} has {len(frame)} rows, fewer than lookback + horizon = "
            f"{needed}: lower lookback or horizon, or drop the short series"
        )
    stamps = frame[cols.dt_col]
    if stamps.duplicated().any():
        first = stamps[stamps.duplicated()].iloc[0]
        raise ValueError(
            f"{_describe(frame, cols)} has several rows at {first}: call deduplicate() or "
            "resample() before roll"
        )
    if frame[cols.value_cols].isna().to_numpy().any():
        raise ValueError(
            f"{_describe(frame, cols)} has missing values in {cols.value_cols}: call impute() "
            "before roll"
        )


def roll_series(frame: pd.DataFrame, spec: WindowSpec, dtype: str = "float32") -> pd.DataFrame:
    """Every window of one series: columns id (if any), dt (the window's last input step),
    x (flat `dtype` array), and y (flat `dtype` array; absent when horizon is 0)."""
    cols = spec.cols
    frame = sort_series(frame, cols)
    check_series(frame, spec, spec.lookback + spec.horizon)
    values = frame[cols.value_cols].to_numpy(dtype)
    count = len(frame) - spec.lookback - spec.horizon + 1
    inputs = np.lib.stride_tricks.sliding_window_view(values, spec.lookback, axis=0)[:count]
    # sliding_window_view puts the window axis last: (count, channels, lookback)
    rows = {X_COL: list(inputs.transpose(0, 2, 1).reshape(count, -1))}
    if spec.horizon:
        targets = values[spec.lookback :, : spec.output_size]
        labels = np.lib.stride_tricks.sliding_window_view(targets, spec.horizon, axis=0)[:count]
        rows[Y_COL] = list(labels.transpose(0, 2, 1).reshape(count, -1))
    result = pd.DataFrame(
        {cols.dt_col: frame[cols.dt_col].iloc[spec.lookback - 1 : spec.lookback - 1 + count]}
    ).reset_index(drop=True)
    if cols.id_col is not None:
        result.insert(0, cols.id_col, frame[cols.id_col].iloc[0])
    for name, column in rows.items():
        result[name] = column
    return result


def last_window(frame: pd.DataFrame, spec: WindowSpec, dtype: str = "float32") -> pd.DataFrame:
    """The one window that ends at the series' last step: the input of a real forecast."""
    tail = sort_series(frame, spec.cols).iloc[-spec.lookback :]
    return roll_series(tail, WindowSpec(spec.cols, spec.lookback, 0), dtype)


def stacked(column: pd.Series, steps: int, channels: int) -> np.ndarray:
    """A column of flat arrays as one (rows, steps, channels) float32 array."""
    if not len(column):
        return np.zeros((0, steps, channels), "float32")
    return np.stack(column.to_numpy()).astype("float32").reshape(len(column), steps, channels)


def future_times(last: pd.Timestamp, freq, horizon: int) -> pd.DatetimeIndex:
    """The `horizon` timestamps after `last` at the series' frequency."""
    return pd.date_range(start=last, periods=horizon + 1, freq=freq)[1:]


def floored(values: np.ndarray, floor: float | None) -> np.ndarray:
    """`values` raised to `floor` where below it (None: as they are)."""
    return values if floor is None else np.maximum(values, floor)


def forecast_rows(
    windows: pd.DataFrame,
    predictions: np.ndarray,
    cols: SeriesColumns,
    freq,
    scaler: TSScaler | None,
    floor: float | None = None,
) -> pd.DataFrame:
    """Forecasts (windows, horizon, targets) as long rows: id, dt (future), one column per
    target, unscaled with `scaler`, and raised to `floor` where they fall below it."""
    horizon = predictions.shape[1]
    ids = windows[cols.id_col].to_numpy() if cols.id_col is not None else None
    if scaler is not None:
        predictions = scaler.inverse_windows(
            predictions, ids if ids is not None else np.zeros(len(windows)), cols.target_col
        )
    predictions = floored(predictions, floor)
    stamps = [future_times(last, freq, horizon) for last in windows[cols.dt_col]]
    result = pd.DataFrame({cols.dt_col: np.concatenate(stamps) if stamps else pd.DatetimeIndex([])})
    if ids is not None:
        result.insert(0, cols.id_col, np.repeat(ids, horizon))
    flat = predictions.astype("float64").reshape(-1, len(cols.target_col))
    for index, target in enumerate(cols.target_col):
        result[target] = flat[:, index]
    return result


def trial_rows(rows: Any, is_spark: bool) -> Any:
    """Windows as a trial reads them: a Spark DataFrame (cached), or a dict of arrays."""
    if is_spark:
        import deepspark as ds

        frame = rows.select(X_COL, Y_COL)
        ds.cache(frame)
        return frame
    return {
        X_COL: np.stack(rows[X_COL].to_numpy()).astype("float32"),
        Y_COL: np.stack(rows[Y_COL].to_numpy()).astype("float32"),
    }
