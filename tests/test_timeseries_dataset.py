"""TSDataset: cleaning, features, scaling, splitting and rolling, on pandas and on Spark.

The pandas tests pin each step's numbers; the Spark tests check that the same steps, run per
series inside Spark, give the same windows as pandas, and that bad input fails on the driver.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepspark.timeseries import TSDataset, TSScaler


def _series_frame(lengths=(40, 45, 50), seed=0) -> pd.DataFrame:
    """Hourly series of different lengths and levels, with an extra feature."""
    rng = np.random.default_rng(seed)
    frames = []
    for index, length in enumerate(lengths):
        steps = np.arange(length)
        frames.append(
            pd.DataFrame(
                {
                    "id": f"s{index}",
                    "dt": pd.date_range("2024-03-01", periods=length, freq="h"),
                    "load": 10.0 * (index + 1) + np.sin(steps / 3) + rng.normal(0, 0.1, length),
                    "temp": rng.normal(20, 5, length),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _dataset(frame: pd.DataFrame, **options) -> TSDataset:
    return TSDataset.from_pandas(
        frame, dt_col="dt", target_col="load", id_col="id", extra_feature_col="temp", **options
    )


# --- rolling and scaling: exact round trips --------------------------------------------------


def test_roll_windows_are_exact_slices_of_each_series():
    frame = _series_frame()
    x, y = _dataset(frame).roll(lookback=5, horizon=3).to_numpy()
    expected_x, expected_y = [], []
    for _, series in frame.groupby("id", sort=True):
        values = series[["load", "temp"]].to_numpy("float32")
        for start in range(len(series) - 5 - 3 + 1):
            expected_x.append(values[start : start + 5])
            expected_y.append(values[start + 5 : start + 8, :1])
    assert x.shape == (sum(n - 7 for n in (40, 45, 50)), 5, 2) and y.shape == (len(x), 3, 1)
    np.testing.assert_array_equal(x, np.stack(expected_x))
    np.testing.assert_array_equal(y, np.stack(expected_y))


def test_roll_with_horizon_zero_and_column_subset():
    data = _dataset(_series_frame())
    x, y = data.roll(lookback=4, horizon=0, feature_col=[]).to_numpy()
    assert y is None and x.shape == (sum(n - 3 for n in (40, 45, 50)), 4, 1)
    assert data.rolled_shapes == {"x": (4, 1), "y": (0, 1)}
    last, ids = data.get_last_window(4)
    assert list(ids) == ["s0", "s1", "s2"] and last.shape == (3, 4, 2)
    tail = _series_frame().groupby("id").tail(4)[["load", "temp"]].to_numpy("float32")
    np.testing.assert_array_equal(last.reshape(-1, 2), tail)


@pytest.mark.parametrize(("kind", "per_id"), [("standard", True), ("minmax", False)])
def test_scale_then_unscale_gives_back_the_data(kind, per_id):
    frame = _series_frame()
    data = _dataset(frame).scale(kind, per_id=per_id)
    scaled = data.to_pandas()
    assert not np.allclose(scaled["load"], frame["load"])
    if kind == "standard":  # each series has mean 0 and deviation 1
        stats = scaled.groupby("id")["load"].agg(["mean", lambda s: s.std(ddof=0)])
        np.testing.assert_allclose(stats.to_numpy(), [[0.0, 1.0]] * 3, atol=1e-12)
    else:
        assert scaled["load"].min() == pytest.approx(0.0) and scaled["load"].max() == 1.0
    restored = data.unscale().to_pandas()
    np.testing.assert_allclose(restored[["load", "temp"]], frame[["load", "temp"]], rtol=1e-13)


def test_rolled_scaled_windows_unscale_to_the_raw_windows():
    _, raw_y = _dataset(_series_frame()).roll(6, 2).to_numpy()
    data = _dataset(_series_frame()).scale("standard")
    frame = data.windows(6, 2)
    scaled_y = np.stack(frame["y"].to_numpy()).reshape(-1, 2, 1)
    restored = data.scaler.inverse_windows(scaled_y, frame["id"].to_numpy(), ["load"])
    np.testing.assert_allclose(restored, raw_y, rtol=1e-6)
    round_trip = TSScaler.from_dict(data.scaler.to_dict())
    np.testing.assert_array_equal(round_trip.center, data.scaler.center)


def test_validation_and_test_reuse_the_training_scaler():
    train, val, test = _dataset(_series_frame(), with_split=True, val_ratio=0.1, test_ratio=0.2)
    train.scale("standard")
    test.scale(train.scaler, fit=False)
    raw_test = _dataset(_series_frame(), with_split=True, val_ratio=0.1, test_ratio=0.2)[2]
    center = train.scaler.center.loc["s1", "load"]
    spread = train.scaler.scale.loc["s1", "load"]
    expected = (raw_test.to_pandas().query("id == 's1'")["load"] - center) / spread
    np.testing.assert_allclose(test.to_pandas().query("id == 's1'")["load"], expected)
    with pytest.raises(ValueError, match="fit=False"):
        val.scale("standard", fit=False)
    with pytest.raises(ValueError, match="scaled already"):
        test.scale(train.scaler, fit=False)


def test_split_is_in_time_order_per_series():
    frame = _series_frame(lengths=(40, 50))
    train, val, test = _dataset(frame, with_split=True, val_ratio=0.1, test_ratio=0.2)
    parts = [part.to_pandas() for part in (train, val, test)]
    for series_id, length in (("s0", 40), ("s1", 50)):
        sizes = [len(part.query(f"id == '{series_id}'")) for part in parts]
        assert sizes == [length - length // 10 - length // 5, length // 10, length // 5]
        ends = [part.query(f"id == '{series_id}'")["dt"] for part in parts]
        assert ends[0].max() < ends[1].min() and ends[1].max() < ends[2].min()
    with pytest.raises(ValueError, match="val_ratio"):
        _dataset(frame).split(val_ratio=0.5, test_ratio=0.5)


# --- cleaning and features -----------------------------------------------------------------


def _gappy() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "dt": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-05"]),
            "y": [np.nan, 2.0, np.nan, 8.0],
        }
    )


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("last", [2.0, 2.0, 2.0, 8.0]), ("const", [-1.0, 2.0, -1.0, 8.0]), ("linear", [2, 2, 4, 8])],
)
def test_impute_modes(mode, expected):
    data = TSDataset.from_pandas(_gappy(), dt_col="dt", target_col="y")
    filled = data.impute(mode, const_num=-1.0).to_pandas()["y"]
    np.testing.assert_allclose(filled, expected)


def test_deduplicate_resample_and_repair():
    frame = pd.DataFrame(
        {
            "dt": pd.to_datetime(
                ["2024-01-01 00:00", "2024-01-01 00:00", "2024-01-01 00:20", "2024-01-01 02:10"]
            ),
            "y": [1.0, 3.0, 5.0, 7.0],
        }
    )
    data = TSDataset.from_pandas(frame, dt_col="dt", target_col="y").deduplicate()
    np.testing.assert_allclose(data.to_pandas()["y"], [2.0, 5.0, 7.0])
    hourly = data.resample("h").to_pandas()
    assert list(hourly["dt"].dt.hour) == [0, 1, 2] and data.freq == "h"
    np.testing.assert_allclose(hourly["y"], [3.5, np.nan, 7.0])
    spiky = pd.DataFrame({"dt": pd.date_range("2024-01-01", periods=30, freq="D"), "y": 1.0})
    spiky.loc[::2, "y"] = 2.0
    spiky.loc[10, "y"] = 500.0
    repaired = TSDataset.from_pandas(spiky, dt_col="dt", target_col="y")
    repaired = repaired.repair_abnormal_data("last").to_pandas()["y"]
    assert repaired[10] == 1.0 and repaired.drop(10).equals(spiky["y"].drop(10))


def test_datetime_lag_and_rolling_features():
    frame = _series_frame(lengths=(30,))
    data = _dataset(frame).gen_dt_feature(["hour", "weekday"]).gen_lag_feature(2)
    data.gen_rolling_feature(3, ["mean", "max"])
    rows = data.to_pandas()
    assert data.feature_col == [
        "temp",
        "hour",
        "weekday",
        "load_lag1",
        "load_lag2",
        "load_roll3_mean",
        "load_roll3_max",
    ]
    # lags drop 2 rows, then the rolling window drops 2 more
    assert len(rows) == 26 and rows["dt"].iloc[0] == frame["dt"].iloc[4]
    np.testing.assert_array_equal(rows["hour"], frame["dt"].dt.hour.iloc[4:])
    np.testing.assert_allclose(rows["load_lag2"], frame["load"].iloc[2:28])
    np.testing.assert_allclose(rows["load_roll3_mean"], frame["load"].rolling(3).mean().iloc[4:])
    assert rows["load_roll3_max"].iloc[0] == frame["load"].iloc[2:5].max()


# --- bad input -------------------------------------------------------------------------------


def test_clear_errors_for_bad_input():
    frame = _series_frame()
    with pytest.raises(ValueError, match="dt_col='time' is not a column"):
        TSDataset.from_pandas(frame, dt_col="time", target_col="load")
    with pytest.raises(ValueError, match=r"columns \['load'\] are given more than one role"):
        TSDataset.from_pandas(frame, dt_col="dt", target_col="load", extra_feature_col="load")
    with pytest.raises(ValueError, match="target_col column 'id' has dtype object"):
        TSDataset.from_pandas(frame, dt_col="dt", target_col="id")
    with pytest.raises(ValueError, match="dt_col='load' does not hold timestamps|dt_col"):
        TSDataset.from_pandas(frame.assign(load="x"), dt_col="load", target_col="temp")
    with pytest.raises(ValueError, match="series 's0' has 40 rows, fewer than lookback"):
        _dataset(frame).roll(lookback=41, horizon=1)
    doubled = pd.concat([frame, frame.iloc[:1]])
    with pytest.raises(ValueError, match="several rows at .*deduplicate"):
        _dataset(doubled).roll(lookback=3, horizon=1)
    with pytest.raises(ValueError, match="impute"):
        _dataset(frame.assign(load=np.nan)).roll(lookback=3, horizon=1)
    with pytest.raises(ValueError, match="lookback must be an int >= 1"):
        _dataset(frame).roll(lookback=0, horizon=1)
    with pytest.raises(ValueError, match="impute.mode='nearest'"):
        _dataset(frame).impute("nearest")
    with pytest.raises(ValueError, match="call roll"):
        _dataset(frame).to_numpy()


# --- Spark -----------------------------------------------------------------------------------


def _messy_frame() -> pd.DataFrame:
    """Series with a repeated row, a missing hour and a missing value: every cleaning step."""
    frame = _series_frame(lengths=(36, 44, 52), seed=1)
    frame.loc[7, "load"] = np.nan
    frame = frame.drop(index=[20, 60])
    return pd.concat([frame, frame.iloc[[3]]], ignore_index=True).sample(frac=1, random_state=0)


def _prepare(data: TSDataset) -> TSDataset:
    return (
        data.deduplicate()
        .resample("h")
        .impute("linear")
        .gen_dt_feature(["hour"])
        .gen_lag_feature([1, 3])
        .scale("standard")
    )


def test_spark_and_pandas_give_identical_windows(spark):
    frame = _messy_frame()
    pandas_data = _prepare(_dataset(frame))
    spark_data = _prepare(
        TSDataset.from_spark(
            spark.createDataFrame(frame),
            dt_col="dt",
            target_col="load",
            id_col="id",
            extra_feature_col="temp",
        )
    )
    assert spark_data.is_spark and spark_data.feature_col == pandas_data.feature_col
    pandas_x, pandas_y = pandas_data.roll(8, 4).to_numpy()
    spark_x, spark_y = spark_data.roll(8, 4).to_numpy()
    assert pandas_x.shape == (sum(n - 3 - 11 for n in (36, 44, 52)), 8, 5)
    np.testing.assert_array_equal(spark_x, pandas_x)
    np.testing.assert_array_equal(spark_y, pandas_y)
    np.testing.assert_array_equal(spark_data.scaler.scale, pandas_data.scaler.scale)
    assert spark_data.freq == "h"
    rolled = spark_data.to_spark()
    assert rolled.columns == ["id", "dt", "x", "y"]


def test_spark_split_and_errors_on_the_driver(spark):
    frame = _series_frame(lengths=(20, 30))
    sdf = spark.createDataFrame(frame)
    parts = TSDataset.from_spark(
        sdf, dt_col="dt", target_col="load", id_col="id", with_split=True, test_ratio=0.25
    )
    expected = _dataset(frame, with_split=True, test_ratio=0.25)
    for spark_part, pandas_part in zip(parts, expected, strict=True):
        got = spark_part.to_pandas()
        pd.testing.assert_frame_equal(got, pandas_part.to_pandas()[got.columns])
    with pytest.raises(ValueError, match="series 's0' has 15 rows, fewer than lookback"):
        parts[0].roll(lookback=16, horizon=2)
    with pytest.raises(ValueError, match="target_col column 'id' has type string"):
        TSDataset.from_spark(sdf, dt_col="dt", target_col="id")
    with pytest.raises(ValueError, match="dt_col='load' has type double"):
        TSDataset.from_spark(sdf, dt_col="load", target_col="temp")
    with pytest.raises(ValueError, match="id_col='series' is not a column"):
        TSDataset.from_spark(sdf, dt_col="dt", target_col="load", id_col="series")
