"""Anomaly detectors that learn: an autoencoder over rolled windows, and the residuals of a
forecaster. Input and output formats are those of :mod:`deepspark.timeseries.anomaly`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from deepspark.timeseries.anomaly import AnomalyDetector, Columns
from deepspark.timeseries.forecaster import Forecaster
from deepspark.timeseries.tsdataset import TSDataset


def _autoencoder(window: int, hidden_size: int, latent_size: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(window, hidden_size),
        nn.ReLU(),
        nn.Linear(hidden_size, latent_size),
        nn.ReLU(),
        nn.Linear(latent_size, hidden_size),
        nn.ReLU(),
        nn.Linear(hidden_size, window),
    )


def _scaled_windows(values: np.ndarray, window: int) -> np.ndarray:
    """A series' windows, each step scaled by the series' median and interquartile range."""
    values = pd.Series(values, dtype=np.float64).interpolate(limit_direction="both").to_numpy()
    low, centre, high = np.nanpercentile(values, [25, 50, 75])
    spread = (high - low) or float(np.nanstd(values)) or 1.0
    scaled = ((values - centre) / spread).astype(np.float32)
    if len(scaled) < window:
        return np.empty((0, window), np.float32)
    return np.lib.stride_tricks.sliding_window_view(scaled, window)


class AEDetector(AnomalyDetector):
    """Flag points an autoencoder cannot reconstruct.

    ``fit`` trains one small MLP autoencoder on every ``window``-step window of every series
    (each series scaled by its median and interquartile range); on Spark it trains through
    :meth:`deepspark.Estimator.fit` on ``num_workers`` ranks. A point's score is its squared
    reconstruction error averaged over the windows that contain it. Series shorter than
    ``window`` get NaN scores and no anomalies.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> y = np.sin(np.arange(400) / 5.0)
    >>> y[300] += 3.0
    >>> frame = pd.DataFrame({"ds": np.arange(400), "y": y})
    >>> detector = AEDetector(window=20, ratio=0.01, epochs=30).fit(frame)
    >>> 300 in detector.anomaly_indices(frame)
    True
    """

    def __init__(
        self,
        window: int = 16,
        *,
        ratio: float | None = None,
        threshold: float | None = None,
        sigmas: float | None = None,
        hidden_size: int = 32,
        latent_size: int = 4,
        epochs: int = 20,
        batch_size: int = 64,
        lr: float = 1e-3,
        num_workers: int = 1,
        seed: int = 0,
        dt_col: str = "ds",
        target_col: str = "y",
        id_col: str | None = None,
    ) -> None:
        super().__init__(
            ratio=ratio,
            threshold=threshold,
            sigmas=sigmas,
            dt_col=dt_col,
            target_col=target_col,
            id_col=id_col,
        )
        self.window = window
        self.hidden_size = hidden_size
        self.latent_size = latent_size
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.num_workers = num_workers
        self.seed = seed

    def fit(self, data: Any) -> AEDetector:
        """Train the autoencoder on all windows of all series. Returns self."""
        for name in ("window", "hidden_size", "latent_size", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: give a positive int")
        if self.window < 2:
            raise ValueError(f"window={self.window}: give at least 2 steps")
        self._check_threshold()
        frame, columns, is_spark = self._frame(data)
        torch.manual_seed(self.seed)
        model = _autoencoder(self.window, self.hidden_size, self.latent_size)
        if is_spark:
            self.model_ = self._fit_spark(model, frame, columns)
        else:
            self.model_ = self._fit_local(model, frame, columns)
        return self

    def _fit_local(self, model: nn.Module, frame: pd.DataFrame, columns: Columns) -> nn.Module:
        groups = (
            [frame] if columns.id_col is None else [g for _, g in frame.groupby(columns.id_col)]
        )
        windows = [
            _scaled_windows(
                g.sort_values(columns.dt_col)[columns.target_col].to_numpy(), self.window
            )
            for g in groups
        ]
        x = torch.from_numpy(np.concatenate(windows))
        if len(x) == 0:
            raise ValueError(
                f"no series has window={self.window} points: give a shorter window or longer series"
            )
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        model.train()
        for _ in range(self.epochs):
            for batch in torch.randperm(len(x), generator=generator).split(self.batch_size):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x[batch]), x[batch]).backward()
                optimizer.step()
        return model.eval()

    def _fit_spark(self, model: nn.Module, frame: Any, columns: Columns) -> nn.Module:
        from pyspark.sql import functions as F
        from pyspark.sql.types import ArrayType, FloatType, StructField, StructType

        import deepspark as ds

        window, dt_col, target_col = self.window, columns.dt_col, columns.target_col

        def series_windows(series: pd.DataFrame) -> pd.DataFrame:
            values = series.sort_values(dt_col)[target_col].to_numpy()
            windows = list(_scaled_windows(values, window))
            # The engine reads features and labels from different columns.
            return pd.DataFrame({"window": windows, "reconstruct": windows})

        schema = StructType(
            [
                StructField("window", ArrayType(FloatType())),
                StructField("reconstruct", ArrayType(FloatType())),
            ]
        )
        grouped = (
            frame.groupBy(columns.id_col) if columns.id_col else frame.groupBy(F.lit("series"))
        )
        windows = grouped.applyInPandas(series_windows, schema)
        lr = self.lr
        estimator = ds.Estimator.from_torch(
            model=model,
            optimizer=lambda params: torch.optim.Adam(params, lr=lr),
            loss=nn.MSELoss(),
        )
        estimator.fit(
            windows,
            feature_cols=["window"],
            label_cols=["reconstruct"],
            epochs=self.epochs,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
        return estimator.get_model().eval()

    def _series_function(self, columns: Columns):
        if not hasattr(self, "model_"):
            raise RuntimeError("this AEDetector is not fitted: call fit(data) first")
        window, target = self.window, columns.target_col
        sizes = (self.window, self.hidden_size, self.latent_size)
        # Plain arrays travel to Spark tasks; the module is rebuilt there.
        state = {k: v.detach().numpy().copy() for k, v in self.model_.state_dict().items()}

        def reconstruction_error(series: pd.DataFrame) -> np.ndarray:
            windows = _scaled_windows(series[target].to_numpy(), window)
            errors = np.full(len(series), np.nan)
            if len(windows) == 0:
                return errors
            model = _autoencoder(*sizes)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(windows))
                squared = ((model(x) - x) ** 2).numpy().astype(np.float64)
            totals = np.zeros(len(series))
            counts = np.zeros(len(series))
            for offset in range(window):
                totals[offset : offset + len(windows)] += squared[:, offset]
                counts[offset : offset + len(windows)] += 1
            return totals / counts

        return reconstruction_error


class ForecastResidualDetector(AnomalyDetector):
    """Flag points far from what a forecaster expected.

    ``forecaster`` is any object with ``fit(data)``, ``predict(data, horizon=...)`` and
    ``lookback`` and ``horizon`` attributes, as :class:`deepspark.timeseries.Forecaster` has.
    For each series, the detector forecasts every ``horizon`` steps from the ``lookback``
    points before (all windows of all series in one ``predict`` call, each window a series of
    its own); a point's score is its absolute error. The first ``lookback`` points of each
    series have no forecast: NaN scores, never anomalies. On Spark, scoring runs per series
    inside the tasks and needs a forecaster that predicts pandas frames without a session.

    ``predict`` gets the data's kind: a ``TSDataset`` input gives the forecaster a
    ``TSDataset`` of the windows (built with the same class), a DataFrame a pandas DataFrame
    with the same column names. It must return one row per forecast step with the window's id,
    the timestamp and the target column, in time order per window. A TSDataset's extra
    feature columns travel with the windows; its scaler does not (scores are in the units of
    ``data.to_pandas()``).
    """

    def __init__(
        self,
        forecaster: Any,
        *,
        ratio: float | None = None,
        threshold: float | None = None,
        sigmas: float | None = None,
        dt_col: str = "ds",
        target_col: str = "y",
        id_col: str | None = None,
    ) -> None:
        super().__init__(
            ratio=ratio,
            threshold=threshold,
            sigmas=sigmas,
            dt_col=dt_col,
            target_col=target_col,
            id_col=id_col,
        )
        self.forecaster = forecaster

    def fit(self, data: Any, **fit_options: Any) -> ForecastResidualDetector:
        """Fit the forecaster on ``data`` (``fit_options`` go to its ``fit``). Returns self.

        ``data`` is what `score` takes: a TSDataset, or a pandas or Spark DataFrame in long
        format with the detector's ``dt_col``, ``target_col`` and ``id_col``. A deepspark
        `Forecaster` gets a DataFrame as a TSDataset of those columns; another forecaster gets
        it as it is.
        """
        for name in ("fit", "predict", "lookback", "horizon"):
            if not hasattr(self.forecaster, name):
                raise TypeError(
                    f"forecaster {type(self.forecaster).__name__} has no {name!r}: give a "
                    "deepspark.timeseries Forecaster or an object with fit, predict, lookback "
                    "and horizon"
                )
        self._check_threshold()
        frame, columns, is_spark = self._frame(data)
        dataset_class = type(data) if hasattr(data, "from_pandas") else None
        if dataset_class is None and isinstance(self.forecaster, Forecaster):
            # deepspark's forecasters train on a TSDataset: the DataFrame that `score` takes
            # becomes one, with the detector's columns, and so do the windows `score` forecasts
            build = TSDataset.from_spark if is_spark else TSDataset.from_pandas
            data = build(
                frame, dt_col=columns.dt_col, target_col=columns.target_col, id_col=columns.id_col
            )
            dataset_class = TSDataset
        self.forecaster.fit(data, **fit_options)
        self.dataset_class_ = dataset_class
        return self

    def _series_function(self, columns: Columns):
        if not hasattr(self, "dataset_class_"):
            raise RuntimeError("this ForecastResidualDetector is not fitted: call fit first")
        forecaster, dataset_class = self.forecaster, self.dataset_class_

        def absolute_error(series: pd.DataFrame) -> np.ndarray:
            return _residuals(forecaster, dataset_class, series, columns)

        return absolute_error


WINDOW_ID = "window_id"


def _residuals(
    forecaster: Any, dataset_class: Any, series: pd.DataFrame, columns: Columns
) -> np.ndarray:
    """Absolute one-call rolling-origin forecast errors of one series (sorted by time)."""
    lookback, horizon = int(forecaster.lookback), int(forecaster.horizon)
    values = series[columns.target_col].to_numpy(np.float64)
    errors = np.full(len(series), np.nan)
    origins = list(range(lookback, len(series), horizon))
    if not origins:
        return errors
    windows = []
    for number, origin in enumerate(origins):
        context = series.iloc[origin - lookback : origin][
            [columns.dt_col, columns.target_col, *columns.feature_cols]
        ]
        windows.append(context.assign(**{WINDOW_ID: number}))
    frame = pd.concat(windows, ignore_index=True)
    if dataset_class is not None:
        frame = dataset_class.from_pandas(
            frame,
            dt_col=columns.dt_col,
            target_col=columns.target_col,
            id_col=WINDOW_ID,
            extra_feature_col=list(columns.feature_cols) or None,
        )
    forecast = forecaster.predict(frame, horizon=horizon)
    id_col = WINDOW_ID if WINDOW_ID in forecast.columns else "id"
    for number, rows in forecast.groupby(id_col, sort=True):
        origin = origins[int(number)]
        predicted = rows[columns.target_col].to_numpy(np.float64)
        steps = min(len(predicted), len(series) - origin)
        errors[origin : origin + steps] = np.abs(
            values[origin : origin + steps] - predicted[:steps]
        )
    return errors
