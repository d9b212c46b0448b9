"""Anomaly detectors of deepspark.timeseries on sktime's labelled Yahoo series (1,000 points,
7 labelled anomalies), in pandas and through real Spark jobs."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from deepspark.timeseries.anomaly import ThresholdDetector
from deepspark.timeseries.anomaly_models import AEDetector, ForecastResidualDetector
from deepspark.timeseries.networks import build_network


@pytest.fixture(scope="module")
def yahoo() -> pd.DataFrame:
    """sktime's labelled Yahoo Webscope series: columns ds (step), y, label."""
    import sktime

    path = os.path.join(os.path.dirname(sktime.__file__), "datasets", "data", "yahoo", "yahoo.csv")
    frame = pd.read_csv(path).rename(columns={"data": "y"})
    return frame.assign(ds=np.arange(len(frame)))[["ds", "y", "label"]]


def f1_score(found, frame: pd.DataFrame) -> float:
    truth = set(np.flatnonzero(frame["label"].to_numpy()))
    hits = len(truth & set(int(i) for i in found))
    if hits == 0:
        return 0.0
    precision, recall = hits / len(found), hits / len(truth)
    return 2 * precision * recall / (precision + recall)


def two_series(yahoo: pd.DataFrame) -> pd.DataFrame:
    """Yahoo as series "a", and as series "b" at another level and scale, rows shuffled."""
    first = yahoo.assign(id="a")
    second = yahoo.assign(id="b", y=yahoo["y"] * 0.01 + 50.0)
    both = pd.concat([first, second], ignore_index=True)
    return both.sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_threshold_bounds_flag_exactly_the_points_outside():
    frame = pd.DataFrame({"ds": range(6), "y": [1.0, 1.2, 9.0, 1.1, -5.0, 1.0]})
    scored = ThresholdDetector(min=0, max=5).score(frame)
    assert scored["anomaly"].tolist() == [False, False, True, False, True, False]
    assert scored["score"].tolist() == pytest.approx([0, 0, 4.0, 0, 5.0, 0])
    np.testing.assert_array_equal(ThresholdDetector(max=5).anomaly_indices(frame), [2])


def test_threshold_on_forecast_residuals_finds_the_labelled_spikes(yahoo):
    # The forecast is a centred rolling median: spikes stand far from it.
    frame = yahoo.assign(forecast=yahoo["y"].rolling(25, center=True, min_periods=1).median())
    detector = ThresholdDetector(ratio=0.007, forecast_col="forecast").fit(frame)
    assert f1_score(detector.anomaly_indices(frame), frame) >= 0.85


def test_autoencoder_finds_the_labelled_anomalies(yahoo):
    detector = AEDetector(window=16, sigmas=50.0, epochs=20).fit(yahoo)
    found = detector.anomaly_indices(yahoo)
    assert f1_score(found, yahoo) >= 0.9, found
    # The default rule flags 1% of each series: all 7 anomalies are among the 10 flagged. The
    # rule is applied when scoring and training does not read it (same seed, same windows), so
    # the trained detector is asked again under the default rule instead of trained twice.
    detector.sigmas = None
    default = detector.anomaly_indices(yahoo)
    assert len(default) == 10
    assert set(np.flatnonzero(yahoo["label"])) <= set(default)


class NetworkForecaster:
    """A minimal in-process forecaster over pandas frames, with the Forecaster's fit/predict."""

    def __init__(self, kind: str, *, lookback: int, horizon: int) -> None:
        self.lookback, self.horizon = lookback, horizon
        torch.manual_seed(0)
        self.network = build_network(kind, lookback=lookback, horizon=horizon)

    def fit(self, frame: pd.DataFrame, epochs: int = 30) -> None:
        values = frame.sort_values("ds")["y"].to_numpy(np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(values, self.lookback + self.horizon)
        x = torch.from_numpy(windows[:, : self.lookback, None].copy())
        y = torch.from_numpy(windows[:, self.lookback :, None].copy())
        optimizer = torch.optim.Adam(self.network.parameters(), lr=1e-2)
        for _ in range(epochs):
            optimizer.zero_grad()
            torch.nn.functional.l1_loss(self.network(x), y).backward()
            optimizer.step()
        self.network.eval()

    def predict(self, frame: pd.DataFrame, horizon: int) -> pd.DataFrame:
        parts = []
        for window_id, rows in frame.groupby("window_id"):
            x = torch.tensor(rows["y"].to_numpy(np.float32)[None, -self.lookback :, None])
            with torch.no_grad():
                forecast = self.network(x)[0, :horizon, 0].numpy()
            future = rows["ds"].iloc[-1] + 1 + np.arange(horizon)
            parts.append(pd.DataFrame({"window_id": window_id, "ds": future, "y": forecast}))
        return pd.concat(parts, ignore_index=True)


def test_forecast_residuals_find_the_labelled_anomalies(yahoo):
    forecaster = NetworkForecaster("dlinear", lookback=32, horizon=4)
    detector = ForecastResidualDetector(forecaster, sigmas=20.0).fit(yahoo)
    scored = detector.score(yahoo)
    assert scored["score"].iloc[:32].isna().all()  # no forecast before the first lookback
    labelled = scored["score"][yahoo["label"] == 1]
    assert labelled.min() > scored["score"][yahoo["label"] == 0].quantile(0.99)
    assert f1_score(detector.anomaly_indices(yahoo), yahoo) >= 0.9


def test_spark_scores_per_series_as_pandas_does(spark, yahoo):
    frame = two_series(yahoo)
    detector = ThresholdDetector(ratio=0.007, id_col="id")
    expected = detector.anomaly_indices(frame)
    scored = detector.anomaly_indices(spark.createDataFrame(frame))
    assert set(scored.columns) >= {"id", "ds", "y", "index", "score", "anomaly"}
    rows = scored.select("id", "index").toPandas()
    for series, positions in expected.items():
        got = np.sort(rows.loc[rows["id"] == series, "index"].to_numpy())
        np.testing.assert_array_equal(got, np.sort(positions))


@pytest.mark.slow
def test_autoencoder_trains_on_spark_workers_and_scores_each_series(spark, yahoo):
    frame = two_series(yahoo)
    detector = AEDetector(
        window=16, ratio=0.01, epochs=8, num_workers=2, id_col="id", batch_size=64
    )
    detector.fit(spark.createDataFrame(frame))
    found = detector.anomaly_indices(spark.createDataFrame(frame)).toPandas()
    labelled = set(np.flatnonzero(yahoo["label"]))
    for series in ("a", "b"):
        positions = set(found.loc[found["id"] == series, "index"])
        assert len(positions) == 10  # 1% of each series
        assert labelled <= positions, (series, sorted(positions))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ThresholdDetector(min=0, ratio=0.1), "either bounds"),
        (lambda: ThresholdDetector(min=3, max=1), "min=3 is above max=1"),
        (lambda: ThresholdDetector(ratio=0.1, sigmas=3), "give one rule"),
        (lambda: ThresholdDetector(ratio=1.5), "ratio=1.5"),
        (lambda: ThresholdDetector(max=1, target_col="value"), "target_col='value'"),
        (lambda: ThresholdDetector(ratio=0.1, forecast_col="yhat"), "'yhat' is not a column"),
        (lambda: AEDetector(window=1), "window=1"),
        (lambda: AEDetector(window=50), "no series has window=50"),
    ],
)
def test_bad_settings_are_refused_with_the_argument_named(make, message):
    frame = pd.DataFrame({"ds": range(20), "y": np.arange(20.0)})
    with pytest.raises(ValueError, match=message):
        make().fit(frame).score(frame)


def test_unfitted_and_unsuitable_inputs_are_refused(yahoo):
    with pytest.raises(RuntimeError, match="call fit"):
        AEDetector().score(yahoo)
    with pytest.raises(TypeError, match="has no 'fit'"):
        ForecastResidualDetector(object()).fit(yahoo)
    with pytest.raises(TypeError, match="give a pandas DataFrame"):
        ThresholdDetector(max=1).score(np.arange(5.0))


def planted_series() -> tuple[pd.DataFrame, dict[str, set[int]]]:
    """Four real series (statsmodels CO2, El Nino, sunspots; sktime Airline) as ids, monthly
    steps, each with five planted spikes of 8 robust deviations of its monthly changes."""
    import sktime
    import statsmodels.api as sm

    airline = os.path.join(
        os.path.dirname(sktime.__file__), "datasets", "data", "Airline", "Airline.csv"
    )
    values = {
        "co2": sm.datasets.co2.load_pandas().data["co2"].resample("MS").mean().interpolate(),
        "elnino": sm.datasets.elnino.load_pandas().data.drop(columns="YEAR").to_numpy().ravel(),
        "sunspots": sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"],
        "airline": pd.read_csv(airline).iloc[:, -1],
    }
    rng = np.random.default_rng(0)
    frames, planted = [], {}
    for name, series in values.items():
        y = np.asarray(series, dtype=np.float64).copy()
        changes = np.diff(y)
        spread = 1.4826 * np.median(np.abs(changes - np.median(changes)))
        positions = rng.choice(np.arange(40, len(y)), size=5, replace=False)
        y[positions] += rng.choice([-8.0, 8.0], size=5) * spread
        planted[name] = set(int(p) for p in positions)
        stamps = pd.date_range("1900-01", periods=len(y), freq="MS")
        frames.append(pd.DataFrame({"id": name, "ds": stamps, "y": y}))
    return pd.concat(frames, ignore_index=True), planted


@pytest.mark.slow
def test_forecast_residual_detector_with_a_spark_trained_forecaster(spark):
    from deepspark.timeseries import DLinearForecaster, TSDataset

    frame, planted = planted_series()
    data = TSDataset.from_spark(
        spark.createDataFrame(frame).repartition(2), dt_col="ds", target_col="y", id_col="id"
    )
    forecaster = DLinearForecaster(lookback=24, horizon=4, lr=1e-2, loss="mae")
    detector = ForecastResidualDetector(forecaster, sigmas=6.0)
    detector.fit(data, epochs=6, batch_size=64, num_workers=2, progress=False)
    assert forecaster.history is not None and len(forecaster.history) == 6

    found = detector.anomaly_indices(data)
    assert set(found.columns) >= {"id", "ds", "y", "index", "score", "anomaly"}
    rows = found.select("id", "index", "score").toPandas()
    hits = flagged = 0
    for name, positions in planted.items():
        got = set(rows.loc[rows["id"] == name, "index"])
        assert len(got & positions) >= 4, (name, sorted(got), sorted(positions))
        hits, flagged = hits + len(got & positions), flagged + len(got)
    truth = sum(len(p) for p in planted.values())
    assert hits / truth >= 0.9 and hits / flagged >= 0.6, (hits, flagged, truth)
    # every point after the first lookback of each series has a score
    scored = detector.score(data).toPandas()
    assert scored.groupby("id")["score"].apply(lambda s: s.iloc[24:].notna().all()).all()
    assert scored.groupby("id")["score"].apply(lambda s: s.iloc[:24].isna().all()).all()


def test_forecast_residual_detector_fits_the_dataframes_that_score_takes(spark):
    # Every detector's score takes a pandas or Spark DataFrame in long format; fit takes the
    # same frames (a deepspark forecaster gets them as a TSDataset of the detector's columns).
    from deepspark.timeseries import SeasonalNaiveForecaster

    frame, planted = planted_series()
    found = {}
    for kind, data in (("pandas", frame), ("spark", spark.createDataFrame(frame))):
        forecaster = SeasonalNaiveForecaster(season=12, horizon=4)
        detector = ForecastResidualDetector(forecaster, sigmas=6.0, id_col="id").fit(data)
        scored = detector.score(data)
        scored = scored if kind == "pandas" else scored.toPandas()
        found[kind] = scored.sort_values(["id", "index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(found["pandas"], found["spark"], check_dtype=False)
    scored = found["pandas"]
    assert scored.groupby("id")["score"].apply(lambda s: s.iloc[:12].isna().all()).all()
    flagged = scored[scored["anomaly"]]
    hits = sum(
        len(positions & set(flagged.loc[flagged["id"] == name, "index"]))
        for name, positions in planted.items()
    )
    assert hits / sum(len(p) for p in planted.values()) >= 0.75, flagged
