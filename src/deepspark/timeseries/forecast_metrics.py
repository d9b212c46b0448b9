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
