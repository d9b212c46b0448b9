"""The mean of networks and statistical models, series by series (an `EnsembleForecaster`
with `StatsForecaster` members).

A statistical member fits its model on each series where it forecasts, so such an ensemble
cannot be one torch module over batches of windows. Here each series' rows are in one pandas
frame (per group for pandas data, one grouped ``applyInPandas`` pass for Spark data): the
network members run on that series' windows of the (scaled) data, their forecasts are
unscaled, the statistical members fit the unscaled series, and the forecast is the mean over
members. `predict` forecasts the steps after each series' end; `evaluate` forecasts every
window whose input ends at or after the longest member lookback, as `Forecaster.evaluate`
does, and adds up the errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from deepspark.timeseries import windows
from deepspark.timeseries.forecast_model import run_torch
from deepspark.timeseries.forecaster import Forecaster
from deepspark.timeseries.scaler import TSScaler
from deepspark.timeseries.series_ops import SeriesColumns, sort_series
from deepspark.timeseries.statistical import (
    StatsForecaster,
    _per_series,
    _unscaled,
    origin_forecasts,
    statsforecast_model,
    summed_metrics,
    window_sums,
)
from deepspark.timeseries.tsdataset import TSDataset

__all__ = ["evaluate_combined", "predict_combined"]


def _member_forecasts(
    members: Sequence[Forecaster],
    frame: pd.DataFrame,
    cols: SeriesColumns,
    scaler: TSScaler | None,
    ends: list[int],
    unscaled: np.ndarray,
) -> np.ndarray:
    """(members, len(ends), horizon, targets), unscaled: each member's forecast from each
    index in `ends` of one series' rows `frame` (sorted, as given: scaled or not), whose
    targets unscaled are `unscaled`."""
    horizon, targets = members[0].horizon, list(cols.target_col)
    values = frame[cols.value_cols].to_numpy("float32")
    out = []
    for member in members:
        if isinstance(member, StatsForecaster):
            out.append(origin_forecasts(member.model, member.season, unscaled, ends, horizon))
            continue
        model, lookback = member.model_, member.lookback
        x = np.stack([values[end - lookback + 1 : end + 1].reshape(-1) for end in ends])
        flat = run_torch(model, x).reshape(len(ends), horizon, len(targets))
        if scaler is not None:
            ids = frame[cols.id_col].iloc[[0] * len(ends)].to_numpy() if cols.id_col else None
            flat = scaler.inverse_windows(flat, ids, targets)
        out.append(flat.astype("float64"))
    return np.stack(out)


def _needs_statsforecast(members: Sequence[Forecaster]) -> None:
    for member in members:
        if isinstance(member, StatsForecaster):
            statsforecast_model(member.model, member.season)  # installed? (before any job)


def predict_combined(ensemble: Forecaster, data: TSDataset, steps: int, floor: float | None) -> Any:
    """The mean forecast of `ensemble.members` for the `steps` after each series' end."""
    members, lookback = ensemble.members, ensemble.lookback
    _needs_statsforecast(members)
    freq = data.freq
    if freq is None:
        raise ValueError(
            "the data's interval is unknown (series of one row?): call resample(interval)"
        )
    cols, scaler = data.columns, data.scaler
    out_cols = SeriesColumns(cols.dt_col, cols.target_col, cols.id_col)

    def step(frame: pd.DataFrame) -> pd.DataFrame:
        frame = sort_series(frame, cols)
        _check_length(frame, cols, lookback, "data")
        _, unscaled = _unscaled(frame, cols, scaler)
        ends = [len(frame) - 1]
        forecasts = _member_forecasts(members, frame, cols, scaler, ends, unscaled)
        mean = forecasts.mean(axis=0)[:, :steps]
        last = frame.iloc[[-1]].reset_index(drop=True)
        return windows.forecast_rows(last, mean, out_cols, freq, None, floor)

    return _per_series(data, step, out_cols)


def evaluate_combined(
    ensemble: Forecaster,
    test: TSDataset,
    names: list[str],
    naive: pd.DataFrame | None,
    floor: float | None,
) -> dict[str, float]:
    """`Forecaster.evaluate`'s metrics of the mean forecast of `ensemble.members` at every
    window of `test` (MASE scaled by `naive`, the in-sample errors per series)."""
    members, lookback, horizon = ensemble.members, ensemble.lookback, ensemble.horizon
    _needs_statsforecast(members)
    cols, scaler = test.columns, test.scaler

    def step(frame: pd.DataFrame) -> pd.DataFrame:
        frame = sort_series(frame, cols)
        _check_length(frame, cols, lookback + horizon, "test")
        ends = list(range(lookback - 1, len(frame) - horizon))
        _, unscaled = _unscaled(frame, cols, scaler)
        yhat = _member_forecasts(members, frame, cols, scaler, ends, unscaled).mean(axis=0)
        return window_sums(frame, cols, unscaled, ends, yhat, naive, floor)

    return summed_metrics(test, step, names)


def _check_length(frame: pd.DataFrame, cols: SeriesColumns, needed: int, name: str) -> None:
    if len(frame) < needed:
        series = f"series {frame[cols.id_col].iloc[0]!r}" if cols.id_col else "the series"
        raise ValueError(
            f"{name}: {series} has {len(frame)} rows; the ensemble reads {needed} "
            "(its longest member lookback, plus the horizon to evaluate): pass a longer test "
            "set (a split's test part needs a larger ratio) or drop short series"
        )
