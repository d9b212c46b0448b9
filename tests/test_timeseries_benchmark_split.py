"""The time-series benchmark's split: held-out test series never reach the development runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
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
    with pytest.raises(ValueError, match="not development sets"):
        timeseries_sets.development_sets(["hyndsight"])
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
            for values in development:
                # no held-out continuation appears anywhere in a development series
                windows = np.lib.stride_tricks.sliding_window_view(values, len(piece))
                assert not np.any(np.all(np.isclose(windows, piece), axis=1)), series.name


def test_the_held_out_sets_cover_new_domains_frequencies_level_shifts_and_cycles():
    test = {s.name: s for s in timeseries_sets.test_sets()}
    development = timeseries_sets.development_sets()
    assert {s.domain for s in test.values()}.isdisjoint({s.domain for s in development})
    new = {"daily", "per minute", "10-minute"}
    assert new.isdisjoint({s.frequency for s in development})
    assert {s.frequency for s in test.values()} == new | {"monthly", "quarterly", "yearly"}
    assert len(test) >= 16  # enough series for the 80% and 50% shares to mean something
    for series in test.values():  # the rule fixed before any run
        assert len(series.frame) >= 40 and not series.frame["y"].isna().any(), series.name
        assert series.season <= 24 and series.frame["ds"].is_monotonic_increasing, series.name
    # a level shift: the share price jumps by more than 10% in a day (July 2015's results)
    assert (test["goog"].frame["y"].pct_change() > 0.10).sum() >= 1
    # cycles that are not seasons: housing starts' yearly mean swings by over 20% (0.2 in
    # logs) one way, then the other, again and again
    assert swings(test["hstarts"].frame["y"].rolling(4).mean().dropna().to_numpy(), 0.2) >= 4


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
    for series in timeseries_sets.test_sets(["ukgas", "hyndsight"]):
        history = timeseries.history_of(series)
        assert len(history) == len(series.frame) - series.horizon
        assert history["ds"].max() < series.frame["ds"].iloc[-series.horizon]


def test_each_origin_forecasts_the_horizon_after_its_own_history():
    for series in timeseries_sets.test_sets(["ukgas", "guinearice"]):
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
