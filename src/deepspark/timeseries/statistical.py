"""Statistical forecasters beside the networks: statsforecast's AutoETS, AutoTheta and AutoARIMA.

`StatsForecaster` fits one statistical model per series and target where it forecasts: on
the history it is given in `predict`, and on every origin's past in `evaluate`. It has a
`Forecaster`'s `predict`, `evaluate` and save/load, on pandas or Spark (one grouped
``applyInPandas`` pass, so statsforecast must be installed where the tasks run), and nothing to
train. `validation_losses` scores such models and the seasonal-naive forecast window by window
on AutoTS's validation windows, in the scaled space the networks are judged in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from deepspark.timeseries import forecast_metrics, windows
from deepspark.timeseries.forecast_model import LOSSES, FlatWindowModel
from deepspark.timeseries.forecaster import Forecaster, _check_dataset, check_floor
from deepspark.timeseries.scaler import TSScaler
from deepspark.timeseries.series_ops import SeriesColumns, sort_series
from deepspark.timeseries.tsdataset import TSDataset
from deepspark.timeseries.validation_steps import TRAIN_END

__all__ = ["STATISTICAL_MODELS", "StatsForecaster", "validation_losses"]

STATISTICAL_MODELS = ("AutoETS", "AutoTheta", "AutoARIMA")
# statsforecast's ETS holds at most 24 seasonal states: longer seasons go through MSTL, which
# takes the season out and leaves the rest to a non-seasonal AutoETS (statsforecast's advice)
ETS_SEASON_LIMIT = 24
SEASONAL_NAIVE = "seasonal_naive"
_END = TRAIN_END


def statsforecast_model(name: str, season: int) -> Any:
    """A fresh statsforecast model `name` for series of period `season`."""
    try:
        from statsforecast import models as sf
    except ImportError as error:
        raise ImportError(
            f"the statistical forecaster {name!r} needs statsforecast: pip install "
            "'deepspark[timeseries]' (or AutoTS(statistical=()) to search networks only)"
        ) from error
    if name == "AutoETS" and season > ETS_SEASON_LIMIT:
        return sf.MSTL(season_length=season, trend_forecaster=sf.AutoETS(model="ZZN"))
    return getattr(sf, name)(season_length=season)


def forecast_values(name: str, season: int, values: np.ndarray, horizon: int) -> np.ndarray:
    """The (horizon, targets) forecast of `values` (steps, targets): one model per target."""
    columns = [
        np.asarray(statsforecast_model(name, season).forecast(y=column, h=horizon)["mean"])
        for column in np.asarray(values, "float64").T
    ]
    return np.stack(columns, axis=1).astype("float64")


def origin_forecasts(
    name: str,
    season: int,
    values: np.ndarray,
    ends: Sequence[int],
    horizon: int,
    *,
    refit: bool = True,
) -> np.ndarray:
    """(len(ends), horizon, targets): for each index in `ends`, the forecast of `name` from
    the steps up to and including it. ``refit=True`` estimates the model again on each
    origin's whole past; ``refit=False`` estimates it once, on the steps up to the first
    origin, and runs those parameters over each later origin's past (statsforecast's
    ``forward``), as a trained network is run over windows it was not trained on."""
    targets = values.shape[1]
    if not len(ends):
        return _none(horizon, targets)
    if name == SEASONAL_NAIVE:  # the last season repeated, as SeasonalNaiveForecaster does
        steps = np.arange(horizon) % season - season + 1
        return np.stack([values[end + steps] for end in ends])
    if refit:
        return np.stack([forecast_values(name, season, values[: end + 1], horizon) for end in ends])
    per_target = []
    for column in np.asarray(values, "float64").T:
        model = statsforecast_model(name, season).fit(y=column[: ends[0] + 1])
        per_target.append([model.forward(y=column[: end + 1], h=horizon)["mean"] for end in ends])
    return np.stack(per_target, axis=-1).astype("float64")


def _none(horizon: int, targets: int) -> np.ndarray:
    return np.zeros((0, horizon, targets), "float64")


class _FittedWhereItForecasts(nn.Module):
    """What a statistical forecaster holds in place of a network: nothing to run in batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            "a StatsForecaster fits its model on each series where it forecasts: call its "
            "predict or evaluate (it has no network to run or export)"
        )


class StatsForecaster(Forecaster):
    """A statsforecast model (`STATISTICAL_MODELS`) fitted on each series where it forecasts.

    `fit` records the data's columns (there is nothing to train across series); `predict`
    fits the model on each series' history as given and forecasts the steps after it;
    `evaluate` fits it at every window of the test data on the steps up to the window's end.
    Each target is forecast on its own; extra feature columns are not read. Forecasts do not
    depend on scaling (scaled data is unscaled first), so a `TSPipeline` hands it the data
    unscaled. Needs statsforecast (``pip install 'deepspark[timeseries]'``), on the
    executors too for Spark data.

    Parameters
    ----------
    model : {"AutoETS", "AutoTheta", "AutoARIMA"}
        statsforecast's model; with ``season > 24``, AutoETS is MSTL with a non-seasonal
        AutoETS on what the season leaves.
    season : int
        The period in steps (1: none).
    horizon : int
        Steps to forecast.
    lookback : int, optional
        The steps before `evaluate`'s first origin (default twice the season or the horizon,
        whichever is longer), as a network's windows start after theirs.

    Examples
    --------
    >>> StatsForecaster("AutoETS", season=12, horizon=6)
    StatsForecaster('AutoETS', season=12, horizon=6)
    """

    saved_kind = "statistical"  # how `Forecaster.load` finds this class for a saved one

    def __init__(
        self,
        model: str = "AutoETS",
        *,
        season: int = 1,
        horizon: int,
        lookback: int | None = None,
        **settings: Any,
    ) -> None:
        if model not in STATISTICAL_MODELS:
            raise ValueError(f"StatsForecaster(model={model!r}): choose from {STATISTICAL_MODELS}")
        if not isinstance(season, int) or isinstance(season, bool) or season < 1:
            raise ValueError(f"StatsForecaster(season={season!r}): a positive int")
        if lookback is None and isinstance(horizon, int):
            lookback = 2 * max(season, horizon)
        settings.pop("kind", None)
        super().__init__("dlinear", lookback=lookback, horizon=horizon, **settings)
        self.kind, self.model, self.season = "statistical", model, season
        self.sizes = {"model": model, "season": season}
        self.scale_free = True

    def __repr__(self) -> str:
        return f"StatsForecaster({self.model!r}, season={self.season}, horizon={self.horizon})"

    def build_model(self, cols: SeriesColumns) -> FlatWindowModel:
        input_size, output_size = len(cols.value_cols), len(cols.target_col)
        network = _FittedWhereItForecasts()
        return FlatWindowModel(network, self.lookback, input_size, self.horizon, output_size)

    def fit(self, train: TSDataset, **ignored: Any) -> pd.DataFrame:
        """Record `train`'s columns; models are fitted per series where they forecast
        (options are accepted so that it stands wherever a `Forecaster` is fitted)."""
        _check_dataset(train, "train")
        self.columns_, self.model_ = train.columns, self.build_model(train.columns)
        self._train, self._onnx_path = train, None
        self.history = pd.DataFrame()
        return self.history

    def export_onnx(self, path: str) -> str:
        raise TypeError(
            f"StatsForecaster({self.model!r}) fits statsforecast models per series: there is "
            "no network to export; use predict"
        )

    def _no_onnx(self, onnx: bool | str) -> None:
        if onnx:
            raise ValueError("onnx=...: a StatsForecaster has no network to export; leave it off")

    def predict(
        self,
        data: TSDataset,
        horizon: int | None = None,
        *,
        onnx: bool | str = False,
        batch_size: int = 1024,
        floor: float | None = None,
    ) -> Any:
        """Forecast the `horizon` steps after each series' last timestamp (see
        `Forecaster.predict`): the model fitted on each series' whole history in `data`."""
        statsforecast_model(self.model, self.season)  # installed? (before any Spark job)
        steps = per_series_predict_checks(self, data, horizon, onnx, floor)
        freq = data.freq
        if freq is None:
            raise ValueError(
                "the data's interval is unknown (series of one row?): call resample(interval)"
            )
        data_cols, scaler = data.columns, data.scaler
        name, season = self.model, self.season
        out_cols = SeriesColumns(data_cols.dt_col, data_cols.target_col, data_cols.id_col)

        def step(frame: pd.DataFrame) -> pd.DataFrame:
            frame, values = _unscaled(frame, data_cols, scaler)
            forecast = _forecast_or_raise(name, season, values, steps, frame, data_cols)
            last = frame.iloc[[-1]].reset_index(drop=True)
            return windows.forecast_rows(last, forecast[None], out_cols, freq, None, floor)

        return _per_series(data, step, out_cols)

    def evaluate(
        self,
        test: TSDataset,
        metrics: Sequence[str] = forecast_metrics.METRICS,
        *,
        season: int = 1,
        train: TSDataset | None = None,
        onnx: bool | str = False,
        floor: float | None = None,
    ) -> dict[str, float]:
        """Score forecasts at every window of `test`, as `Forecaster.evaluate` does: a
        window's forecast is the model fitted on its series' steps up to the window's end
        (at least `lookback` of them). Costs one fit per window and target."""
        statsforecast_model(self.model, self.season)  # installed? (before any Spark job)
        names, naive = per_series_evaluate_checks(self, test, metrics, season, train, onnx, floor)
        test_cols, scaler = test.columns, test.scaler
        name, model_season, lookback, horizon = self.model, self.season, self.lookback, self.horizon

        def step(frame: pd.DataFrame) -> pd.DataFrame:
            frame, values = _unscaled(frame, test_cols, scaler)
            ends = list(range(lookback - 1, len(values) - horizon))
            yhat = origin_forecasts(name, model_season, values, ends, horizon)
            return window_sums(frame, test_cols, values, ends, yhat, naive, floor)

        return summed_metrics(test, step, names)


def window_sums(
    frame: pd.DataFrame,
    cols: SeriesColumns,
    values: np.ndarray,
    ends: list[int],
    yhat: np.ndarray,
    naive: pd.DataFrame | None,
    floor: float | None,
) -> pd.DataFrame:
    """One series' error sums (one row) of forecasts `yhat` from each index in `ends` of
    its unscaled target `values`, MASE scaled by `naive`'s row for the series."""
    y = _truth(values, ends, yhat.shape[1])
    denominators = _denominators(naive, frame, cols, len(ends))
    sums = forecast_metrics.error_sums(y, windows.floored(yhat, floor), denominators)
    return forecast_metrics.sums_frame(sums)


def summed_metrics(test: TSDataset, step: Any, names: list[str]) -> dict[str, float]:
    """The metrics `names` from `step`'s error sums (`window_sums`) over every series."""
    sums = _per_series(test, step, None).sum()
    return forecast_metrics.metrics_from_sums({k: float(sums[k]) for k in sums.index}, names)


def per_series_predict_checks(
    forecaster: Forecaster,
    data: TSDataset,
    horizon: int | None,
    onnx: bool | str,
    floor: float | None,
) -> int:
    """`predict`'s checks for a forecaster that fits each series where it forecasts (a
    `StatsForecaster`, an ensemble with one); the steps to forecast."""
    forecaster._fitted()
    _check_dataset(data, "data")
    forecaster._check_columns(data, "data")
    check_floor(floor)
    forecaster._no_onnx(onnx)
    steps = forecaster.horizon if horizon is None else horizon
    if not isinstance(steps, int) or not 1 <= steps <= forecaster.horizon:
        raise ValueError(f"horizon={horizon!r}: forecast 1 to {forecaster.horizon} steps")
    return steps


def per_series_evaluate_checks(
    forecaster: Forecaster,
    test: TSDataset,
    metrics: Sequence[str],
    season: int,
    train: TSDataset | None,
    onnx: bool | str,
    floor: float | None,
) -> tuple[list[str], pd.DataFrame | None]:
    """`evaluate`'s checks for such a forecaster: the metric names, and the in-sample
    seasonal-naive errors MASE divides by (None when MASE is not asked for or no training
    data is known)."""
    forecaster._fitted()
    names = forecaster._evaluate_checks(test, metrics, season, floor)
    forecaster._no_onnx(onnx)
    if test.is_spark:  # short series, named on the driver (pandas data raise it right away)
        try:
            test.windows(forecaster.lookback, forecaster.horizon)  # lazy but for this check
        except ValueError as error:
            raise ValueError(f"test: {error}; a split's test part needs a larger ratio") from None
    history = train if train is not None else forecaster._train
    if "mase" not in names or history is None:
        return names, None
    _check_dataset(history, "train")
    return names, history.naive_errors(season)


def _unscaled(
    frame: pd.DataFrame, cols: SeriesColumns, scaler: TSScaler | None
) -> tuple[pd.DataFrame, np.ndarray]:
    """One series' rows in time order and its targets' unscaled values (steps, targets)."""
    frame = sort_series(frame, cols)
    if scaler is not None:
        frame = scaler.inverse(frame, cols.id_col, cols.target_col)
    return frame, frame[list(cols.target_col)].to_numpy("float64")


def _forecast_or_raise(
    name: str, season: int, values: np.ndarray, horizon: int, frame: pd.DataFrame, cols: Any
) -> np.ndarray:
    try:
        return forecast_values(name, season, values, horizon)
    except ImportError:
        raise
    except Exception as error:
        series = frame[cols.id_col].iloc[0] if cols.id_col else "the series"
        raise ValueError(
            f"{name} could not forecast {series!r} ({len(values)} steps): {error}"
        ) from error


def _truth(values: np.ndarray, ends: Sequence[int], horizon: int) -> np.ndarray:
    if not len(ends):
        return _none(horizon, values.shape[1])
    return np.stack([values[end + 1 : end + 1 + horizon] for end in ends])


def _denominators(
    naive: pd.DataFrame | None, frame: pd.DataFrame, cols: SeriesColumns, count: int
) -> np.ndarray:
    targets = list(cols.target_col)
    if naive is None:
        return np.full((count, len(targets)), np.nan)
    row = naive.loc[[frame[cols.id_col].iloc[0]]] if cols.id_col else naive.iloc[[0]]
    return np.repeat(row[targets].to_numpy("float64"), count, axis=0)


def _per_series(data: Any, step: Any, out_cols: SeriesColumns | None) -> pd.DataFrame | Any:
    """`step` on each series of `data` (a TSDataset):
    pandas in, pandas out; Spark in, a Spark DataFrame (forecast rows, `out_cols`) or, for
    sums and losses (`out_cols` None), the collected pandas frame."""
    cols = data.columns
    if not data.is_spark:
        frame = data.to_pandas()
        groups = [frame] if cols.id_col is None else [g for _, g in frame.groupby(cols.id_col)]
        parts = [step(group) for group in groups if len(group)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    from pyspark.sql import types as T

    from deepspark.timeseries import tsdataset_spark

    rows = data.to_spark()
    if out_cols is not None:
        return tsdataset_spark.per_series_table(
            rows, cols, step, tsdataset_spark.schema(rows, out_cols)
        )
    schema = T.StructType([T.StructField(n, T.DoubleType()) for n in forecast_metrics.SUMS])
    return tsdataset_spark.per_series_table(rows, cols, step, schema).toPandas()


def validation_losses(
    continued: Any, names: Sequence[str], season: int, horizon: int, loss: str
) -> pd.DataFrame:
    """The loss of seasonal naive and of each statistical model in `names` on every
    validation window of `continued` (a `validation_steps.ContinuedValidation`): forecasts
    from each origin at or after a series' last training step, by a model fitted on the
    training steps (as the networks are) and run over the origin's past, scored in the
    scaled space (``loss`` per window, over its steps and targets).

    One row per window: the series id (when there is one), the origin's time, then one
    column per model (NaN where a model could not fit the series). Spark data is scored per
    series in one grouped pass and the table (one row per window) is collected.
    """
    cols, scaler = continued.cols, continued.data.scaler
    models = [SEASONAL_NAIVE, *names]
    criterion = LOSSES[loss](reduction="none")
    keys = ([cols.id_col] if cols.id_col else []) + [cols.dt_col]

    def step(frame: pd.DataFrame) -> pd.DataFrame:
        end = frame[_END].iloc[0]
        frame, values = _unscaled(frame.drop(columns=_END), cols, scaler)
        center, spread = _factors(scaler, frame, cols)
        stamps = frame[cols.dt_col]
        ends = [
            i for i in range(len(values) - horizon) if stamps.iloc[i] >= end and i >= season - 1
        ]
        truth = (_truth(values, ends, horizon) - center) / spread
        out = frame.iloc[ends][keys].reset_index(drop=True)
        for model in models:
            try:
                forecast = origin_forecasts(model, season, values, ends, horizon, refit=False)
            except ImportError:
                raise
            except Exception:  # a model that cannot fit this series is out of the running
                out[model] = np.nan
                continue
            scaled = torch.from_numpy((forecast - center) / spread)
            errors = criterion(scaled, torch.from_numpy(truth)).flatten(1).mean(dim=1)
            out[model] = errors.double().numpy()
        return out

    return _losses(continued, step, keys, models)


def _factors(scaler: TSScaler | None, frame: pd.DataFrame, cols: SeriesColumns) -> Any:
    if scaler is None:
        return 0.0, 1.0
    ids = frame[cols.id_col].iloc[:1].to_numpy() if cols.id_col else np.zeros(1)
    center, spread = scaler.factors(ids, cols.target_col)
    return center[0], spread[0]


def _losses(continued: Any, step: Any, keys: list[str], models: list[str]) -> pd.DataFrame:
    cols, ends = continued.cols, continued.ends
    if not continued.is_spark:
        frame = continued.data.to_pandas()
        if cols.id_col is None:
            parts = [step(frame.assign(**{_END: ends}))] if len(frame) else []
        else:
            frame = frame.assign(**{_END: frame[cols.id_col].map(ends)})
            parts = [step(group) for _, group in frame.dropna(subset=[_END]).groupby(cols.id_col)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=keys + models)
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from deepspark.timeseries import tsdataset_spark

    rows = continued.data.to_spark()
    joined = (
        rows.crossJoin(ends) if cols.id_col is None else rows.join(F.broadcast(ends), cols.id_col)
    )
    fields = [T.StructField(key, rows.schema[key].dataType) for key in keys]
    schema = T.StructType(fields + [T.StructField(m, T.DoubleType()) for m in models])
    return tsdataset_spark.per_series_table(joined, cols, step, schema).toPandas()


def fitted_per_series(names: Sequence[str], naive: Forecaster, data: TSDataset) -> list[Forecaster]:
    """The forecasters of `names` that fit each series where they forecast, in order (the
    networks left out): `StatsForecaster`s, and `naive` for ``"seasonal_naive"``; each
    fitted on `data` (which records its columns)."""
    chosen: list[Forecaster] = []
    for name in (name for name in names if name != "networks"):
        forecaster = naive
        if name != SEASONAL_NAIVE:
            forecaster = StatsForecaster(name, season=naive.season, horizon=naive.horizon)
        forecaster.fit(data)
        chosen.append(forecaster)
    return chosen
