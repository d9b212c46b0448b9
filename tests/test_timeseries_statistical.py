"""Statistical forecasters (statsforecast, fitted per series) and how AutoTS weighs them against
its networks on the validation windows."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from sktime.datasets import load_airline
from statsforecast import models as sf

from deepspark.timeseries import EnsembleForecaster, Forecaster, StatsForecaster, TSDataset
from deepspark.timeseries.autots import AutoTS, TSPipeline
from deepspark.timeseries.baseline import with_statistical
from deepspark.timeseries.statistical import validation_losses
from deepspark.timeseries.validation_steps import continued

HORIZON = 6


def _airline() -> pd.DataFrame:
    series = load_airline()
    return pd.DataFrame({"ds": series.index.to_timestamp(), "y": series.to_numpy(float)})


def _two_series() -> pd.DataFrame:
    """Airline passengers (1949-1960) and Mauna Loa CO2 (1984-2001), monthly, as two series."""
    airline = _airline().assign(id="airline")
    co2 = sm.datasets.co2.load_pandas().data.resample("MS").mean().interpolate()["1984":]
    co2 = co2.reset_index().rename(columns={"index": "ds", "co2": "y"}).assign(id="co2")
    return pd.concat([airline, co2], ignore_index=True)[["id", "ds", "y"]]


def _direct(frame: pd.DataFrame, model: str, season: int, horizon: int) -> np.ndarray:
    """statsforecast's own forecast of each series, in id order."""
    return np.concatenate(
        [
            getattr(sf, model)(season_length=season).forecast(y=group["y"].to_numpy(), h=horizon)[
                "mean"
            ]
            for _, group in frame.groupby("id")
        ]
    )


def test_stats_forecaster_forecasts_each_series_as_statsforecast_does(tmp_path):
    frame = _two_series()
    data = TSDataset.from_pandas(frame, dt_col="ds", target_col="y", id_col="id")
    ets = StatsForecaster("AutoETS", season=12, horizon=HORIZON)
    assert repr(ets) == "StatsForecaster('AutoETS', season=12, horizon=6)"
    assert ets.fit(data).empty  # nothing to train across series
    future = ets.predict(data)
    np.testing.assert_allclose(future["y"], _direct(frame, "AutoETS", 12, HORIZON), rtol=1e-6)
    assert list(future["ds"].iloc[:HORIZON]) == list(
        pd.date_range(_airline()["ds"].max(), periods=HORIZON + 1, freq="MS")[1:]
    )
    # scaled data is unscaled first: the forecast does not depend on the scaling
    scaled = TSDataset.from_pandas(frame, dt_col="ds", target_col="y", id_col="id")
    scaled.scale("standard")
    np.testing.assert_allclose(ets.predict(scaled)["y"], future["y"], rtol=1e-6)
    assert (ets.predict(data, 2, floor=1e6)["y"] == 1e6).all()
    # saved as settings only (nothing was trained) and loaded as the same forecaster
    loaded = Forecaster.load(ets.save(str(tmp_path / "ets")))
    assert isinstance(loaded, StatsForecaster) and (loaded.model, loaded.season) == ("AutoETS", 12)
    pd.testing.assert_frame_equal(loaded.predict(data), future)

    # every test window scored against its own forecast, fitted on the window's past: the
    # last 32 months hold 3 windows per series after the first `lookback` (24) steps
    tail = frame.groupby("id").tail(32)
    test = TSDataset.from_pandas(tail, dt_col="ds", target_col="y", id_col="id")
    errors = []
    for _, group in tail.groupby("id"):
        values = group["y"].to_numpy()
        for end in range(ets.lookback - 1, len(values) - HORIZON):
            fitted = sf.AutoETS(season_length=12).forecast(y=values[: end + 1], h=HORIZON)
            errors.append(np.abs(values[end + 1 : end + 1 + HORIZON] - fitted["mean"]))
    scores = ets.evaluate(test, season=12)
    assert len(errors) == 6 and scores["mae"] == pytest.approx(np.mean(errors), rel=1e-6)

    with pytest.raises(ValueError, match="choose from"):
        StatsForecaster("Prophet", horizon=4)
    with pytest.raises(ValueError, match="season=0"):
        StatsForecaster("AutoETS", season=0, horizon=4)
    with pytest.raises(ValueError, match="onnx"):
        ets.predict(data, onnx=True)
    with pytest.raises(TypeError, match="no network to export"):
        ets.export_onnx(str(tmp_path / "ets.onnx"))
    with pytest.raises(ValueError, match="forecast 1 to 6 steps"):
        ets.predict(data, 7)
    with pytest.raises(ValueError, match="not trained"):
        StatsForecaster("AutoTheta", horizon=4).predict(data)
    short = TSDataset.from_pandas(
        frame.groupby("id").head(1), dt_col="ds", target_col="y", id_col="id"
    )
    with pytest.raises(ValueError, match="interval is unknown|could not forecast"):
        ets.predict(short)


def test_statistical_candidates_win_only_when_they_beat_seasonal_naive_clearly():
    check = {"networks": 0.5, "seasonal_naive": 1.0, "chosen": "networks"}
    rng = np.random.default_rng(0)
    naive = 1.0 + rng.normal(0, 0.01, 40)
    losses = pd.DataFrame(
        {
            "seasonal_naive": naive,
            "AutoETS": naive * 0.4,  # relative 0.4: better than the networks' 0.5
            "AutoTheta": naive * 0.995,  # better by 0.5% only: under the 1% margin
        }
    )
    chosen = with_statistical(check, losses, ["AutoETS", "AutoTheta"], 0.01)
    assert chosen["chosen"] == "AutoETS"
    assert chosen["passing"] == ["AutoETS", "networks"]  # what combine=True averages
    assert chosen["statistical"]["AutoETS"]["loss"] == pytest.approx(0.4 * naive.mean())
    assert chosen["statistical"]["AutoETS"]["windows"] == 40
    # the networks win when they do better relative to seasonal naive
    assert (
        with_statistical(check, losses.assign(AutoETS=naive * 0.6), ["AutoETS"], 0.01)["chosen"]
        == "networks"
    )
    # a model that could not fit some series is out of the running
    broken = losses.assign(AutoETS=np.where(np.arange(40) == 3, np.nan, naive * 0.1))
    result = with_statistical(check, broken, ["AutoETS", "AutoTheta"], 0.01)
    assert result["statistical"]["AutoETS"] is None and result["chosen"] == "networks"
    # nothing beats seasonal naive clearly: it is chosen
    lost = {**check, "chosen": "seasonal_naive"}
    nothing = with_statistical(lost, losses, ["AutoTheta"], 0.01)
    assert nothing["chosen"] == "seasonal_naive" and nothing["passing"] == []

    # a gain of 3% with a spread of 5%: clear over 40 independent windows, but not over two
    # series' 20 windows each that share 11 of their 12 steps
    noisy = losses.assign(AutoETS=naive * (0.97 + rng.normal(0, 0.05, 40)), id=[0, 1] * 20)
    assert with_statistical(lost, noisy, ["AutoETS"], 0.01)["passing"] == ["AutoETS"]
    overlapping = with_statistical(lost, noisy, ["AutoETS"], 0.01, horizon=12, id_col="id")
    assert overlapping["passing"] == []
    assert overlapping["statistical"]["AutoETS"]["effective_windows"] < 10


def _validation(frame: pd.DataFrame, spark=None):
    build = TSDataset.from_pandas if spark is None else TSDataset.from_spark
    data = frame if spark is None else spark.createDataFrame(frame)
    train, val, _ = build(
        data,
        dt_col="ds",
        target_col="y",
        id_col="id",
        with_split=True,
        val_ratio=0.15,
        test_ratio=0.1,
    )
    train.scale("standard")
    val.scale(train.scaler, fit=False)
    return train, val


@pytest.mark.slow
def test_validation_losses_score_every_validation_window_alike_on_pandas_and_spark(spark):
    frame = _two_series()
    train, val = _validation(frame)
    rolled = continued(train, val)
    losses = validation_losses(rolled, ["AutoETS", "AutoTheta"], 12, HORIZON, "mae")
    # one row per window a network is judged on (its inputs end at or after the last
    # training step): the same keys as the continued validation windows
    windows = rolled.windows(24, HORIZON)
    keys = ["id", "ds"]
    pd.testing.assert_frame_equal(
        losses[keys].sort_values(keys).reset_index(drop=True),
        windows[keys].sort_values(keys).reset_index(drop=True),
    )
    # seasonal naive's loss, recomputed here from the scaled values of one window
    scaled = pd.concat([train.to_pandas(), val.to_pandas()]).sort_values(keys)
    first = losses.sort_values(keys).iloc[0]
    values = scaled[scaled["id"] == first["id"]].set_index("ds")["y"]
    at = values.index.get_loc(first["ds"])
    repeat = values.iloc[at - 11 : at + 1].to_numpy()[:HORIZON]
    truth = values.iloc[at + 1 : at + 1 + HORIZON].to_numpy()
    assert first["seasonal_naive"] == pytest.approx(np.abs(truth - repeat).mean(), rel=1e-6)
    # and AutoETS's, fitted here on the unscaled steps up to the origin, scaled as the data is
    raw = frame[frame["id"] == first["id"]].set_index("ds")["y"]
    fitted = sf.AutoETS(season_length=12).forecast(y=raw.loc[: first["ds"]].to_numpy(), h=HORIZON)
    center, spread = (
        table.loc[first["id"], "y"] for table in (train.scaler.center, train.scaler.scale)
    )
    scaled_forecast = (fitted["mean"] - center) / spread
    assert first["AutoETS"] == pytest.approx(np.abs(truth - scaled_forecast).mean(), rel=1e-6)
    # a later window: the parameters estimated on the training steps, run over its past
    last = losses[losses["id"] == first["id"]].sort_values("ds").iloc[-1]
    trained = sf.AutoETS(season_length=12).fit(y=raw.loc[: first["ds"]].to_numpy())
    later = trained.forward(y=raw.loc[: last["ds"]].to_numpy(), h=HORIZON)["mean"]
    at = values.index.get_loc(last["ds"])
    truth = values.iloc[at + 1 : at + 1 + HORIZON].to_numpy()
    assert last["AutoETS"] == pytest.approx(np.abs(truth - (later - center) / spread).mean())

    on_spark = validation_losses(
        continued(*_validation(frame, spark)), ["AutoETS", "AutoTheta"], 12, HORIZON, "mae"
    )
    pd.testing.assert_frame_equal(
        on_spark.sort_values(keys).reset_index(drop=True),
        losses.sort_values(keys).reset_index(drop=True),
        check_dtype=False,
        rtol=1e-6,
    )


@pytest.mark.slow
def test_autots_forecasts_with_a_statistical_model_when_it_wins_validation(spark, tmp_path):
    """Networks that cannot learn (one epoch at lr 1e-6) against the default candidates, ETS,
    Theta and ARIMA, on two series with trends and seasons: the statistical models win, fitted
    on each series' history."""
    frame = _two_series()
    train, val = _validation(frame)
    auto = AutoTS(
        horizon=HORIZON,
        season=12,
        models=("dlinear",),
        lookback=(12,),
        lr=(1e-6, 1e-6),
        ensemble=1,
        refit=False,
        checkpoint_dir=str(tmp_path / "search"),
        seed=0,
    )
    pipeline = auto.fit(train, val, n_trials=1, epochs=1, batch_size=64)
    check = auto.validation_
    # the three statistical models beat seasonal naive clearly, the networks do not: the
    # pipeline forecasts the mean of the three (combine=True, the default), best first
    assert check["forecast"] == check["passing"] == ["AutoARIMA", "AutoTheta", "AutoETS"], check
    for name in check["forecast"]:
        entry = check["statistical"][name]
        assert entry["difference"] < -entry["standard_error"], check
    ratios = [check["statistical"][n]["loss"] / check["seasonal_naive"] for n in check["passing"]]
    assert ratios == sorted(ratios) and check["chosen"] == "AutoARIMA"
    assert auto.members_ == [] and isinstance(pipeline.forecaster, EnsembleForecaster)
    assert pipeline.config == {
        "model": "combination",
        "lookback": 24,
        "season": 12,
        "members": ["AutoARIMA", "AutoTheta", "AutoETS"],
    }

    # the real future: each model fitted on each series' whole (unscaled) history, averaged
    history = TSDataset.from_pandas(frame, dt_col="ds", target_col="y", id_col="id")
    future = pipeline.predict(history)
    direct = [_direct(frame, name, 12, HORIZON) for name in ("AutoARIMA", "AutoTheta", "AutoETS")]
    np.testing.assert_allclose(future["y"], np.mean(direct, axis=0), rtol=1e-6)
    loaded = TSPipeline.load(pipeline.save(str(tmp_path / "pipeline")))
    assert [m.model for m in loaded.forecaster.members] == ["AutoARIMA", "AutoTheta", "AutoETS"]
    pd.testing.assert_frame_equal(loaded.predict(history), future)
    # combine=False: the best alone
    auto.combine, auto.search_options["checkpoint_dir"] = False, str(tmp_path / "search-2")
    alone = auto.fit(train, val, n_trials=1, epochs=1, batch_size=64)
    assert auto.validation_["forecast"] == ["AutoARIMA"]
    assert isinstance(alone.forecaster, StatsForecaster) and alone.forecaster.model == "AutoARIMA"
    assert alone.config == {"model": "AutoARIMA", "lookback": 24, "season": 12}
    np.testing.assert_allclose(alone.predict(history)["y"], direct[0], rtol=1e-6)
    # Spark in, Spark out: each series forecast in its own task
    on_spark = TSDataset.from_spark(
        spark.createDataFrame(frame), dt_col="ds", target_col="y", id_col="id"
    )
    spark_future = pipeline.predict(on_spark).toPandas().sort_values(["id", "ds"])
    np.testing.assert_allclose(spark_future["y"], future["y"], rtol=1e-6)
    # evaluate fits every statistical member once per window: the last 4 years of each series
    recent = frame.groupby("id").tail(48)
    scores = pipeline.evaluate(
        TSDataset.from_pandas(recent, dt_col="ds", target_col="y", id_col="id"), season=12
    )
    spark_scores = pipeline.evaluate(
        TSDataset.from_spark(
            spark.createDataFrame(recent), dt_col="ds", target_col="y", id_col="id"
        ),
        season=12,
    )
    assert spark_scores == pytest.approx(scores, rel=1e-9) and scores["mase"] < 1.0

    with pytest.raises(ValueError, match="statistical="):
        AutoTS(horizon=4, statistical=("Prophet",)).fit(train, val, n_trials=1)
    assert AutoTS(horizon=4, statistical="AutoTheta").statistical == ("AutoTheta",)


def test_a_missing_statsforecast_is_named_before_any_search_or_job(monkeypatch, tmp_path):
    frame = _two_series()
    data = TSDataset.from_pandas(frame, dt_col="ds", target_col="y", id_col="id")
    ets = StatsForecaster("AutoETS", season=12, horizon=HORIZON)
    ets.fit(data)
    train, val = _validation(frame)
    monkeypatch.setitem(sys.modules, "statsforecast", None)  # import statsforecast fails
    with pytest.raises(ImportError, match=r"pip install 'deepspark\[timeseries\]'"):
        ets.predict(data)
    with pytest.raises(ImportError, match=r"statistical=\(\)"):
        AutoTS(horizon=HORIZON, checkpoint_dir=str(tmp_path)).fit(train, val, n_trials=1)
    assert not any(tmp_path.iterdir())  # no trial started
