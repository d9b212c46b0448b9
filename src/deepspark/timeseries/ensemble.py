"""Several trained forecasters as one: the mean of their forecasts (AutoTS's top configs).

`MeanForecastModel` is a single torch module. It reads windows of the longest member lookback,
hands each member the last steps its own lookback reads and averages their flat forecasts, so
`predict`, `evaluate`, Spark scoring and ONNX export treat the ensemble as one model.
`EnsembleForecaster` is the `Forecaster` around it; `save` writes each member to a folder of
its own, and `load` reads them back. Torch only in the module (it runs inside Spark tasks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import fsspec
import torch
from torch import nn

from deepspark.timeseries import forecast_metrics
from deepspark.timeseries.combined import evaluate_combined, predict_combined
from deepspark.timeseries.forecaster import Forecaster
from deepspark.timeseries.forecaster_io import read_json
from deepspark.timeseries.statistical import (
    StatsForecaster,
    per_series_evaluate_checks,
    per_series_predict_checks,
)
from deepspark.timeseries.tsdataset import TSDataset

__all__ = ["EnsembleForecaster", "MeanForecastModel", "own_steps"]

_ENSEMBLE_FILE = "ensemble.json"


class MeanForecastModel(nn.Module):
    """The mean forecast of `members` (modules with ``lookback``, ``input_size``, ``horizon``
    and ``output_size``, such as `FlatWindowModel`), on flat windows of the longest lookback."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        first = members[0]
        self.lookback = max(int(member.lookback) for member in members)
        self.input_size, self.horizon = first.input_size, first.horizon
        self.output_size = first.output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = x.reshape(-1, self.lookback, self.input_size)
        forecasts = [member(own_steps(windows, member)) for member in self.members]
        return torch.stack(forecasts).mean(dim=0)


def own_steps(windows: torch.Tensor, member: nn.Module) -> torch.Tensor:
    """The last ``member.lookback`` steps of `windows` (batch, steps, channels), flat."""
    return windows[:, windows.shape[1] - member.lookback :, :].flatten(1)


class EnsembleForecaster(Forecaster):
    """Trained forecasters of the same horizon and columns, forecasting their mean.

    Its lookback is the longest member's; `predict`, `evaluate`, `export_onnx` and `save`
    work as a `Forecaster`'s. It is made from trained members and is not trained itself.

    Parameters
    ----------
    members : sequence of Forecaster
        Trained (or loaded) forecasters; lookbacks and kinds may differ. Members may be
        ensembles themselves, and `StatsForecaster`s: the ensemble then forecasts series by
        series (`deepspark.timeseries.combined`; no ONNX export), each member weighing the
        same.

    Examples
    --------
    See ``docs/timeseries.md`` ("AutoTS"): ``AutoTS(ensemble=3)`` returns a pipeline whose
    forecaster is one of these.
    """

    def __init__(self, members: Sequence[Forecaster]) -> None:
        members = list(members)
        if not members or not all(isinstance(member, Forecaster) for member in members):
            raise TypeError("EnsembleForecaster(members=...) takes a non-empty list of Forecasters")
        fitted = [member._fitted() for member in members]  # a clear error for an untrained one
        horizons = sorted({member.horizon for member in members})
        if len(horizons) > 1:
            raise ValueError(f"EnsembleForecaster: members forecast different horizons {horizons}")
        roles = {repr(cols) for _, cols in fitted}
        if len(roles) > 1:
            raise ValueError(
                "EnsembleForecaster: members were trained on different columns: "
                + "; ".join(sorted(roles))
            )
        lookback = max(member.lookback for member in members)
        # a network kind for Forecaster's checks; the ensemble's own is "ensemble"
        super().__init__("dlinear", lookback=lookback, horizon=horizons[0])
        self.kind = "ensemble"
        self.members = members
        self.model_ = MeanForecastModel([model for model, _ in fitted])
        self.columns_ = fitted[0][1]
        self._train = members[0]._train  # MASE's default in-sample errors
        # statistical members fit each series where they forecast: series by series then
        self.per_series = any(isinstance(member, StatsForecaster) for member in members)

    def __repr__(self) -> str:
        return f"EnsembleForecaster({self.members!r})"

    def predict(
        self,
        data: TSDataset,
        horizon: int | None = None,
        *,
        onnx: bool | str = False,
        batch_size: int = 1024,
        floor: float | None = None,
    ) -> Any:
        """`Forecaster.predict`; with statistical members, the mean forecast is made series
        by series (`deepspark.timeseries.combined`)."""
        if not self.per_series:
            return super().predict(data, horizon, onnx=onnx, batch_size=batch_size, floor=floor)
        steps = per_series_predict_checks(self, data, horizon, onnx, floor)
        return predict_combined(self, data, steps, floor)

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
        """`Forecaster.evaluate`; with statistical members, series by series (each
        statistical member fitted at every window, as `StatsForecaster.evaluate` does)."""
        if not self.per_series:
            return super().evaluate(
                test, metrics, season=season, train=train, onnx=onnx, floor=floor
            )
        names, naive = per_series_evaluate_checks(self, test, metrics, season, train, onnx, floor)
        return evaluate_combined(self, test, names, naive, floor)

    def export_onnx(self, path: str) -> str:
        if self.per_series:
            raise TypeError(
                "this EnsembleForecaster has statistical members, which fit each series where "
                "they forecast: there is no single network to export; use predict"
            )
        return super().export_onnx(path)

    def _no_onnx(self, onnx: bool | str) -> None:
        if onnx:
            raise ValueError(
                "onnx=...: an EnsembleForecaster with statistical members has no network to "
                "export; leave it off"
            )

    def fit(self, *args: Any, **kwargs: Any) -> Forecaster:
        raise TypeError(
            "an EnsembleForecaster is made of trained forecasters: fit the members, then "
            "EnsembleForecaster([...])"
        )

    def save(self, path: str) -> str:
        """Write each member to ``<path>/member-<i>`` and the list to ``ensemble.json``."""
        fs, root = fsspec.core.url_to_fs(path)
        fs.makedirs(root, exist_ok=True)
        names = [f"member-{index}" for index in range(len(self.members))]
        for name, member in zip(names, self.members, strict=True):
            member.save(f"{path.rstrip('/')}/{name}")
        with fs.open(f"{root}/{_ENSEMBLE_FILE}", "w") as handle:
            json.dump({"members": names}, handle, indent=2)
        return path

    @classmethod
    def load(cls, path: str) -> EnsembleForecaster:
        names = read_json(path, _ENSEMBLE_FILE, "EnsembleForecaster.save")["members"]
        folders = [f"{path.rstrip('/')}/{name}" for name in names]
        return cls([(cls if cls.saved_at(f) else Forecaster).load(f) for f in folders])

    @staticmethod
    def saved_at(path: str) -> bool:
        """Whether `path` holds a saved ensemble (rather than one forecaster)."""
        fs, root = fsspec.core.url_to_fs(path)
        return bool(fs.exists(f"{root}/{_ENSEMBLE_FILE}"))
