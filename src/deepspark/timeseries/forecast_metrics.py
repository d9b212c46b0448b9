"""Forecast error measures: MAE, MSE, sMAPE and MASE, on numpy arrays.

`Forecaster.evaluate` computes the same sums per Spark partition (`error_sums`) and adds
them up, so a distributed evaluation equals these functions on all windows at once.

Examples
--------
>>> import numpy as np
>>> y, yhat = np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0])
>>> float(mae(y, yhat)), float(mse(y, yhat))
(1.0, 1.6666666666666667)
>>> round(float(smape(y, yhat)), 2)
35.56
>>> float(mase(y, yhat, train_y=np.array([1.0, 2.0, 3.0, 4.0])))
1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torchmetrics import regression as tmr
from torchmetrics.functional import (
    mean_absolute_error,
    mean_squared_error,
    symmetric_mean_absolute_percentage_error,
)

METRICS = ("mae", "mse", "smape", "mase")


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, "float64"))


def mae(y: np.ndarray, yhat: np.ndarray) -> float:
    """Mean absolute error (torchmetrics')."""
    return float(mean_absolute_error(_tensor(yhat), _tensor(y)))


def mse(y: np.ndarray, yhat: np.ndarray) -> float:
    """Mean squared error (torchmetrics')."""
    return float(mean_squared_error(_tensor(yhat), _tensor(y)))


def smape(y: np.ndarray, yhat: np.ndarray) -> float:
    """Symmetric mean absolute percentage error, in percent (0 to 200); 0/0 counts as 0
    (torchmetrics' sMAPE, which is a fraction of 2, times 100)."""
    return 100.0 * float(symmetric_mean_absolute_percentage_error(_tensor(yhat), _tensor(y)))


def naive_scale(train_y: np.ndarray, season: int = 1) -> float:
    """Mean absolute error of the seasonal-naive forecast ``y[t - season]`` in sample."""
    train_y = np.asarray(train_y, "float64")
    if len(train_y) <= season:
        raise ValueError(
            f"mase needs a training series longer than season={season}; got {len(train_y)} values"
        )
    return mae(train_y[season:], train_y[:-season])


def mase(y: np.ndarray, yhat: np.ndarray, train_y: np.ndarray, season: int = 1) -> float:
    """Mean absolute scaled error: MAE over the in-sample seasonal-naive MAE of `train_y`.

    Below 1 the forecast beats the naive one-step forecast made with known history.
    """
    return mae(y, yhat) / naive_scale(train_y, season)


# The keys of `error_sums`.
SUMS = ("count", "abs", "sq", "smape", "scaled", "scaled_count")


def error_sums(y: np.ndarray, yhat: np.ndarray, naive: np.ndarray) -> dict[str, float]:
    """Sums that add up across partitions: y and yhat of shape (windows, horizon, targets),
    `naive` of shape (windows, targets), the MASE denominator of each window's series.

    They are the states of torchmetrics' MAE, MSE and sMAPE metrics after one update with
    these windows (and of an MAE over the errors scaled by `naive`, where it is positive), so
    `metrics_from_sums` of their totals equals the metrics over every window at once.
    """
    target, forecast = _tensor(y), _tensor(yhat)
    absolute, squared = tmr.MeanAbsoluteError(), tmr.MeanSquaredError()
    symmetric = tmr.SymmetricMeanAbsolutePercentageError()
    scaled = tmr.MeanAbsoluteError()
    for metric in (absolute, squared, symmetric, scaled):
        metric.set_dtype(torch.float64)
    absolute.update(forecast, target)
    squared.update(forecast, target)
    symmetric.update(forecast, target)
    scale = torch.as_tensor(np.asarray(naive, "float64"))[:, None, :].expand_as(target)
    known = scale > 0
    scaled.update(forecast[known] / scale[known], target[known] / scale[known])
    return {
        "count": float(absolute.total),
        "abs": float(absolute.sum_abs_error),
        "sq": float(squared.sum_squared_error),
        "smape": float(symmetric.sum_abs_per_error),  # of 2 * |error| / (|y| + |yhat|)
        "scaled": float(scaled.sum_abs_error),
        "scaled_count": float(scaled.total),
    }


def metrics_from_sums(sums: dict[str, float], metrics: Sequence[str]) -> dict[str, float]:
    """The requested metrics from (summed) `error_sums`."""
    count = sums["count"]
    if not count:
        raise ValueError("evaluate found no windows: the test data is shorter than one window")
    values = {
        "mae": sums["abs"] / count,
        "mse": sums["sq"] / count,
        "smape": 100.0 * sums["smape"] / count,
        "mase": sums["scaled"] / sums["scaled_count"] if sums["scaled_count"] else float("nan"),
    }
    return {name: float(values[name]) for name in metrics}


def check_metrics(metrics: Sequence[str]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"evaluate(metrics=...) got {unknown}; choose from {list(METRICS)}")
    return names


def sums_frame(sums: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({name: [value] for name, value in sums.items()})


def overlapping_standard_error(
    squares: float, counts: Sequence[int], horizon: int
) -> tuple[float, float]:
    """The standard error of a mean over validation windows that overlap, and the number of
    independent windows it is worth.

    `counts` holds each series' window count; a series' windows start one step apart, so two
    that start ``k < horizon`` steps apart share ``horizon - k`` steps. With the per-step
    differences independent, the per-window differences of one series then correlate as
    ``1 - k / horizon`` and those of different series not at all: the mean's variance is
    ``sigma**2 * F / N`` (``N`` windows in all, ``F`` the mean over windows of the summed
    correlations), and the squared deviations from the mean (`squares`) have expectation
    ``sigma**2 * (N - F)``. Returns ``sqrt(F * squares / (N * (N - F)))`` and ``N / F``;
    ``horizon`` 1 gives the textbook ``s / sqrt(N)``. Windows that cannot tell a spread
    (one window, or a few that overlap almost wholly) give an infinite error: no check can
    pass on them.
    """
    total = int(sum(counts))
    if total < 1:
        raise ValueError("overlapping_standard_error: no windows")
    summed = 0.0
    for count in counts:
        lags = np.arange(1, min(int(count), int(horizon)))
        summed += count + 2.0 * float(((count - lags) * (1.0 - lags / horizon)).sum())
    factor = summed / total
    effective = total / factor
    room = total - factor
    if room <= 1e-9 * total:
        return math.inf, effective
    return math.sqrt(factor * squares / (total * room)), effective
