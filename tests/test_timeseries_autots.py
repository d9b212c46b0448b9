"""AutoTS: a search over forecasters on the AutoML engine, returning a saved-and-loaded pipeline."""

from __future__ import annotations

import pandas as pd
import pytest
import statsmodels.api as sm

from deepspark.timeseries import TSDataset
from deepspark.timeseries.autots import AutoTS, TSPipeline

HORIZON = 12


def _co2() -> pd.DataFrame:
    monthly = sm.datasets.co2.load_pandas().data.resample("MS").mean().interpolate()
    return monthly.reset_index().rename(columns={"index": "ds", "co2": "y"})


def _splits():
    train, val, test = TSDataset.from_pandas(
        _co2(), dt_col="ds", target_col="y", with_split=True, val_ratio=0.1, test_ratio=0.1
    )
    train.scale("standard")
    val.scale(train.scaler, fit=False)
    return train, val, test


def test_autots_finds_a_forecaster_and_its_pipeline_predicts_the_future(spark, tmp_path):
    train, val, test = _splits()
    auto = AutoTS(
        horizon=HORIZON,
        models=("dlinear", "nbeats"),
        lookback=(24, 36),
        directory=str(tmp_path / "search"),
        max_concurrent=2,
        seed=0,
    )
    pipeline = auto.fit(train, val, n_trials=4, epochs=8, batch_size=64)
    table = auto.trials
    assert len(table) == 4 and (table["state"] != "FAIL").all(), table
    assert set(table["param_model"]) <= {"dlinear", "nbeats"}
    best = auto.best_config
    assert best["model"] in ("dlinear", "nbeats") and best["lookback"] in (24, 36)
    assert pipeline.lookback == best["lookback"]

    # the test split, given unscaled: the pipeline scales it with the training scaler
    scores = pipeline.evaluate(test, train=train)
    assert test.scaler is None  # left as it was given
    assert scores["mase"] < 0.6, scores  # 12 months ahead, against one-step in-sample naive

    history = TSDataset.from_pandas(_co2(), dt_col="ds", target_col="y")
    future = pipeline.predict(history)
    last = _co2()["ds"].max()
    expected = pd.date_range(last, periods=HORIZON + 1, freq="MS")[1:]
    assert list(future["ds"]) == list(expected)
    assert future["y"].between(360, 380).all(), future  # ppm, near the series' end

    path = pipeline.save(str(tmp_path / "pipeline"))
    loaded = TSPipeline.load(path)
    assert loaded.config == pipeline.config
    pd.testing.assert_frame_equal(loaded.predict(history), future)


def test_autots_refuses_bad_settings_before_searching(spark, tmp_path):
    train, val, _ = _splits()
    cases = [
        (dict(models=("arima",)), "models="),
        (dict(lookback=(0,)), "lookback="),
        (dict(lr=(1e-2, 1e-3)), "lr="),
        (dict(sizes={"lstm": {"hidden_size": [8]}}, models=("dlinear",)), "'lstm' is not"),
        (dict(loss="hinge"), "hinge"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            AutoTS(horizon=HORIZON, directory=str(tmp_path), **options).fit(train, val, n_trials=1)
    unscaled = TSDataset.from_pandas(_co2(), dt_col="ds", target_col="y")
    with pytest.raises(ValueError, match="scale train and validation_data alike"):
        AutoTS(horizon=HORIZON, directory=str(tmp_path)).fit(train, unscaled, n_trials=1)
    assert not (tmp_path / "trials").exists()
