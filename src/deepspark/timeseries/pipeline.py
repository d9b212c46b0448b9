"""`TSPipeline`: a trained forecaster with the scaler of its training data, saved and loaded
as one directory (what `AutoTS.fit` returns)."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from deepspark.timeseries.ensemble import EnsembleForecaster
from deepspark.timeseries.forecaster import Forecaster, check_floor
from deepspark.timeseries.forecaster_io import read_json
from deepspark.timeseries.scaler import TSScaler
from deepspark.timeseries.tsdataset import TSDataset

__all__ = ["TSPipeline"]

_SCALER_FILE, _PIPELINE_FILE, _FORECASTER_DIR = "scaler.json", "pipeline.json", "forecaster"


class TSPipeline:
    """A fitted forecaster with the scaler of its training data: unscaled data in, the real
    future out (unscaled, with timestamps).

    Parameters
    ----------
    forecaster : Forecaster
        Trained.
    scaler : TSScaler or None
        What the forecaster's training data was scaled with.
    config : dict
        The search's config that made it (model, lookback, lr, sizes).
    floor : float, optional
        Forecasts below it are raised to it, in `predict` and `evaluate` (AutoTS sets 0 for
        data without negative values).
    """

    def __init__(
        self,
        forecaster: Forecaster,
        scaler: TSScaler | None,
        config: dict[str, Any],
        floor: float | None = None,
    ):
        check_floor(floor)
        self.forecaster = forecaster
        self.scaler = scaler
        self.config = dict(config)
        self.floor = floor

    @property
    def lookback(self) -> int:
        return self.forecaster.lookback

    def __repr__(self) -> str:
        floor = "" if self.floor is None else f", floor={self.floor!r}"
        return f"TSPipeline({self.forecaster!r}, scaled={self.scaler is not None}{floor})"

    def _scaled(self, data: TSDataset) -> bool:
        """Scale `data` with the pipeline's scaler when it is not scaled; True if it did."""
        if data.scaler is not None or self.scaler is None or self.forecaster.scale_free:
            return False
        data.scale(self.scaler, fit=False)
        return True

    def predict(self, data: TSDataset, horizon: int | None = None, **options: Any) -> Any:
        """Forecast the steps after each series' end; `data` is left as it was given."""
        options.setdefault("floor", self.floor)
        scaled = self._scaled(data)
        try:
            return self.forecaster.predict(data, horizon, **options)
        finally:
            if scaled:
                data.unscale()

    def evaluate(self, test: TSDataset, **options: Any) -> dict[str, float]:
        """`Forecaster.evaluate` on `test` (scaled here when given unscaled)."""
        options.setdefault("floor", self.floor)
        scaled = self._scaled(test)
        train = options.get("train")
        scaled_train = train is not None and self._scaled(train)
        try:
            return self.forecaster.evaluate(test, **options)
        finally:
            if scaled:
                test.unscale()
            if scaled_train:
                train.unscale()

    def save(self, path: str) -> str:
        """Write the forecaster, the scaler and the config to directory `path` (fsspec)."""
        fs, root = fsspec.core.url_to_fs(path)
        fs.makedirs(root, exist_ok=True)
        self.forecaster.save(f"{path.rstrip('/')}/{_FORECASTER_DIR}")
        with fs.open(f"{root}/{_PIPELINE_FILE}", "w") as handle:
            json.dump({"config": _plain(self.config), "floor": self.floor}, handle, indent=2)
        if self.scaler is not None:
            with fs.open(f"{root}/{_SCALER_FILE}", "w") as handle:
                json.dump(self.scaler.to_dict(), handle)
        return path

    @classmethod
    def load(cls, path: str) -> TSPipeline:
        fs, root = fsspec.core.url_to_fs(path)
        saved = read_json(path, _PIPELINE_FILE, "TSPipeline.save")
        scaler = None
        if fs.exists(f"{root}/{_SCALER_FILE}"):
            with fs.open(f"{root}/{_SCALER_FILE}", "r") as handle:
                scaler = TSScaler.from_dict(json.load(handle))
        where = f"{path.rstrip('/')}/{_FORECASTER_DIR}"
        kind = EnsembleForecaster if EnsembleForecaster.saved_at(where) else Forecaster
        return cls(kind.load(where), scaler, saved["config"], saved.get("floor"))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item"):
        return value.item()
    return value
