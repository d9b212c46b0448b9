"""The seasonal-naive forecaster and the per-window comparison AutoTS's fallback rests on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sktime.datasets import load_airline

from deepspark.timeseries import Forecaster, SeasonalNaiveForecaster, TSDataset
from deepspark.timeseries.baseline import naive_comparison
from deepspark.timeseries.forecast_metrics import overlapping_standard_error
from deepspark.timeseries.forecast_model import FlatWindowModel
from deepspark.timeseries.networks import build_network


def _airline() -> pd.DataFrame:
    series = load_airline()
    return pd.DataFrame({"ds": series.index.to_timestamp(), "y": series.to_numpy(float)})


@pytest.mark.slow
def test_seasonal_naive_repeats_the_last_season_on_pandas_and_spark_saves_and_exports(
    spark, tmp_path
):
    frame = _airline()
    train, _, test = TSDataset.from_pandas(
        frame, dt_col="ds", target_col="y", with_split=True, test_ratio=0.3
    )
    train.scale("standard")
    test.scale(train.scaler, fit=False)
    naive = SeasonalNaiveForecaster(season=12, horizon=18)
    assert repr(naive) == "SeasonalNaiveForecaster(season=12, horizon=18)"
    assert naive.fit(train).empty  # nothing to train

    # the real future, unscaled: months 1-12 repeat the last year, 13-18 its first half again
    last_year = train.to_pandas()["y"].to_numpy()[-12:]
    last_year = train.scaler.inverse_windows(last_year[None, :, None], np.zeros(1), ["y"])
    future = naive.predict(train)
    np.testing.assert_allclose(future["y"], np.resize(last_year.ravel(), 18), rtol=1e-5)
    assert future["ds"].iloc[0] == frame["ds"].iloc[len(train.to_pandas())]

    # every test window scored against its own seasonal-naive forecast, computed here
    values = frame["y"].to_numpy()[-len(test.to_pandas()) :]
    errors = [
        np.abs(values[start + 12 : start + 30] - np.resize(values[start : start + 12], 18))
        for start in range(len(values) - 12 - 18 + 1)
    ]
    scores = naive.evaluate(test, season=12)
    assert scores["mae"] == pytest.approx(np.mean(errors), rel=1e-5)

    # Spark in, Spark out; the saved and the exported model forecast the same
    on_spark = TSDataset.from_spark(spark.createDataFrame(frame), dt_col="ds", target_col="y")
    on_pandas = TSDataset.from_pandas(frame, dt_col="ds", target_col="y")
    expected = naive.predict(on_pandas)
    np.testing.assert_allclose(naive.predict(on_spark).toPandas()["y"], expected["y"], rtol=1e-6)
    loaded = Forecaster.load(naive.save(str(tmp_path / "naive")))
    assert isinstance(loaded, SeasonalNaiveForecaster) and loaded.season == 12
    pd.testing.assert_frame_equal(loaded.predict(on_pandas), expected)
    onnx_path = loaded.export_onnx(str(tmp_path / "naive.onnx"))
    np.testing.assert_allclose(
        loaded.predict(on_pandas, onnx=onnx_path)["y"], expected["y"], rtol=1e-6
    )

    with pytest.raises(ValueError, match="season must be a positive int"):
        SeasonalNaiveForecaster(season=0, horizon=4)
    with pytest.raises(ValueError, match="lookback=6 is shorter than season=12"):
        SeasonalNaiveForecaster(season=12, horizon=4, lookback=6)
    with pytest.raises(ValueError, match="not trained"):
        SeasonalNaiveForecaster(season=12, horizon=4).predict(train)


def _windows(values: np.ndarray, lookback: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    count = len(values) - lookback - horizon + 1
    x = np.stack([values[i : i + lookback] for i in range(count)]).astype("float32")
    y = np.stack([values[i + lookback : i + lookback + horizon] for i in range(count)])
    return x, y.astype("float32")


@pytest.mark.slow
def test_naive_comparison_takes_per_window_loss_differences_on_pandas_and_spark(spark):
    values = _airline()["y"].to_numpy()
    values = (values - values.mean()) / values.std()
    lookback, horizon, season = 24, 12, 12
    x, y = _windows(values, lookback, horizon)
    torch.manual_seed(0)
    network = build_network("dlinear", lookback=lookback, horizon=horizon)
    networks = FlatWindowModel(network, lookback, 1, horizon, 1)
    naive = SeasonalNaiveForecaster(season=season, horizon=horizon)
    cols = TSDataset.from_pandas(_airline(), dt_col="ds", target_col="y").columns
    naive_model = naive.build_model(cols)

    # computed here: the network reads the whole window, the naive one its last season
    with torch.no_grad():
        forecasts = networks(torch.from_numpy(x)).numpy()
    repeated = x[:, lookback - season + np.arange(horizon) % season]
    gaps = np.abs(forecasts - y).mean(1) - np.abs(repeated - y).mean(1)

    rows = {"x": x, "y": y}
    result = naive_comparison(networks, naive_model, rows, "mae")
    assert result["windows"] == len(x)
    assert result["networks"] == pytest.approx(np.abs(forecasts - y).mean(), rel=1e-5)
    assert result["seasonal_naive"] == pytest.approx(np.abs(repeated - y).mean(), rel=1e-5)
    assert result["difference"] == pytest.approx(gaps.mean(), rel=1e-5)
    expected_se = gaps.std(ddof=1) / np.sqrt(len(gaps))
    assert result["standard_error"] == pytest.approx(expected_se, rel=1e-4)
    # an untrained network loses to seasonal naive on airline passengers
    assert result["difference"] > result["standard_error"] > 0

    # the same windows in Spark: each partition sums, one row comes back
    frame = spark.createDataFrame(
        pd.DataFrame({"x": list(x.astype("float64")), "y": list(y.astype("float64"))})
    ).repartition(3)
    on_spark = naive_comparison(networks, naive_model, frame, "mae")
    for name, value in result.items():
        assert on_spark[name] == pytest.approx(value, rel=1e-4), name

    # the naive forecast against itself: no difference at all
    with pytest.raises(ValueError, match="windows of 24 steps"):
        naive_comparison(naive_model, naive_model, rows, "mse")
    same = naive_comparison(naive_model, naive_model, {"x": x[:, season:], "y": y}, "mse")
    assert same["difference"] == 0.0 and same["standard_error"] == 0.0

    # the windows start one step apart: told so, the error widens and counts fewer windows
    told = naive_comparison(networks, naive_model, rows, "mae", horizon=horizon, counts=[len(x)])
    assert told["standard_error"] > 2 * result["standard_error"]
    assert told["effective_windows"] < len(x) / 4 and result["effective_windows"] == len(x)
    with pytest.raises(ValueError, match="counts add up to 5 windows"):
        naive_comparison(networks, naive_model, rows, "mae", horizon=horizon, counts=[5])
    with pytest.raises(ValueError, match="no validation windows"):
        naive_comparison(networks, naive_model, {"x": x[:0], "y": y[:0]}, "mae")


def _overlapping_means(rng, steps: int, horizon: int) -> np.ndarray:
    """The mean of every `horizon`-step window (one step apart) over independent steps."""
    noise = rng.normal(size=steps)
    return np.lib.stride_tricks.sliding_window_view(noise, horizon).mean(axis=1)


def test_the_overlapping_standard_error_matches_the_spread_of_the_mean_it_describes():
    rng = np.random.default_rng(0)
    plain = rng.normal(size=30)
    squares = float(((plain - plain.mean()) ** 2).sum())
    error, effective = overlapping_standard_error(squares, [30], 1)
    assert error == pytest.approx(plain.std(ddof=1) / np.sqrt(30)) and effective == 30

    # two series of overlapping 8-step windows (12 and 30 of them), drawn 4,000 times: the
    # mean of the squared errors matches the variance of the windows' mean; the textbook
    # formula, which takes the windows as independent, is several times too small
    horizon, counts = 8, [12, 30]
    means, told, naive = [], [], []
    for _ in range(4000):
        gaps = np.concatenate([_overlapping_means(rng, n + horizon - 1, horizon) for n in counts])
        squares = float(((gaps - gaps.mean()) ** 2).sum())
        means.append(gaps.mean())
        told.append(overlapping_standard_error(squares, counts, horizon)[0] ** 2)
        naive.append(overlapping_standard_error(squares, [sum(counts)], 1)[0] ** 2)
    spread = np.var(means)
    assert 0.9 < np.mean(told) / spread < 1.1
    assert np.mean(naive) / spread < 0.3
    assert overlapping_standard_error(1.0, counts, horizon)[1] < sum(counts) / 4

    # one window, or two that share 9 of 10 steps, cannot show a spread: no check passes
    assert overlapping_standard_error(0.0, [1], 1)[0] == float("inf")
    assert overlapping_standard_error(0.5, [2], 10)[0] > 0.5
    with pytest.raises(ValueError, match="no windows"):
        overlapping_standard_error(0.0, [], 4)
