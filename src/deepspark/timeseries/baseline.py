"""The seasonal-naive forecaster, and the validation check that keeps AutoTS from doing worse.

`SeasonalNaiveForecaster` repeats each series' last season: the baseline that short, strongly
seasonal series are judged against, with a `Forecaster`'s `predict`, `evaluate`, Spark scoring,
ONNX export and save/load. `naive_comparison` scores trained networks and that baseline on the
same validation windows, window by window, so that AutoTS can tell a real gain from noise;
`with_statistical` judges statsforecast models the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from deepspark.timeseries import windows
from deepspark.timeseries.ensemble import MeanForecastModel, own_steps
from deepspark.timeseries.forecast_metrics import overlapping_standard_error
from deepspark.timeseries.forecast_model import LOSSES, FlatWindowModel, run_torch
from deepspark.timeseries.forecaster import Forecaster, _check_dataset
from deepspark.timeseries.networks.blocks import SeasonalNaive
from deepspark.timeseries.series_ops import SeriesColumns
from deepspark.timeseries.statistical import SEASONAL_NAIVE
from deepspark.timeseries.tsdataset import TSDataset

__all__ = [
    "SeasonalNaiveForecaster",
    "naive_check",
    "naive_comparison",
    "with_statistical",
]

_PAIR_COL = "__paired__"


class SeasonalNaiveForecaster(Forecaster):
    """Forecast each series' last `season` steps again, repeated over the horizon.

    Nothing is trained: `fit` records the data's columns (and the training data MASE is
    measured against), and the forecaster then predicts, evaluates, exports and saves as any
    `Forecaster`, on pandas or Spark, scaled or not. Repeating values commutes with each
    series' scaling, so a `TSPipeline` hands it the data unscaled: its forecasts are then
    the data's own values, exactly.

    Parameters
    ----------
    season : int
        The period in steps (1: repeat the last value).
    horizon : int
        Steps to forecast.
    lookback : int, optional
        Steps read (default `season`; at least `season`).

    Examples
    --------
    >>> SeasonalNaiveForecaster(season=12, horizon=6)
    SeasonalNaiveForecaster(season=12, horizon=6)
    """

    saved_kind = "seasonal_naive"  # how `Forecaster.load` finds this class for a saved one

    def __init__(
        self, *, season: int, horizon: int, lookback: int | None = None, **settings: Any
    ) -> None:
        if not isinstance(season, int) or isinstance(season, bool) or season < 1:
            raise ValueError(f"season must be a positive int, got {season!r}")
        lookback = season if lookback is None else lookback
        if isinstance(lookback, int) and lookback < season:
            raise ValueError(f"lookback={lookback} is shorter than season={season}")
        settings.pop("kind", None)
        super().__init__("dlinear", lookback=lookback, horizon=horizon, **settings)
        self.kind, self.season, self.sizes = "seasonal_naive", season, {"season": season}
        self.scale_free = True

    def __repr__(self) -> str:
        lookback = "" if self.lookback == self.season else f", lookback={self.lookback}"
        return f"SeasonalNaiveForecaster(season={self.season}, horizon={self.horizon}{lookback})"

    def build_model(self, cols: SeriesColumns) -> FlatWindowModel:
        input_size, output_size = len(cols.value_cols), len(cols.target_col)
        naive = SeasonalNaive(
            season=self.season,
            lookback=self.lookback,
            horizon=self.horizon,
            output_size=output_size,
        )
        return FlatWindowModel(naive, self.lookback, input_size, self.horizon, output_size)

    def _run_here(
        self, model: nn.Module, x: np.ndarray, onnx_path: str | None, batch_size: int
    ) -> np.ndarray:
        # In this process the repeated steps are copied in float64: the forecast is the
        # data's own values, so a zero stays an exact zero (sMAPE counts any other as 200%).
        if onnx_path:
            return super()._run_here(model, x, onnx_path, batch_size)
        steps = np.asarray(x, "float64").reshape(len(x), self.lookback, model.input_size)
        repeated = steps[:, model.network.repeat.numpy(), : model.output_size]
        return repeated.reshape(len(x), -1)

    def fit(self, train: TSDataset, **ignored: Any) -> pd.DataFrame:
        """Record `train`'s columns; there is nothing to train (options are accepted so that
        it stands wherever a `Forecaster` is fitted). Returns an empty history."""
        _check_dataset(train, "train")
        self.columns_ = train.columns
        self.model_ = self.build_model(train.columns)
        self._train, self._onnx_path = train, None
        self.history = pd.DataFrame()
        return self.history


class _Paired(nn.Module):
    """Two flat-window models side by side on windows of the longer lookback: their forecasts
    concatenated, each from the last steps its own lookback reads."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.models = nn.ModuleList([first, second])
        self.lookback = max(int(first.lookback), int(second.lookback))
        self.input_size = first.input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.reshape(-1, self.lookback, self.input_size)
        return torch.cat([model(own_steps(steps, model)) for model in self.models], dim=1)


def naive_comparison(
    networks: nn.Module,
    naive: nn.Module,
    rows: Any,
    loss: str,
    *,
    horizon: int = 1,
    counts: Sequence[int] | None = None,
) -> dict[str, float]:
    """Per-window losses of `networks` and `naive` (flat-window models) on validation windows
    `rows` (flat inputs of lookback ``max`` of theirs, as `AutoTS` rolls them: a Spark
    DataFrame or a dict of arrays), in the scaled space they were trained in.

    Returns the window count, each side's mean loss, the mean of the per-window differences
    (networks minus naive; below 0 when the networks do better), its standard error and the
    effective number of windows (`overlapping_standard_error`: windows of each series, as
    `counts` gives them, that start one step apart share ``horizon - 1`` of their steps; the
    defaults treat the windows as independent).
    """
    paired = _Paired(networks, naive)
    criterion = LOSSES[loss](reduction="none")

    def sums_of(y: np.ndarray, both: np.ndarray) -> dict[str, float]:
        width = y.shape[1]
        target = torch.from_numpy(np.asarray(y, "float32"))
        both_t = torch.from_numpy(np.asarray(both, "float32"))
        first = criterion(both_t[:, :width], target).double().mean(dim=1)
        second = criterion(both_t[:, width:], target).double().mean(dim=1)
        gap = first - second
        return {
            "count": float(len(y)),
            "networks": float(first.sum()),
            "naive": float(second.sum()),
            "gap": float(gap.sum()),
            "gap_sq": float((gap**2).sum()),
        }

    if isinstance(rows, dict):
        y, x = rows[windows.Y_COL], rows[windows.X_COL]
        if x.shape[1] != paired.lookback * paired.input_size:
            raise ValueError(
                f"naive_comparison: windows of {x.shape[1] // paired.input_size} steps, but "
                f"the models read {paired.lookback}: roll the windows with that lookback"
            )
        sums = sums_of(y, run_torch(paired, x)) if len(x) else dict.fromkeys(_SUMS, 0.0)
    else:
        sums = _spark_sums(paired, rows, sums_of)
    count = sums["count"]
    if not count:
        raise ValueError(
            "naive_comparison: no validation windows; give each series at least `horizon` "
            "validation steps and `lookback` training steps"
        )
    gap = sums["gap"] / count
    if counts is not None and sum(counts) != count:
        raise ValueError(
            f"naive_comparison: counts add up to {sum(counts)} windows, but rows has {count}"
        )
    error, effective = overlapping_standard_error(
        max(sums["gap_sq"] - count * gap**2, 0.0), counts or [int(count)], horizon
    )
    return {
        "windows": int(count),
        "effective_windows": effective,
        "networks": sums["networks"] / count,
        "seasonal_naive": sums["naive"] / count,
        "difference": gap,
        "standard_error": error,
    }


_SUMS = ("count", "networks", "naive", "gap", "gap_sq")


def naive_check(
    models: list[nn.Module],
    naive: nn.Module,
    rows: Any,
    loss: str,
    margin: float,
    *,
    horizon: int = 1,
    counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """`naive_comparison` of the mean forecast of `models` against `naive`, with ``chosen``:
    ``"networks"`` when their mean loss is lower by more than `margin` times naive's and by
    more than one standard error of the per-window differences (overlapping windows of
    `horizon` steps, `counts` per series), else ``"seasonal_naive"``."""
    networks = models[0] if len(models) == 1 else MeanForecastModel(models)
    result: dict[str, Any] = naive_comparison(
        networks, naive, rows, loss, horizon=horizon, counts=counts
    )
    needed = max(result["standard_error"], margin * result["seasonal_naive"])
    result["chosen"] = "networks" if result["difference"] < -needed else "seasonal_naive"
    return result


def _spark_sums(paired: nn.Module, rows: Any, sums_of: Any) -> dict[str, float]:
    import deepspark as ds
    from deepspark.timeseries import tsdataset_spark

    scored = ds.predict(
        rows, paired, windows.X_COL, output_col=_PAIR_COL, batch_size=1024, output="array"
    )

    def frame_sums(frame: pd.DataFrame) -> dict[str, float]:
        if frame.empty:
            return dict.fromkeys(_SUMS, 0.0)
        y = np.stack(frame[windows.Y_COL].to_numpy())
        return sums_of(y, np.stack(frame[_PAIR_COL].to_numpy()))

    return tsdataset_spark.summed_errors(scored, frame_sums, _SUMS)


def with_statistical(
    check: dict[str, Any],
    losses: pd.DataFrame,
    names: Sequence[str],
    margin: float,
    *,
    horizon: int = 1,
    id_col: str | None = None,
) -> dict[str, Any]:
    """`check` (`naive_check`'s networks against seasonal naive) with each statistical model
    of `names` judged the same way on its per-window `losses` (`validation_losses`), and
    ``chosen`` the candidate with the lowest loss relative to seasonal naive's among those
    that beat it by more than `margin` of its loss and one standard error (else
    ``"seasonal_naive"``), and ``passing`` those candidates, best first. The standard error
    counts each series' windows (rows per `id_col` value) as overlapping over `horizon`
    steps (`overlapping_standard_error`)."""
    result = dict(check)
    naive = losses[SEASONAL_NAIVE].to_numpy("float64")
    counts = losses.groupby(id_col).size().tolist() if id_col else [len(losses)]
    passing = {}
    if result["chosen"] == "networks":
        passing["networks"] = result["networks"] / result["seasonal_naive"]
    result["statistical"] = {}
    for name in names:
        own = losses[name].to_numpy("float64")
        if not len(own) or np.isnan(own).any():
            result["statistical"][name] = None  # could not fit some series
            continue
        gap = own - naive
        squares = float(((gap - gap.mean()) ** 2).sum())
        error, effective = overlapping_standard_error(squares, counts, horizon)
        result["statistical"][name] = {
            "windows": len(gap),
            "effective_windows": effective,
            "loss": float(own.mean()),
            "seasonal_naive": float(naive.mean()),
            "difference": float(gap.mean()),
            "standard_error": error,
        }
        if gap.mean() < -max(error, margin * naive.mean()):
            passing[name] = float(own.mean() / naive.mean())
    result["passing"] = sorted(passing, key=passing.get)
    result["chosen"] = result["passing"][0] if passing else SEASONAL_NAIVE
    return result
