"""Cleaning and feature steps on ONE time series held in a pandas DataFrame.

Every function here takes the rows of a single series, sorted by time, and returns new rows.
The pandas `TSDataset` applies them per id with ``groupby``; the Spark `TSDataset` applies the
very same functions per id inside ``groupBy(id).applyInPandas``, so both give the same rows.
This module runs inside Spark tasks: it imports pandas and numpy, never pyspark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

IMPUTE_MODES = ("last", "const", "linear")
MERGE_MODES = ("mean", "max", "min", "sum", "median", "last", "first")
REPAIR_MODES = ("last", "mean")
ROLLING_STATS = ("mean", "std", "min", "max", "median", "sum")
# name -> how it is read from a DatetimeIndex
DT_FEATURES = {
    "minute": lambda dt: dt.minute,
    "hour": lambda dt: dt.hour,
    "day": lambda dt: dt.day,
    "weekday": lambda dt: dt.weekday,
    "month": lambda dt: dt.month,
    "dayofyear": lambda dt: dt.dayofyear,
    "weekofyear": lambda dt: dt.isocalendar().week.to_numpy(),
    "quarter": lambda dt: dt.quarter,
    "is_weekend": lambda dt: (dt.weekday >= 5).astype(int),
}


@dataclass(frozen=True)
class SeriesColumns:
    """The roles of a long-format frame's columns: plain values that travel to Spark tasks."""

    dt_col: str
    target_col: tuple[str, ...]
    id_col: str | None = None
    feature_col: tuple[str, ...] = ()

    @property
    def value_cols(self) -> list[str]:
        """Targets first, then extra features: the channel order of every rolled window."""
        return [*self.target_col, *self.feature_col]

    def with_features(self, names: Sequence[str]) -> SeriesColumns:
        return SeriesColumns(self.dt_col, self.target_col, self.id_col, (*self.feature_col, *names))

    @property
    def all_cols(self) -> list[str]:
        ids = [self.id_col] if self.id_col is not None else []
        return [*ids, self.dt_col, *self.value_cols]


def sort_series(frame: pd.DataFrame, cols: SeriesColumns) -> pd.DataFrame:
    return frame.sort_values(cols.dt_col, kind="stable").reset_index(drop=True)


def _with_id(frame: pd.DataFrame, cols: SeriesColumns, series_id) -> pd.DataFrame:
    if cols.id_col is not None:
        frame.insert(0, cols.id_col, series_id)
    return frame


def _series_id(frame: pd.DataFrame, cols: SeriesColumns):
    return frame[cols.id_col].iloc[0] if cols.id_col is not None and len(frame) else None


def impute(frame: pd.DataFrame, cols: SeriesColumns, mode: str, const_num: float) -> pd.DataFrame:
    """Fill missing values: the last seen value, a constant, or a straight line between values.

    Leading gaps (before the first value) take the first value in ``last`` and ``linear`` mode.
    """
    frame = sort_series(frame, cols)
    values = frame[cols.value_cols]
    if mode == "const":
        values = values.fillna(const_num)
    elif mode == "last":
        values = values.ffill().bfill()
    else:  # linear, in time rather than in row position
        values = values.set_axis(pd.DatetimeIndex(frame[cols.dt_col]))
        values = values.interpolate(method="time", limit_direction="both")
        values = values.reset_index(drop=True)
    frame[cols.value_cols] = values.to_numpy()
    return frame


def deduplicate(frame: pd.DataFrame, cols: SeriesColumns) -> pd.DataFrame:
    """One row per timestamp: rows that share a timestamp become their mean."""
    series_id = _series_id(frame, cols)
    merged = frame.groupby(cols.dt_col, sort=True)[cols.value_cols].mean().reset_index()
    return _with_id(merged, cols, series_id)


def resample(
    frame: pd.DataFrame, cols: SeriesColumns, interval: str, merge_mode: str
) -> pd.DataFrame:
    """Put the series on a regular grid of `interval`: rows in one bin are merged with
    `merge_mode`, and bins without rows get NaN (fill them with `impute`)."""
    series_id = _series_id(frame, cols)
    indexed = frame.set_index(pd.DatetimeIndex(frame[cols.dt_col]))[cols.value_cols]
    merged = getattr(indexed.resample(interval), merge_mode)()
    merged.index.name = cols.dt_col
    return _with_id(merged.reset_index(), cols, series_id)


def repair_abnormal(
    frame: pd.DataFrame, cols: SeriesColumns, mode: str, threshold: float
) -> pd.DataFrame:
    """Replace target values more than `threshold` standard deviations from the series' mean:
    by the last normal value (``last``) or by the mean of the normal values (``mean``)."""
    frame = sort_series(frame, cols)
    for column in cols.target_col:
        values = frame[column]
        spread = values.std(ddof=0)
        if not spread > 0:
            continue
        abnormal = (values - values.mean()).abs() > threshold * spread
        if not abnormal.any():
            continue
        kept = values.mask(abnormal)
        kept = kept.ffill().bfill() if mode == "last" else kept.fillna(kept.mean())
        frame[column] = kept
    return frame


def dt_feature_names(features: Sequence[str] | None) -> list[str]:
    names = list(DT_FEATURES) if features is None else [name.lower() for name in features]
    unknown = [name for name in names if name not in DT_FEATURES]
    if unknown:
        raise ValueError(
            f"gen_dt_feature(features=...) got unknown features {unknown}; "
            f"choose from {sorted(DT_FEATURES)}"
        )
    return names


def dt_features(frame: pd.DataFrame, dt_col: str, names: Sequence[str]) -> pd.DataFrame:
    """Add one float column per calendar feature of `dt_col` (``hour``, ``month``, ...)."""
    stamps = pd.DatetimeIndex(frame[dt_col])
    frame = frame.copy()
    for name in names:
        frame[name] = np.asarray(DT_FEATURES[name](stamps), dtype="float64")
    return frame


def lag_names(target_col: Sequence[str], lags: Sequence[int]) -> list[str]:
    return [f"{target}_lag{lag}" for target in target_col for lag in lags]


def lag_features(frame: pd.DataFrame, cols: SeriesColumns, lags: Sequence[int]) -> pd.DataFrame:
    """Add each target's value `lag` steps back; the first ``max(lags)`` rows, which have no
    such value, are dropped."""
    frame = sort_series(frame, cols)
    for target in cols.target_col:
        for lag in lags:
            frame[f"{target}_lag{lag}"] = frame[target].shift(lag)
    return frame.iloc[max(lags) :].reset_index(drop=True)


def rolling_names(target_col: Sequence[str], window: int, stats: Sequence[str]) -> list[str]:
    return [f"{target}_roll{window}_{stat}" for target in target_col for stat in stats]


def rolling_features(
    frame: pd.DataFrame, cols: SeriesColumns, window: int, stats: Sequence[str]
) -> pd.DataFrame:
    """Add statistics of each target over the last `window` rows (the current one included);
    the first ``window - 1`` rows, whose window is not full, are dropped."""
    frame = sort_series(frame, cols)
    for target in cols.target_col:
        rolling = frame[target].rolling(window, min_periods=window)
        for stat in stats:
            if stat == "std":
                frame[f"{target}_roll{window}_std"] = rolling.std(ddof=0)
            else:
                frame[f"{target}_roll{window}_{stat}"] = getattr(rolling, stat)()
    return frame.iloc[window - 1 :].reset_index(drop=True)


def column_names(value: str | Sequence[str] | None, role: str) -> tuple[str, ...]:
    if value is None:
        return ()
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"{role} must be a column name or a list of names, got {value!r}")
    return names


def series_columns(
    dt_col: str, target_col: Any, id_col: str | None, extra_feature_col: Any
) -> SeriesColumns:
    """The column roles, checked: a timestamp column, one or more targets, each column once."""
    targets = column_names(target_col, "target_col")
    if not targets:
        raise ValueError("target_col is required: the column (or list of columns) to forecast")
    if not isinstance(dt_col, str):
        raise ValueError(f"dt_col must name the timestamp column, got {dt_col!r}")
    cols = SeriesColumns(
        dt_col, targets, id_col, column_names(extra_feature_col, "extra_feature_col")
    )
    roles = cols.all_cols
    repeated = sorted({name for name in roles if roles.count(name) > 1})
    if repeated:
        raise ValueError(
            f"columns {repeated} are given more than one role (dt_col, target_col, id_col, "
            "extra_feature_col): each column has one role"
        )
    return cols


def check_ratios(val_ratio: float, test_ratio: float) -> None:
    if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
        raise ValueError(
            f"val_ratio={val_ratio} and test_ratio={test_ratio} must be in [0, 1) and leave "
            "rows for training (val_ratio + test_ratio < 1)"
        )


def naive_errors(
    frame: pd.DataFrame, cols: SeriesColumns, season: int
) -> dict[str, float]:  # one series -> {target: mean |y_t - y_{t-season}|}
    """The in-sample error of the seasonal-naive forecast per target: MASE's denominator."""
    frame = sort_series(frame, cols)
    errors = {}
    for target in cols.target_col:
        values = frame[target].to_numpy(dtype="float64")
        diffs = np.abs(values[season:] - values[:-season]) if len(values) > season else []
        errors[target] = float(np.mean(diffs)) if len(diffs) else float("nan")
    return errors


def infer_freq(stamps: pd.Series) -> str | None:
    """The series' interval as a pandas offset alias ("h", "W-SAT", "MS", ...): what
    `pandas.infer_freq` reads, else the most common step between timestamps."""
    index = pd.DatetimeIndex(pd.Series(stamps).sort_values().unique())
    if len(index) < 2:
        return None
    if len(index) >= 3:
        freq = pd.infer_freq(index)
        if freq is not None:
            return freq
    step = pd.Series(index[1:] - index[:-1]).mode().iloc[0]
    return pd.tseries.frequencies.to_offset(step).freqstr


def chained(steps: Sequence[Callable[[pd.DataFrame], pd.DataFrame]]):
    """One function that runs `steps` in order on a series' rows."""
    steps = tuple(steps)

    def run(frame: pd.DataFrame) -> pd.DataFrame:
        for step in steps:
            frame = step(frame)
        return frame

    return run
