"""Forecasters: one global network over all series, trained by deepspark's distributed engine.

`Forecaster(kind, lookback=, horizon=)` builds a network of `deepspark.timeseries.networks`
(LSTM, TCN, Seq2Seq, N-BEATS, DLinear, PatchTST) and trains it with
``Estimator.from_torch(...).fit`` on the rolled windows of a TSDataset: a Spark TSDataset's
windows never leave Spark; a pandas TSDataset's windows are handed once to the running
session (``deepspark.init_context()``). `predict` forecasts the real future after each
series' last timestamp, unscaled; `evaluate` scores rolled windows of held-out data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from deepspark.deprecation import renamed_attribute
from deepspark.timeseries import forecast_metrics, windows
from deepspark.timeseries.forecast_model import FlatWindowModel, make_loss, run_onnx, run_torch
from deepspark.timeseries.forecaster_io import read_forecaster, write_forecaster
from deepspark.timeseries.series_ops import SeriesColumns
from deepspark.timeseries.tsdataset import TSDataset

PREDICTION_COL = "__forecast__"


class Forecaster:
    """A forecasting network of kind `kind`, trained over every series of a TSDataset.

    Parameters
    ----------
    kind : str
        ``"lstm"``, ``"tcn"``, ``"seq2seq"``, ``"nbeats"``, ``"dlinear"``, ``"patchtst"``
        (or ``"nhits"``); see `deepspark.timeseries.networks.build_network`.
    lookback, horizon : int
        Steps read, steps forecast.
    lr : float
        Adam's learning rate.
    loss : {"mse", "mae", "huber"}
    seed : int
        Seeds the network's initial weights and the engine's shuffles: the same seed, data
        and worker count give the same model.
    **sizes
        The kind's size hyperparameters (``hidden_size``, ``num_layers``, ...).

    Attributes
    ----------
    history : pandas.DataFrame or None
        One row per epoch of the last `fit`, as `deepspark.Estimator.history`
        (``history_`` is its deprecated old name).

    Examples
    --------
    >>> Forecaster("dlinear", lookback=24, horizon=6)
    Forecaster('dlinear', lookback=24, horizon=6)
    """

    history_ = renamed_attribute("history")

    def __init__(
        self,
        kind: str,
        *,
        lookback: int,
        horizon: int,
        lr: float = 1e-3,
        loss: str = "mse",
        seed: int = 0,
        **sizes: Any,
    ) -> None:
        from deepspark.timeseries.networks import NETWORK_KINDS

        if kind not in NETWORK_KINDS:
            raise ValueError(f"kind={kind!r}: choose from {list(NETWORK_KINDS)}")
        for name, value in (("lookback", lookback), ("horizon", horizon)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        make_loss(loss)  # refuses an unknown name now
        self.kind, self.lookback, self.horizon = kind, lookback, horizon
        self.lr, self.loss, self.seed, self.sizes = lr, loss, seed, dict(sizes)
        self.model_: FlatWindowModel | None = None
        self.columns_: SeriesColumns | None = None
        self.history: pd.DataFrame | None = None
        self.estimator_: Any = None
        self._train: TSDataset | None = None
        self._onnx_path: str | None = None
        # True when forecasts commute with each series' scaling (a TSPipeline then passes
        # the data unscaled)
        self.scale_free = False

    def __repr__(self) -> str:
        kind = "" if isinstance(self, _NamedForecaster) else f"{self.kind!r}, "
        sizes = "".join(f", {name}={value!r}" for name, value in self.sizes.items())
        return (
            f"{type(self).__name__}({kind}lookback={self.lookback}, horizon={self.horizon}{sizes})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # A pickled forecaster (a Spark task's copy, e.g. ForecastResidualDetector's) keeps
        # what predicts: settings, columns, the network. The engine's estimator and the
        # training data may hold Spark handles, which only live on the driver; without them
        # the copy's evaluate needs train= for MASE.
        state = dict(self.__dict__)
        state["estimator_"], state["_train"], state["_onnx_path"] = None, None, None
        return state

    # --- training -------------------------------------------------------------------------

    def build_model(self, cols: SeriesColumns) -> FlatWindowModel:
        """A fresh network for `cols`' targets and features, seeded with `seed`."""
        from deepspark.timeseries.networks import build_network

        input_size, output_size = len(cols.value_cols), len(cols.target_col)
        torch.manual_seed(self.seed)
        network = build_network(
            self.kind,
            lookback=self.lookback,
            horizon=self.horizon,
            input_size=input_size,
            output_size=output_size,
            **self.sizes,
        )
        return FlatWindowModel(network, self.lookback, input_size, self.horizon, output_size)

    def fit(
        self,
        train: TSDataset,
        *,
        validation_data: TSDataset | None = None,
        epochs: int = 10,
        batch_size: int = 64,
        num_workers: int | None = None,
        callbacks: Sequence[Any] | None = None,
        **fit_options: Any,
    ) -> pd.DataFrame:
        """Train one model over all series of `train` and return the history (one row per
        epoch).

        The windows are cut from `train` (``roll(lookback, horizon)``); a Spark TSDataset
        stays in Spark, a pandas one is handed once to the running session. Training is a
        fresh, seeded start each time. `num_workers` ranks train data-parallel; other
        keyword arguments (``checkpoint_dir``, ``max_failures``, ``progress``, ...) go to
        `deepspark.Estimator.fit`.
        """
        import deepspark as ds

        _check_dataset(train, "train")
        self.columns_ = train.columns
        frame = self._training_rows(train)
        validation = None
        if validation_data is not None:
            _check_dataset(validation_data, "validation_data")
            self._check_columns(validation_data, "validation_data")
            validation = self._training_rows(validation_data)
        self.model_ = self.build_model(train.columns)
        self.estimator_ = ds.Estimator.from_torch(
            model=self.model_,
            optimizer=partial(torch.optim.Adam, lr=self.lr),
            loss=make_loss(self.loss),
        )
        self.history = self.estimator_.fit(
            frame,
            feature_cols="x",
            label_cols="y",
            epochs=epochs,
            batch_size=batch_size,
            validation_data=validation,
            num_workers=num_workers,
            callbacks=callbacks,
            seed=self.seed,
            **fit_options,
        )
        self.model_ = self.estimator_.get_model()
        self._train, self._onnx_path = train, None
        return self.history

    def _training_rows(self, data: TSDataset) -> Any:
        rows = data.windows(self.lookback, self.horizon)
        if data.is_spark:
            return rows.select(windows.X_COL, windows.Y_COL)
        return {
            windows.X_COL: np.stack(rows[windows.X_COL].to_numpy()).astype("float32"),
            windows.Y_COL: np.stack(rows[windows.Y_COL].to_numpy()).astype("float32"),
        }

    # --- forecasting ----------------------------------------------------------------------

    def predict(
        self,
        data: TSDataset,
        horizon: int | None = None,
        *,
        onnx: bool | str = False,
        batch_size: int = 1024,
        floor: float | None = None,
    ) -> Any:
        """Forecast the `horizon` steps after each series' last timestamp.

        Returns the forecasts in long format, unscaled with `data`'s scaler: columns id, dt
        (future timestamps at `data.freq`) and one per target. Pandas in, pandas out (the
        model runs in this process); Spark in, Spark out (``deepspark.predict`` on the
        executors). ``onnx=True`` runs an ONNX export through ONNX Runtime (``onnx="f.onnx"``:
        that file, written by `export_onnx`). `floor` raises unscaled forecasts below it to it
        (0 for data that cannot be negative: energy, sales, counts).
        """
        model, cols = self._fitted()
        _check_dataset(data, "data")
        self._check_columns(data, "data")
        check_floor(floor)
        steps = self.horizon if horizon is None else horizon
        if not isinstance(steps, int) or not 1 <= steps <= self.horizon:
            raise ValueError(
                f"horizon={horizon!r}: forecast 1 to {self.horizon} steps (the model was "
                f"trained for horizon={self.horizon}); train another for longer"
            )
        freq = data.freq
        if freq is None:
            raise ValueError(
                "the data's interval is unknown (series of one row?): call resample(interval)"
            )
        onnx_path = self._onnx_file(onnx)
        last = data.last_windows(self.lookback)
        scaler, shape = data.scaler, (self.horizon, len(cols.target_col))
        if not data.is_spark:
            x = np.stack(last[windows.X_COL].to_numpy())
            flat = self._run_here(model, x, onnx_path, batch_size)
            forecasts = flat.reshape(len(x), *shape)[:, :steps]
            return windows.forecast_rows(last, forecasts, data.columns, freq, scaler, floor)
        scored = self._score_spark(last, onnx_path, batch_size)
        data_cols = data.columns

        def rows(frame: pd.DataFrame) -> pd.DataFrame:
            forecasts = windows.stacked(frame[PREDICTION_COL], *shape)[:, :steps]
            return windows.forecast_rows(frame, forecasts, data_cols, freq, scaler, floor)

        from deepspark.timeseries import tsdataset_spark

        out_cols = SeriesColumns(data_cols.dt_col, data_cols.target_col, data_cols.id_col)
        out = tsdataset_spark.schema(scored, out_cols)
        return tsdataset_spark.per_rows(scored, rows, out)

    def _run_here(
        self, model: torch.nn.Module, x: np.ndarray, onnx_path: str | None, batch_size: int
    ) -> np.ndarray:
        """Flat forecasts of flat windows `x`, in this process (float32, as trained)."""
        x = x.astype("float32")
        return run_onnx(onnx_path, x) if onnx_path else run_torch(model, x, batch_size)

    def _score_spark(self, rows: Any, onnx_path: str | None, batch_size: int) -> Any:
        import deepspark as ds

        options = {"input_names": ["x"]} if onnx_path else {}
        return ds.predict(
            rows,
            onnx_path or self.model_,
            windows.X_COL,
            output_col=PREDICTION_COL,
            batch_size=batch_size,
            output="array",
            **options,
        )

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
        """Forecast every window of `test` and score it: MAE, MSE, sMAPE (percent) and MASE,
        over all series, steps and targets, on unscaled values (raised to `floor`, as
        `predict` does).

        MASE divides each error by its series' in-sample seasonal-naive MAE (`season` steps
        back) on `train` (default: the data `fit` trained on). For Spark data each partition
        adds up its errors and one row of sums comes back.
        """
        model, cols = self._fitted()
        names = self._evaluate_checks(test, metrics, season, floor)
        history = train if train is not None else self._train
        naive = None
        if "mase" in names and history is not None:
            _check_dataset(history, "train")
            naive = history.naive_errors(season)
        onnx_path = self._onnx_file(onnx)
        shape_x, shape_y = (
            (self.lookback, len(cols.value_cols)),
            (self.horizon, len(cols.target_col)),
        )
        id_col, targets, scaler = cols.id_col, cols.target_col, test.scaler

        def sums_of(frame: pd.DataFrame) -> dict[str, float]:
            y = windows.stacked(frame[windows.Y_COL], *shape_y)
            yhat = windows.stacked(frame[PREDICTION_COL], *shape_y)
            ids = frame[id_col].to_numpy() if id_col else np.zeros(len(frame))
            if scaler is not None:
                y = scaler.inverse_windows(y, ids, targets)
                yhat = scaler.inverse_windows(yhat, ids, targets)
            yhat = windows.floored(yhat, floor)
            if naive is None:
                denominators = np.full((len(frame), len(targets)), np.nan)
            elif id_col:
                denominators = naive.reindex(ids)[list(targets)].to_numpy("float64")
            else:
                denominators = np.repeat(naive[list(targets)].to_numpy("float64"), len(frame), 0)
            return forecast_metrics.error_sums(y, yhat, denominators)

        rolled = test.windows(self.lookback, self.horizon)
        if test.is_spark:
            from deepspark.timeseries import tsdataset_spark

            scored = self._score_spark(rolled, onnx_path, 1024)
            sums = tsdataset_spark.summed_errors(scored, sums_of)
        else:
            x = windows.stacked(rolled[windows.X_COL], *shape_x).reshape(len(rolled), -1)
            flat = self._run_here(model, x, onnx_path, 4096)
            rolled[PREDICTION_COL] = list(flat)
            sums = sums_of(rolled)
        return forecast_metrics.metrics_from_sums(sums, names)

    def _evaluate_checks(
        self, test: TSDataset, metrics: Sequence[str], season: int, floor: float | None
    ) -> list[str]:
        """`evaluate`'s argument checks; the metric names."""
        names = forecast_metrics.check_metrics(metrics)
        _check_dataset(test, "test")
        self._check_columns(test, "test")
        if not isinstance(season, int) or season < 1:
            raise ValueError(f"season must be a positive int, got {season!r}")
        check_floor(floor)
        return names

    # --- export and persistence -----------------------------------------------------------

    def export_onnx(self, path: str) -> str:
        """Write the trained model as ONNX (input ``x``: flat windows of shape (batch,
        lookback * input_size)); checked against torch on the way out. Returns the path."""
        from deepspark.inference import export_onnx

        model, cols = self._fitted()
        example = torch.zeros(2, self.lookback * len(cols.value_cols))
        return export_onnx(model.eval(), path, example, input_names=["x"])

    def _onnx_file(self, onnx: bool | str) -> str | None:
        if isinstance(onnx, str):
            if not Path(onnx).exists():
                raise ValueError(f"onnx={onnx!r} does not exist: write it with export_onnx first")
            return onnx
        if not onnx:
            return None
        if self._onnx_path is None:
            self._onnx_path = self.export_onnx(
                tempfile.mkdtemp(prefix="forecaster-") + "/model.onnx"
            )
        return self._onnx_path

    def save(self, path: str) -> str:
        """Write the forecaster to directory `path` (any fsspec URL): its settings and column
        roles as JSON, its weights as safetensors. Loading runs no pickled code."""
        model, cols = self._fitted()
        write_forecaster(path, self._settings(), cols, model.network.state_dict())
        return path

    @classmethod
    def load(cls, path: str) -> Forecaster:
        """A forecaster written by `save`, ready to `predict` and `evaluate`."""
        settings, cols, weights = read_forecaster(path)
        kind = settings.pop("kind")
        # the subclass that saved it: a named network's, or one that says so in saved_kind
        # (SeasonalNaiveForecaster; deepspark.timeseries imports every forecaster module)
        saved_by = {subclass.saved_kind: subclass for subclass in _subclasses(Forecaster)} | _NAMED
        if kind in saved_by:
            forecaster: Forecaster = saved_by[kind](**settings)
        else:
            forecaster = Forecaster(kind, **settings)
        model = forecaster.build_model(cols)
        model.network.load_state_dict(weights)
        forecaster.model_, forecaster.columns_ = model, cols
        return forecaster

    def _settings(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lookback": self.lookback,
            "horizon": self.horizon,
            "lr": self.lr,
            "loss": self.loss,
            "seed": self.seed,
            **self.sizes,
        }

    # --- checks ---------------------------------------------------------------------------

    def _fitted(self) -> tuple[FlatWindowModel, SeriesColumns]:
        if self.model_ is None or self.columns_ is None:
            raise ValueError(f"this {type(self).__name__} is not trained: call fit first (or load)")
        return self.model_, self.columns_

    def _check_columns(self, data: TSDataset, name: str) -> None:
        trained = self.columns_
        if trained is None:
            return
        if (data.target_col, data.feature_col) != (
            list(trained.target_col),
            list(trained.feature_col),
        ):
            raise ValueError(
                f"{name} has targets {data.target_col} and features {data.feature_col}, but the "
                f"model was trained on targets {list(trained.target_col)} and features "
                f"{list(trained.feature_col)}: prepare it the same way"
            )


def _check_dataset(data: Any, name: str) -> None:
    if not isinstance(data, TSDataset):
        raise TypeError(
            f"{name} must be a TSDataset (TSDataset.from_pandas / from_spark), got "
            f"{type(data).__name__}"
        )


def check_floor(floor: Any) -> None:
    """A clear error unless `floor` is None or a finite number."""
    if floor is not None and (
        isinstance(floor, bool) or not isinstance(floor, (int, float)) or not np.isfinite(floor)
    ):
        raise ValueError(f"floor={floor!r}: a finite number (the least value to forecast) or None")


class _NamedForecaster(Forecaster):
    network_kind = ""

    def __init__(self, *, lookback: int, horizon: int, **options: Any) -> None:
        super().__init__(self.network_kind, lookback=lookback, horizon=horizon, **options)


class LSTMForecaster(_NamedForecaster):
    """`Forecaster` with an LSTM network: ``Forecaster("lstm", ...)``."""

    network_kind = "lstm"


class TCNForecaster(_NamedForecaster):
    """`Forecaster` with a temporal convolutional network: ``Forecaster("tcn", ...)``."""

    network_kind = "tcn"


class Seq2SeqForecaster(_NamedForecaster):
    """`Forecaster` with an LSTM encoder-decoder: ``Forecaster("seq2seq", ...)``."""

    network_kind = "seq2seq"


class NBeatsForecaster(_NamedForecaster):
    """`Forecaster` with an N-BEATS network: ``Forecaster("nbeats", ...)``."""

    network_kind = "nbeats"


class DLinearForecaster(_NamedForecaster):
    """`Forecaster` with a DLinear network: ``Forecaster("dlinear", ...)``."""

    network_kind = "dlinear"


class PatchTSTForecaster(_NamedForecaster):
    """`Forecaster` with a PatchTST transformer: ``Forecaster("patchtst", ...)``."""

    network_kind = "patchtst"


class NHitsForecaster(_NamedForecaster):
    """`Forecaster` with an N-HiTS network: ``Forecaster("nhits", ...)``."""

    network_kind = "nhits"


_NAMED = {cls.network_kind: cls for cls in _NamedForecaster.__subclasses__()}


def _subclasses(cls: type) -> list[type]:
    """Every subclass of `cls` that names the kind it saves (``saved_kind``)."""
    found = []
    for subclass in cls.__subclasses__():
        if subclass.__dict__.get("saved_kind"):
            found.append(subclass)
        found.extend(_subclasses(subclass))
    return found
