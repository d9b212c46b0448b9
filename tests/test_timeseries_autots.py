"""AutoTS: a search over forecasters on the AutoML engine, returning a saved-and-loaded pipeline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import torch

from deepspark.timeseries import SeasonalNaiveForecaster, TSDataset
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


@pytest.mark.slow
def test_autots_finds_forecasters_and_its_pipeline_predicts_the_future(spark, tmp_path):
    train, val, test = _splits()
    auto = AutoTS(
        horizon=HORIZON,
        season=12,
        models=("dlinear", "nbeats"),
        lookback=(24, 36),
        ensemble=3,
        refit=2,  # each chosen config trained again twice, from seeds 0 and 1
        checkpoint_dir=str(tmp_path / "search"),
        max_concurrent=2,
        pruner="none",  # every trial completes: 3 to choose from
        statistical=(),  # networks only: ETS forecasts co2 well too (test_timeseries_statistical)
        seed=0,
    )
    pipeline = auto.fit(train, val, n_trials=4, epochs=8, batch_size=64)
    table = auto.trials
    assert len(table) == 4 and (table["state"] != "FAIL").all(), table
    assert set(table["param_model"]) <= {"dlinear", "nbeats"}
    assert set(table["param_seasonal"]) <= {True, False}
    best = auto.best_config
    assert best["model"] in ("dlinear", "nbeats") and best["lookback"] in (24, 36)
    # the pipeline forecasts with the best trial of each of the 3 best (kind, lookback)
    # pairs, best first (then the next best trials, when fewer pairs were tried)
    members = pipeline.forecaster.members
    assert len(members) == 6 and auto.members_[0]["config"] == best == pipeline.config
    assert [m.seed for m in members] == [0, 1] * 3
    assert auto.members_[0]["value"] == auto.search_.best_value
    firsts = {}
    for trial in auto.search_.top_trials(4):
        firsts.setdefault((trial["config"]["model"], trial["config"]["lookback"]), trial)
    expected = list(firsts.values())[:3]
    expected += [t for t in auto.search_.top_trials(4) if t not in expected][: 3 - len(expected)]
    assert [t["number"] for t in auto.members_] == [t["number"] for t in expected]
    per_trial = [t["config"]["lookback"] for t in auto.members_ for _ in range(2)]
    assert [m.lookback for m in members] == per_trial
    assert pipeline.lookback == max(member.lookback for member in members)
    # trials keep their best epoch's weights, so each is scored at that epoch
    from optuna.trial import TrialState

    for trial in auto.search_.study_.get_trials(states=(TrialState.COMPLETE,)):
        reported = trial.intermediate_values
        assert trial.value == min(reported.values())
        assert reported[trial.user_attrs["best_epoch"]] == trial.value
    # the trials beat seasonal naive on the validation windows by far: they are kept
    check = auto.validation_
    assert check["chosen"] == "networks", check
    assert check["networks"] < 0.8 * check["seasonal_naive"], check
    # each member was trained again on train + validation, for its trial's epochs, and
    # the two seeds of one config learnt different weights
    for index, trial in enumerate(auto.members_):
        first, second = members[2 * index : 2 * index + 2]
        assert len(first.history) == len(second.history) == trial["best_epoch"] + 1
        weights = second.model_.state_dict()
        assert any(not torch.equal(t, weights[n]) for n, t in first.model_.state_dict().items())

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
    # the mean of the members' forecasts, each from its own lookback
    each = [TSPipeline(m, pipeline.scaler, {}).predict(history)["y"] for m in members]
    np.testing.assert_allclose(future["y"], np.mean(each, axis=0), rtol=1e-5)
    # Spark data in: the ensemble scores on the executors, Spark out
    on_spark = TSDataset.from_spark(spark.createDataFrame(_co2()), dt_col="ds", target_col="y")
    spark_future = pipeline.predict(on_spark).toPandas()
    np.testing.assert_allclose(spark_future["y"], future["y"], rtol=1e-4)

    # co2 is never negative: the pipeline's floor is 0 ("auto"), kept by save and load
    assert pipeline.floor == 0.0 and "floor=0.0" in repr(pipeline)
    path = pipeline.save(str(tmp_path / "pipeline"))
    loaded = TSPipeline.load(path)
    assert loaded.config == pipeline.config and loaded.floor == 0.0
    pd.testing.assert_frame_equal(loaded.predict(history), future)


def test_autots_refuses_bad_settings_before_searching(spark, tmp_path):
    train, val, _ = _splits()
    cases = [
        (dict(models=("arima",)), "models="),
        (dict(lookback=(0,)), "lookback="),
        (dict(lr=(1e-2, 1e-3)), "lr="),
        (dict(sizes={"lstm": {"hidden_size": [8]}}, models=("dlinear",)), "'lstm' is not"),
        (dict(loss="hinge"), "hinge"),
        (dict(season=0), "season=0"),
        (dict(patience=-1), "patience=-1"),
        (dict(ensemble=0), "ensemble=0"),
        (dict(floor="high"), "floor='high'"),
        (dict(fallback=1.5), "fallback=1.5"),
        (dict(fallback=True), "fallback=True"),
        (dict(refit=-1), "refit=-1"),
        (dict(refit="yes"), "refit='yes'"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            AutoTS(horizon=HORIZON, checkpoint_dir=str(tmp_path), **options).fit(
                train, val, n_trials=1
            )
    with pytest.raises(ValueError, match="disagree: give it once"):
        AutoTS(horizon=HORIZON, checkpoint_dir=str(tmp_path), num_workers=1).fit(
            train, val, n_trials=1, num_workers=2
        )
    unscaled = TSDataset.from_pandas(_co2(), dt_col="ds", target_col="y")
    with pytest.raises(ValueError, match="scale train and validation_data alike"):
        AutoTS(horizon=HORIZON, checkpoint_dir=str(tmp_path)).fit(train, unscaled, n_trials=1)
    assert not (tmp_path / "trials").exists()


def test_validation_windows_read_inputs_from_training_and_labels_from_validation(spark):
    from deepspark.timeseries.validation_steps import continued

    stamps = pd.date_range("2000-01-01", periods=40, freq="D")
    frame = pd.concat(
        [
            pd.DataFrame({"id": "a", "ds": stamps, "y": np.arange(40.0)}),
            pd.DataFrame({"id": "b", "ds": stamps[:30], "y": 100.0 + np.arange(30.0)}),
        ]
    )
    for data in (
        TSDataset.from_pandas(frame, dt_col="ds", target_col="y", id_col="id"),
        TSDataset.from_spark(
            spark.createDataFrame(frame), dt_col="ds", target_col="y", id_col="id"
        ),
    ):
        train, val, _ = data.split(val_ratio=0.2, test_ratio=0.1)  # val: 8 and 6 steps
        rows = continued(train, val).windows(5, 3)
        rows = rows.toPandas() if data.is_spark else rows
        labels = {
            name: sorted(tuple(float(v) for v in y) for y in part["y"])
            for name, part in rows.groupby("id")
        }
        # every forecast lies wholly in validation: 8 - 3 + 1 and 6 - 3 + 1 windows
        assert labels["a"] == [(float(s), s + 1.0, s + 2.0) for s in range(28, 34)]
        assert labels["b"] == [(100.0 + s, 101.0 + s, 102.0 + s) for s in range(21, 25)]


@pytest.mark.slow
def test_ensemble_forecaster_averages_saves_loads_exports_and_refuses_mismatches(spark, tmp_path):
    from deepspark.timeseries import EnsembleForecaster, Forecaster

    train, val, test = _splits()
    short, long = (
        Forecaster("dlinear", lookback=lookback, horizon=HORIZON, seed=lookback)
        for lookback in (24, 36)
    )
    for member in (short, long):
        member.fit(train, epochs=3, batch_size=64, num_workers=1, progress=False)
    ensemble = EnsembleForecaster([short, long])
    assert ensemble.lookback == 36 and ensemble.horizon == HORIZON

    future = ensemble.predict(train)
    each = [member.predict(train)["y"] for member in (short, long)]
    np.testing.assert_allclose(future["y"], np.mean(each, axis=0), rtol=1e-5)
    scores = ensemble.evaluate(test)  # MASE against the members' training data
    assert np.isfinite(scores["mase"]) and scores["mase"] < 3, scores
    np.testing.assert_allclose(ensemble.predict(train, onnx=True)["y"], future["y"], rtol=1e-4)

    path = ensemble.save(str(tmp_path / "ensemble"))
    again = EnsembleForecaster.load(path)
    assert [m.lookback for m in again.members] == [24, 36]
    pd.testing.assert_frame_equal(again.predict(train), future)

    with pytest.raises(TypeError, match="non-empty list"):
        EnsembleForecaster([])
    with pytest.raises(ValueError, match="not trained"):
        EnsembleForecaster([short, Forecaster("dlinear", lookback=24, horizon=HORIZON)])
    other = Forecaster("dlinear", lookback=24, horizon=6)
    other.fit(train, epochs=1, batch_size=64, num_workers=1, progress=False)
    with pytest.raises(ValueError, match="different horizons"):
        EnsembleForecaster([short, other])
    with pytest.raises(TypeError, match="fit the members"):
        ensemble.fit(train)

    # refit=False: the ensemble's members are the trials' own saved models
    auto = AutoTS(
        horizon=HORIZON,
        lookback=(24,),
        models=("dlinear",),
        refit=False,
        ensemble=2,
        fallback=None,  # the trials' models, whatever seasonal naive scores
        checkpoint_dir=str(tmp_path / "search"),
        seed=0,
    )
    pipeline = auto.fit(train, val, n_trials=2, epochs=2, batch_size=64)
    first, second = pipeline.forecaster.members
    best = auto.search_.best_estimator.get_model().state_dict()
    for name, tensor in first.model_.state_dict().items():
        assert torch.equal(tensor, best[name]), name
    other = second.model_.state_dict()
    assert any(not torch.equal(t, other[n]) for n, t in first.model_.state_dict().items())
    history = TSDataset.from_pandas(_co2(), dt_col="ds", target_col="y")
    assert pipeline.predict(history)["y"].between(330, 390).all()


@pytest.mark.slow
def test_autots_sets_no_floor_for_data_with_negative_values(spark, tmp_path):
    below = _co2().assign(y=lambda frame: frame["y"] - 340.0)  # ppm above 340: some negative
    train, val, _ = TSDataset.from_pandas(
        below, dt_col="ds", target_col="y", with_split=True, val_ratio=0.1, test_ratio=0.1
    )
    train.scale("standard")
    val.scale(train.scaler, fit=False)
    assert train.target_min()["y"] == pytest.approx(below["y"].iloc[: len(train.to_pandas())].min())
    auto = AutoTS(
        horizon=HORIZON,
        lookback=(24,),
        models=("dlinear",),
        ensemble=1,
        checkpoint_dir=str(tmp_path),
        seed=0,
    )
    pipeline = auto.fit(train, val, n_trials=1, epochs=1, batch_size=64)
    assert pipeline.floor is None
    history = TSDataset.from_pandas(below, dt_col="ds", target_col="y")
    fixed = TSPipeline(pipeline.forecaster, pipeline.scaler, pipeline.config, floor=35.0)
    future = fixed.predict(history)["y"]
    np.testing.assert_allclose(future, np.maximum(pipeline.predict(history)["y"], 35.0))


@pytest.mark.slow
def test_autots_forecasts_seasonal_naive_when_the_trials_do_not_beat_it(spark, tmp_path):
    from sktime.datasets import load_airline

    series = load_airline()
    frame = pd.DataFrame({"ds": series.index.to_timestamp(), "y": series.to_numpy(float)})
    train, val, _ = TSDataset.from_pandas(
        frame, dt_col="ds", target_col="y", with_split=True, val_ratio=0.15, test_ratio=0.1
    )
    train.scale("standard")
    val.scale(train.scaler, fit=False)
    # Trials that cannot learn the yearly cycle: half a season of lookback, one epoch at a
    # learning rate of 1e-6. Repeating last year is far better on the validation windows.
    options = dict(
        horizon=HORIZON,
        season=12,
        models=("dlinear",),
        lookback=(6,),
        lr=(1e-6, 1e-6),
        ensemble=1,
        refit=True,  # once: the kept pipeline is one network
        statistical=(),  # networks only (ETS learns airline: tests/test_timeseries_statistical.py)
        seed=0,
    )
    auto = AutoTS(checkpoint_dir=str(tmp_path / "checked"), **options)
    pipeline = auto.fit(train, val, n_trials=2, epochs=1, batch_size=64)
    check = auto.validation_
    assert check["chosen"] == "seasonal_naive" and check["difference"] > 0, check
    assert check["windows"] == len(val.to_pandas()) - HORIZON + 1
    # windows one step apart share steps: the check counts fewer independent ones
    assert 1 <= check["effective_windows"] < check["windows"] / 2
    assert auto.members_ == [] and isinstance(pipeline.forecaster, SeasonalNaiveForecaster)
    assert pipeline.config == {"model": "seasonal_naive", "lookback": 12, "season": 12}

    # the real future repeats the last year of the history it is given, unscaled
    history = TSDataset.from_pandas(frame, dt_col="ds", target_col="y")
    future = pipeline.predict(history)
    # exactly: seasonal naive reads the unscaled data, so no scaling round trip blurs it
    np.testing.assert_array_equal(future["y"], frame["y"].iloc[-HORIZON:])
    loaded = TSPipeline.load(pipeline.save(str(tmp_path / "pipeline")))
    assert isinstance(loaded.forecaster, SeasonalNaiveForecaster)
    pd.testing.assert_frame_equal(loaded.predict(history), future)

    # fallback=None: the same search keeps its (untrained) network unchecked
    kept = AutoTS(checkpoint_dir=str(tmp_path / "unchecked"), fallback=None, **options)
    unchecked = kept.fit(train, val, n_trials=2, epochs=1, batch_size=64)
    assert kept.validation_ is None and unchecked.forecaster.kind == "dlinear"
    assert np.abs(unchecked.predict(history)["y"] - future["y"]).max() > 1.0


@pytest.mark.slow  # two searches of four trials on Spark
def test_a_seeded_autots_repeats_its_pipeline_and_forecast_with_trials_at_once(spark, tmp_path):
    """Two trials train at once, so they finish in either order; with a seed the search still
    draws the same configs, prunes the same trials and forecasts the same values, exactly."""
    from deepspark.automl.rounds import Rounds

    train, val, _ = _splits()
    history = TSDataset.from_pandas(_co2(), dt_col="ds", target_col="y")
    runs = []
    for run in range(2):
        auto = AutoTS(
            horizon=HORIZON,
            season=12,
            models=("dlinear", "nbeats"),
            lookback=(12, 24),
            ensemble=2,
            refit=1,
            max_concurrent=2,
            checkpoint_dir=str(tmp_path / f"run-{run}"),
            seed=3,
        )
        pipeline = auto.fit(train, val, n_trials=4, epochs=3, batch_size=64)
        trials = auto.trials.sort_values("number")
        runs.append((trials, auto.members_, pipeline.predict(history)["y"].to_numpy()))
    (first_trials, first_members, first_forecast), (trials, members, forecast) = runs
    assert list(trials["state"]) == list(first_trials["state"])
    complete = (trials["state"] == "COMPLETE").to_numpy()
    assert complete.any()
    # every trial's value, pruned ones too, exactly: the streamed first epoch's windows follow
    # a fixed schedule, not the moments its rows arrived at (they once drifted in the 5th digit)
    np.testing.assert_array_equal(
        trials["value"].to_numpy(dtype=float), first_trials["value"].to_numpy(dtype=float)
    )
    assert [m["config"] for m in members] == [m["config"] for m in first_members]
    np.testing.assert_array_equal(forecast, first_forecast)
    # the two trials of a round trained at the same time
    study_trials = sorted(auto.search_.study_.get_trials(deepcopy=False), key=lambda t: t.number)
    starts = [t.datetime_start for t in study_trials]
    ends = [t.datetime_complete for t in study_trials]
    assert starts[1] < ends[0] and starts[0] < ends[1], (starts, ends)
    # and a round's trials see none of each other: round starts are 0 and 2
    rounds = Rounds(first=0, size=2, total=4, timeout_s=None)
    assert [rounds.round_start(n) for n in range(4)] == [0, 0, 2, 2]
