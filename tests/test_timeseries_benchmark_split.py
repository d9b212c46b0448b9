"""The time-series benchmark's split: held-out test series never reach the development runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import timeseries
import timeseries_anomaly
import timeseries_sets


def test_development_and_test_series_are_disjoint_and_the_dev_run_reads_only_dev_sets():
    development = {s.name for s in timeseries.sets_for("dev")}
    held_out = {s.name for s in timeseries.sets_for("test")}
    assert development == set(timeseries_sets.DEVELOPMENT)
    assert held_out == set(timeseries_sets.TEST)
    assert not development & held_out
    # the third held-out set, read once, is development data now
    assert {"hyndsight", "ukgas", "wwwusage"} <= development and len(development) == 50
    with pytest.raises(ValueError, match="not development sets"):
        timeseries_sets.development_sets(["coffee"])
    with pytest.raises(ValueError, match="'dev' or 'test'"):
        timeseries.sets_for("all")


def test_no_test_series_is_a_copy_or_a_piece_of_a_development_series():
    development = [s.frame["y"].to_numpy() for s in timeseries_sets.development_sets()]
    for series in timeseries_sets.test_sets():
        for history, holdout in timeseries.origins_of(series, timeseries.ORIGINS):
            # the holdout with the horizon before it: short runs of small counts (inventions
            # per year) recur by chance in other count series, a copied piece would not
            piece = np.concatenate([history["y"].to_numpy()[-len(holdout) :], holdout])
            if np.ptp(piece) == 0:
                continue  # a run of one value identifies no source
            for values in (v for v in development if len(v) >= len(piece)):
                # no held-out continuation appears anywhere in a development series
                windows = np.lib.stride_tricks.sliding_window_view(values, len(piece))
                assert not np.any(np.all(np.isclose(windows, piece), axis=1)), series.name


def test_the_held_out_sets_cover_new_domains_frequencies_level_shifts_and_cycles():
    test = {s.name: s for s in timeseries_sets.test_sets()}
    development = timeseries_sets.development_sets()
    assert {s.domain for s in test.values()}.isdisjoint({s.domain for s in development})
    new = {"hourly", "weekly"}
    assert new.isdisjoint({s.frequency for s in development})
    assert {s.frequency for s in test.values()} == new | {"daily", "monthly", "quarterly", "yearly"}
    assert len(test) >= 13  # what the rule left: every candidate it admitted is in
    for series in test.values():  # the rule fixed before any run
        frame = series.frame
        assert 40 <= len(frame) <= 500 and not frame["y"].isna().any(), series.name
        assert series.season <= 24 and frame["ds"].is_monotonic_increasing, series.name
        assert pd.infer_freq(frame["ds"]) is not None, series.name  # regular: no step missing
    # an hour apart, every one of the last 500 hours of 2013 at the airport
    humidity = test["jfk_humidity"].frame["ds"]
    assert (humidity.diff().dropna() == pd.Timedelta(hours=1)).all()
    # level shifts: arabica prices jump by more than 10% in a month, again and again
    coffee = test["coffee"].frame
    jumps = coffee["ds"][coffee["y"].pct_change() > 0.10].dt.year
    assert {1994, 1997} <= set(jumps) and len(jumps) >= 20
    # cycles that are not seasons: the US savings rate's yearly mean swings by 2 points one
    # way, then the other, again and again
    savings = test["us_savings"].frame["y"].rolling(12).mean().dropna().to_numpy()
    assert swings(savings, 2.0) >= 4


def swings(values: np.ndarray, size: float) -> int:
    """How many times `values` move by at least `size` against their previous move."""
    count, direction, anchor = 0, 0, values[0]
    for value in values[1:]:
        if direction >= 0 and value <= anchor - size:
            count, direction, anchor = count + 1, -1, value
        elif direction <= 0 and value >= anchor + size:
            count, direction, anchor = count + 1, 1, value
        elif (value - anchor) * direction > 0:
            anchor = value  # the move goes on: measure the next turn from its extreme
    return count


def test_a_model_is_given_the_history_only():
    for series in timeseries_sets.test_sets(["gasoline", "jfk_humidity"]):
        history = timeseries.history_of(series)
        assert len(history) == len(series.frame) - series.horizon
        assert history["ds"].max() < series.frame["ds"].iloc[-series.horizon]


def test_each_origin_forecasts_the_horizon_after_its_own_history():
    for series in timeseries_sets.test_sets(["residual_oil", "aus_rain"]):
        pairs = timeseries.origins_of(series, 3)
        values, horizon = series.frame["y"].to_numpy(), series.horizon
        assert len(pairs) == 3
        for k, (history, holdout) in enumerate(pairs, start=1):
            # the k-th horizon from the end, after every step of its history and nothing else
            end = len(values) - k * horizon
            assert len(history) == end and len(holdout) == horizon
            np.testing.assert_array_equal(holdout, values[end : end + horizon])
            assert history["ds"].max() < series.frame["ds"].iloc[end]
        assert pairs[0][0].equals(timeseries.history_of(series))
    # a short series keeps the origins whose history is long enough (four horizons here)
    shampoo = timeseries_sets.development_sets(["shampoo"])[0]  # 36 months, horizon 6
    assert [len(h) for h, _ in timeseries.origins_of(shampoo, 3)] == [30, 24]


def test_the_fertility_countries_follow_the_rule_fixed_before_any_run():
    assert list(timeseries_sets.FERTILITY_CODES) == timeseries_sets.fertility_countries()
    for series in timeseries_sets.development_sets([f"fertility_{c}" for c in ("ABW", "TJK")]):
        assert len(series.frame) == 52 and not series.frame["y"].isna().any()


def test_lookbacks_follow_the_frozen_rule():
    # 1-3 periods leaving at least 16 training windows; the shortest alone when none does
    assert timeseries.autots_lookbacks(train_rows=100, horizon=12, season=12) == [12, 24, 36]
    assert timeseries.autots_lookbacks(train_rows=60, horizon=10, season=1) == [10, 20, 30]
    assert timeseries.autots_lookbacks(train_rows=23, horizon=6, season=1) == [6]


def test_the_nab_held_out_anomaly_series_load_with_their_windows_as_labels():
    sets = timeseries_sets.anomaly_test_sets()
    with open(Path(timeseries_sets.NAB_DIR) / "windows.json") as file:
        windows = json.load(file)
    assert sorted(sets) == sorted(name.removesuffix(".csv") for name in windows)
    assert sum(len(spans) for spans in windows.values()) == 19  # events enough to rank
    for name, frame in sets.items():
        labels = frame["label"].to_numpy()
        # each labelled run of points is one window or more (windows may meet)
        starts = np.flatnonzero(np.diff(np.concatenate([[0], labels])) == 1)
        assert 1 <= len(starts) <= len(windows[f"{name}.csv"]), name
        assert 0.05 < labels.mean() < 0.15, name  # NAB's windows span about 10% of a series
        assert frame["ds"].is_monotonic_increasing and not frame["y"].isna().any(), name
    with pytest.raises(ValueError, match="one class"):
        timeseries_anomaly.ranking(np.arange(4.0), np.zeros(4, dtype=int))
