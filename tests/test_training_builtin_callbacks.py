"""EarlyStopping, ModelCheckpoint and CSVLogger: their rules on hand-made records, then real
distributed fits on digits (2 ranks, retries included)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest
import torch

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import DigitsNet, digits_frames
from deepspark.persist.weights import load_model_weights
from deepspark.training.callbacks import (
    Callback,
    CallbackState,
    CSVLogger,
    EarlyStopping,
    ModelCheckpoint,
    call_driver_hook,
    call_worker_hook,
)

# Spark's Python workers cannot import the tests folder: ship these modules by value.
cloudpickle.register_pickle_by_value(helpers)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BATCH, LR = 64, 3e-3
FIT = {"feature_cols": "features", "label_cols": "label", "batch_size": BATCH, "num_workers": 2}


# --- the rules, on hand-made records ----------------------------------------------------------


def replay(callbacks, records, *, start: int = 0, model=None) -> list[int]:
    """Run the worker hooks over `records` (one per epoch) on a pickled copy, as rank 0 of a
    fit starting at epoch `start` does; returns the epochs trained."""
    copies = cloudpickle.loads(cloudpickle.dumps(callbacks))
    call_worker_hook(copies, "on_train_begin", CallbackState(start, 0, 0, 2, {}, model))
    done = []
    for record in records:
        state = CallbackState(record["epoch"], 5, 0, 2, dict(record), model)
        call_worker_hook(copies, "on_epoch_end", state)
        done.append(record["epoch"])
        if state.stop_training:
            break
    return done


def records(name: str, values, first_epoch: int = 0) -> list[dict]:
    return [
        {"epoch": first_epoch + index, "train_loss": 1.0, name: value}
        for index, value in enumerate(values)
    ]


def test_early_stopping_rules_patience_mode_min_delta_and_baseline():
    losses = [1.0, 0.8, 0.85, 0.9, 0.7]
    assert replay([EarlyStopping(patience=2)], records("val_loss", losses)) == [0, 1, 2, 3]
    assert replay([EarlyStopping(patience=0)], records("val_loss", losses)) == [0, 1, 2]
    # "auto" maximises accuracy-like names, and minimises the rest
    rising = [0.5, 0.6, 0.7, 0.65]
    for name, trained in [
        ("val_accuracy", [0, 1, 2, 3]),
        ("val_f1", [0, 1, 2, 3]),
        ("val_r2", [0, 1, 2, 3]),
        ("val_mse", [0, 1]),
    ]:
        assert replay([EarlyStopping(name)], records(name, rising)) == trained, name
    minimised = EarlyStopping("val_accuracy", mode="min")
    assert replay([minimised], records("val_accuracy", rising)) == [0, 1]
    # improvements of min_delta or less do not count
    small_steps = records("val_loss", [1.0, 0.95, 0.91, 0.5])
    assert replay([EarlyStopping(patience=1, min_delta=0.1)], small_steps) == [0, 1]
    # epochs that do not beat the baseline count as not improving
    with_baseline = EarlyStopping(patience=2, baseline=0.5)
    assert replay([with_baseline], records("val_loss", losses)) == [0, 1]
    with pytest.raises(ValueError, match="mode="):
        EarlyStopping(mode="best")
    with pytest.raises(ValueError, match="patience="):
        EarlyStopping(patience=-1)


def test_a_missing_monitor_names_the_record_keys():
    with pytest.raises(ValueError, match=r"'val_loss'.*\['epoch', 'train_loss'\].*validation_data"):
        replay([EarlyStopping()], [{"epoch": 0, "train_loss": 1.0}])
    with pytest.raises(ValueError, match=r"'val_auc'.*\['epoch', 'train_loss', 'val_loss'\]"):
        replay([ModelCheckpoint("memory://missing", monitor="val_auc")], records("val_loss", [1]))


def test_csv_logger_columns_append_and_resume(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch;old\n9;1\n")
    logger = CSVLogger(str(path), separator=";")
    first = records("val_loss", [0.9, 0.8, 0.7])
    first[1]["val_accuracy"] = 0.5  # a key that appears later becomes a new column
    first[2]["note"] = "text"  # not a number: left out
    replay([logger], first)
    assert path.read_text() == (
        "epoch;train_loss;val_loss;val_accuracy\n0;1.0;0.9;\n1;1.0;0.8;0.5\n2;1.0;0.7;\n"
    )
    # a resume at epoch 2 drops the row of epoch 2 (trained again) and keeps the rest
    replay([logger], records("val_loss", [0.6, 0.5], first_epoch=2), start=2)
    table = pd.read_csv(path, sep=";")
    assert table["epoch"].tolist() == [0, 1, 2, 3]
    assert table["val_loss"].tolist() == [0.9, 0.8, 0.6, 0.5]
    # append=True continues the file from epoch 0; without it the file starts afresh
    replay([CSVLogger(str(path), separator=";", append=True)], records("val_loss", [0.4]))
    assert pd.read_csv(path, sep=";")["epoch"].tolist() == [0, 1, 2, 3, 0]
    replay([CSVLogger(str(path), separator=";")], records("val_loss", [0.3]))
    assert pd.read_csv(path, sep=";").to_dict("records") == [
        {"epoch": 0, "train_loss": 1.0, "val_loss": 0.3}
    ]


def test_model_checkpoint_top_k_index_and_retries(tmp_path):
    model = torch.nn.Linear(2, 1)
    directory = tmp_path / "best"
    keeper = ModelCheckpoint(str(directory), monitor="val_accuracy", save_top_k=2, save_last=True)
    call_driver_hook([keeper], "on_fit_begin", {})
    accuracies = [0.5, 0.7, 0.6, 0.65]
    replay([keeper], records("val_accuracy", accuracies), model=model)
    names = sorted(path.name for path in directory.iterdir())
    assert names == [
        "checkpoints.json",
        "epoch=001-val_accuracy=0.7000.safetensors",
        "epoch=003-val_accuracy=0.6500.safetensors",
        "last.safetensors",
    ]
    # a retry of this fit resuming at epoch 3 forgets the file of epoch 3, which it trains again
    replay([keeper], records("val_accuracy", [0.55], first_epoch=3), start=3, model=model)
    call_driver_hook([keeper], "on_fit_end", [], None)  # the driver's object learns the result
    best = str(directory / "epoch=001-val_accuracy=0.7000.safetensors")
    assert keeper.best_model_path == best
    assert keeper.best_score == 0.7
    assert keeper.best_k_models == {
        best: 0.7,
        str(directory / "epoch=003-val_accuracy=0.5500.safetensors"): 0.55,
    }
    assert keeper.last_model_path == str(directory / "last.safetensors")
    assert len(list(directory.glob("epoch=*"))) == 2
    assert torch.equal(load_model_weights(best)["weight"], model.weight.detach())
    # a new fit into the same directory starts its own index; -1 keeps every epoch
    everything = ModelCheckpoint(str(directory), save_top_k=-1, filename="all-{epoch}")
    call_driver_hook([everything], "on_fit_begin", {})
    replay([everything], records("val_loss", [0.5, 0.7, 0.6]), model=model)
    call_driver_hook([everything], "on_fit_end", [{"epoch": 0}], None)
    assert list(everything.best_k_models.values()) == [0.5, 0.6, 0.7]
    assert json.loads((directory / "checkpoints.json").read_text())["monitor"] == "val_loss"


# --- real fits --------------------------------------------------------------------------------


class RecordEpochs(Callback):
    """Each rank appends the epochs it finished to `folder/rank-<rank>.txt`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_epoch_end(self, state) -> None:
        with open(Path(self.folder) / f"rank-{state.rank}.txt", "a") as handle:
            handle.write(f"{state.epoch}\n")


class StopOnRank(Callback):
    """Asks to stop on one rank only."""

    def __init__(self, rank: int, epoch: int) -> None:
        self.rank, self.epoch = rank, epoch

    def on_epoch_end(self, state) -> None:
        if (state.rank, state.epoch) == (self.rank, self.epoch):
            state.stop_training = True


def epochs_by_rank(folder: Path) -> dict[int, list[int]]:
    return {
        rank: [int(line) for line in (folder / f"rank-{rank}.txt").read_text().split()]
        for rank in (0, 1)
    }


def estimator(lr: float = LR, scheduler=None, model=None) -> ds.Estimator:
    torch.manual_seed(0)
    return ds.Estimator.from_torch(
        model=model if model is not None else DigitsNet(),
        optimizer=lambda params: torch.optim.Adam(params, lr=lr),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
        scheduler=scheduler,
    )


def worse_after_two_epochs(optimizer):
    """A good learning rate for two epochs, then one a thousand times too large."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 if epoch < 2 else 1000.0)


@pytest.mark.slow
def test_early_stopping_stops_every_rank_after_the_same_epoch(spark, tmp_path):
    train_df, val_df = digits_frames(spark)
    est = estimator(lr=0.0)  # nothing learns: val_loss stays the same
    history = est.fit(
        train_df,
        epochs=10,
        validation_data=val_df,
        callbacks=[EarlyStopping(patience=2), RecordEpochs(str(tmp_path))],
        **FIT,
    )
    assert history["epoch"].tolist() == [0, 1, 2]
    assert epochs_by_rank(tmp_path) == {0: [0, 1, 2], 1: [0, 1, 2]}


@pytest.mark.slow
def test_a_stop_asked_on_one_rank_stops_every_rank(spark, tmp_path):
    train_df, _ = digits_frames(spark)
    history = estimator().fit(
        train_df,
        epochs=5,
        callbacks=[StopOnRank(rank=1, epoch=1), RecordEpochs(str(tmp_path))],
        **FIT,
    )
    assert history["epoch"].tolist() == [0, 1]
    assert epochs_by_rank(tmp_path) == {0: [0, 1], 1: [0, 1]}


@pytest.mark.slow
def test_restore_best_weights_returns_the_best_epochs_model(spark):
    train_df, val_df = digits_frames(spark)
    est = estimator(scheduler=worse_after_two_epochs)
    stopper = EarlyStopping(patience=1, restore_best_weights=True)
    history = est.fit(train_df, epochs=6, validation_data=val_df, callbacks=[stopper], **FIT)
    val_losses = history["val_loss"].tolist()
    best = min(val_losses)
    assert len(val_losses) == 3 and val_losses[-1] > best, val_losses
    assert (stopper.best_epoch, stopper.stopped_epoch) == (val_losses.index(best), 2)
    # the model that came back to the driver scores the best epoch's val_loss
    returned = estimator(model=est.get_model()).evaluate(val_df, **FIT)["loss"]
    assert returned == pytest.approx(best, abs=1e-6)


@pytest.mark.slow
def test_model_checkpoint_keeps_the_best_k_files(spark, tmp_path):
    train_df, val_df = digits_frames(spark)
    directory = tmp_path / "best"
    keeper = ModelCheckpoint(str(directory), save_top_k=2)
    est = estimator(scheduler=worse_after_two_epochs)
    history = est.fit(train_df, epochs=4, validation_data=val_df, callbacks=[keeper], **FIT)
    ranked = history.sort_values("val_loss")
    kept = sorted(directory.glob("*.safetensors"))
    assert [int(path.name[6:9]) for path in kept] == sorted(ranked["epoch"][:2])
    assert keeper.best_model_path == str(directory / kept_name(ranked.iloc[0]))
    assert list(keeper.best_k_models.values()) == pytest.approx(ranked["val_loss"][:2].tolist())
    # the best file holds the best epoch's weights
    model = DigitsNet()
    model.load_state_dict(load_model_weights(keeper.best_model_path))
    reloaded = estimator(model=model).evaluate(val_df, **FIT)["loss"]
    assert reloaded == pytest.approx(ranked["val_loss"].iloc[0], abs=1e-6)


def kept_name(record) -> str:
    return f"epoch={int(record['epoch']):03d}-val_loss={record['val_loss']:.4f}.safetensors"


@pytest.mark.slow
def test_csv_log_and_best_files_hold_each_epoch_once_after_a_retry(spark, tmp_path):
    train_df, val_df = digits_frames(spark)
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss\n7,9.0\n")  # an old run's file: started afresh
    directory = tmp_path / "best"
    keeper = ModelCheckpoint(str(directory), save_top_k=2)
    # checkpoints after epochs 1 and 3; rank 1 dies in epoch 3, so the retry resumes at
    # epoch 2, which the first attempt had already logged
    killer = helpers.KillRankOnce(str(tmp_path / "killed"), rank=1, epoch=3, step=3)
    est = estimator()
    history = est.fit(
        train_df,
        epochs=4,
        validation_data=val_df,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=2,
        max_failures=1,
        callbacks=[CSVLogger(str(log)), keeper, killer],
        **FIT,
    )
    assert (tmp_path / "killed").exists(), "the callback never killed rank 1"
    assert history["attempt"].tolist() == [1, 1, 2, 2]
    table = pd.read_csv(log)
    assert table["epoch"].tolist() == [0, 1, 2, 3]
    for column in table.columns:
        assert table[column].tolist() == pytest.approx(history[column].tolist(), rel=1e-12)
    assert "val_accuracy" in table.columns
    ranked = history.sort_values("val_loss")
    assert sorted(keeper.best_k_models) == sorted(
        str(directory / kept_name(record)) for _, record in ranked.iloc[:2].iterrows()
    )
    assert len(list(directory.glob("*.safetensors"))) == 2
