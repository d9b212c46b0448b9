"""Networks and statistical models forecasting together: an `EnsembleForecaster` with
`StatsForecaster` members forecasts the mean of its members, series by series."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from sktime.datasets import load_airline

from deepspark.timeseries import EnsembleForecaster, Forecaster, StatsForecaster, TSDataset
from deepspark.timeseries.pipeline import TSPipeline

HORIZON, SEASON = 6, 12


def _two_series() -> pd.DataFrame:
    """Airline passengers (1949-1960) and Mauna Loa CO2 (1984-2001), monthly."""
    airline = load_airline()
    first = pd.DataFrame(
        {"ds": airline.index.to_timestamp(), "y": airline.to_numpy(float), "id": "airline"}
    )
    co2 = sm.datasets.co2.load_pandas().data.resample("MS").mean().interpolate()["1984":]
    second = co2.reset_index().rename(columns={"index": "ds", "co2": "y"}).assign(id="co2")
    return pd.concat([first, second], ignore_index=True)[["id", "ds", "y"]]


def _data(frame: pd.DataFrame, spark=None) -> TSDataset:
    if spark is None:
        return TSDataset.from_pandas(frame, dt_col="ds", target_col="y", id_col="id")
    return TSDataset.from_spark(
        spark.createDataFrame(frame), dt_col="ds", target_col="y", id_col="id"
    )


_TRAINED: dict[str, tuple] = {}


@pytest.fixture
def trained(spark):
    """A pipeline of the mean of one network (two, as a nested ensemble), AutoETS and
    AutoTheta, trained on scaled data; and its members' own pipelines (trained once per
    module: training needs the session, which is a per-test fixture)."""
    if "pipelines" not in _TRAINED:
        _TRAINED["pipelines"] = _train()
    return _TRAINED["pipelines"]


def _train() -> tuple:
    frame = _two_series()
    train = _data(frame).scale("standard")
    networks = []
    for seed, (kind, lookback) in enumerate((("dlinear", 12), ("nbeats", 24))):
        net = Forecaster(kind, lookback=lookback, horizon=HORIZON, lr=3e-3, loss="mae")
        net.seed = seed
        net.fit(train, epochs=3, batch_size=32, num_workers=1, progress=False)
        networks.append(net)
    statistical = [
        StatsForecaster(m, season=SEASON, horizon=HORIZON) for m in ("AutoETS", "AutoTheta")
    ]
    for model in statistical:
        model.fit(train)
    members = [EnsembleForecaster(networks), *statistical]
    combined = TSPipeline(EnsembleForecaster(members), train.scaler, {"model": "combination"})
    alone = [TSPipeline(member, train.scaler, {}) for member in members]
    return frame, combined, alone


def test_the_forecast_is_the_mean_of_the_members_forecasts(trained, tmp_path):
    frame, combined, alone = trained
    assert combined.forecaster.per_series and combined.lookback == 24
    future = combined.predict(_data(frame))
    each = [pipeline.predict(_data(frame)) for pipeline in alone]
    for part in each:
        assert list(part["ds"]) == list(future["ds"]) and list(part["id"]) == list(future["id"])
    mean = np.mean([part["y"].to_numpy() for part in each], axis=0)
    np.testing.assert_allclose(future["y"], mean, rtol=1e-5)
    # the three members disagree: the mean is not one of them
    assert min(np.abs(part["y"].to_numpy() - mean).max() for part in each) > 0.1
    # fewer steps, and a floor raised above every forecast
    assert len(combined.predict(_data(frame), 2)) == 4
    assert (combined.predict(_data(frame), floor=1e6)["y"] == 1e6).all()
    # saved and loaded with its nested network ensemble and statistical members
    loaded = TSPipeline.load(combined.save(str(tmp_path / "combined")))
    kinds = [type(member) for member in loaded.forecaster.members]
    assert kinds == [EnsembleForecaster, StatsForecaster, StatsForecaster]
    pd.testing.assert_frame_equal(loaded.predict(_data(frame)), future, rtol=1e-6)


def test_evaluate_scores_each_window_with_the_members_forecasts_from_its_origin(trained):
    frame, combined, alone = trained
    tail = frame.groupby("id").tail(32)  # 24 steps of lookback, 3 windows of 6 per series
    scores = combined.evaluate(_data(tail), season=SEASON)
    errors = []
    for _, group in tail.groupby("id"):
        for end in range(23, len(group) - HORIZON):
            past = _data(group.iloc[: end + 1])
            mean = np.mean([p.predict(past)["y"].to_numpy() for p in alone], axis=0)
            errors.append(np.abs(group["y"].to_numpy()[end + 1 : end + 1 + HORIZON] - mean))
    assert len(errors) == 6
    assert scores["mae"] == pytest.approx(np.mean(errors), rel=1e-5)
    assert set(scores) == {"mae", "mse", "smape", "mase"} and scores["mase"] > 0


@pytest.mark.slow
def test_spark_forecasts_and_scores_equal_pandas(trained, spark):
    frame, combined, _ = trained
    future = combined.predict(_data(frame))
    on_spark = combined.predict(_data(frame, spark)).toPandas().sort_values(["id", "ds"])
    np.testing.assert_allclose(on_spark["y"], future["y"], rtol=1e-5)
    tail = frame.groupby("id").tail(40)
    pandas_scores = combined.evaluate(_data(tail), season=SEASON)
    assert combined.evaluate(_data(tail, spark), season=SEASON) == pytest.approx(
        pandas_scores, rel=1e-6
    )
    # a test part too short for one window is refused on the driver, before the job
    with pytest.raises(ValueError, match=r"test: series '\w+' has 10 rows.*larger ratio"):
        combined.evaluate(_data(frame.groupby("id").tail(10), spark), season=SEASON)


def test_what_a_combined_ensemble_refuses(trained, tmp_path):
    frame, combined, _ = trained
    ensemble = combined.forecaster
    with pytest.raises(TypeError, match="no single network to export"):
        ensemble.export_onnx(str(tmp_path / "e.onnx"))
    with pytest.raises(ValueError, match="onnx"):
        combined.predict(_data(frame), onnx=True)
    with pytest.raises(ValueError, match="forecast 1 to 6 steps"):
        combined.predict(_data(frame), 7)
    short = frame.groupby("id").tail(10)
    with pytest.raises(ValueError, match="has 10 rows; the ensemble reads 24"):
        combined.predict(_data(short))
    with pytest.raises(ValueError, match="has 10 rows; the ensemble reads 30"):
        combined.evaluate(_data(short))
