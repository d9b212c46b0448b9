"""Keras 3 models on the torch backend: Estimator.from_keras on real Spark, with digits.

Keras reads its backend once per process, when first imported; this file needs the torch
backend in the test process (it sets it, as a user's program would, unless Keras is already
imported with another backend: then run this file in a pytest process of its own).
"""

from __future__ import annotations

import cloudpickle
import numpy as np
import pandas as pd
import pytest

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import KillRankOnce, digits_arrays, digits_frames
from deepspark.persist.keras_files import import_keras

cloudpickle.register_pickle_by_value(helpers)

try:
    keras = import_keras("torch")
except RuntimeError as error:  # Keras already runs another backend in this process
    pytest.skip(str(error), allow_module_level=True)

# every test trains on Spark
pytestmark = pytest.mark.slow

EPOCHS, BATCH, LR = 8, 64, 3e-3


def _digits_net(seed: int = 0):
    _seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def _seed(seed: int) -> None:
    """Seeds torch, numpy and random (keras.utils.set_random_seed would import TensorFlow)."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _estimator(seed: int = 0, **overrides):
    arguments = {
        "optimizer": keras.optimizers.Adam(LR),
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "backend": "torch",
    }
    arguments.update(overrides)
    return ds.Estimator.from_keras(_digits_net(seed), **arguments)


def _accuracy(model, features, labels) -> float:
    probabilities = model.predict(features, verbose=0)
    return float((probabilities.argmax(1) == labels).mean())


def test_digits_trains_on_two_workers_like_a_single_process_fit(spark):
    train_df, test_df = digits_frames(spark)
    est = _estimator()
    assert type(est).__name__ == "KerasEstimator"
    history = est.fit(
        train_df,
        feature_cols="features",
        label_cols="label",
        epochs=EPOCHS,
        batch_size=BATCH,
        validation_data=test_df,
        num_workers=2,
        seed=0,
    )
    assert list(history["epoch"]) == list(range(EPOCHS))
    accuracy = history["val_accuracy"].iloc[-1]
    assert accuracy >= 0.95, history
    assert history["lr"].iloc[0] == pytest.approx(LR)

    # the driver's Keras model holds the trained weights
    train_x, train_y, test_x, test_y = digits_arrays()
    assert _accuracy(est.keras_model, test_x, test_y) == pytest.approx(accuracy, abs=1e-9)
    scores = est.evaluate(test_df, feature_cols="features", label_cols="label")
    assert scores["accuracy"] == pytest.approx(accuracy, abs=1e-9)

    # the same model, data split and epochs in one process, with Keras's own fit
    single = _digits_net(0)
    single.compile(keras.optimizers.Adam(LR), "sparse_categorical_crossentropy")
    single.fit(train_x, train_y, epochs=EPOCHS, batch_size=BATCH, verbose=0)
    single_accuracy = _accuracy(single, test_x, test_y)
    assert abs(accuracy - single_accuracy) <= 0.02, (accuracy, single_accuracy)

    scored = est.predict(test_df, feature_cols="features", output="class")
    rows = scored.select("label", "prediction").toPandas()
    assert float((rows["label"] == rows["prediction"]).mean()) == pytest.approx(accuracy)


def test_two_inputs_and_a_dict_of_outputs_train(spark):
    from pyspark.sql import functions as F

    train_df, test_df = digits_frames(spark)

    def halves(frame):
        return frame.select(
            F.slice("features", 1, 32).alias("top"),
            F.slice("features", 33, 32).alias("bottom"),
            "label",
            (F.col("label") % 2).alias("odd"),
        )

    _seed(0)
    top, bottom = keras.Input((32,), name="top"), keras.Input((32,), name="bottom")
    hidden = keras.layers.Concatenate()(
        [keras.layers.Dense(32, activation="relu")(top), keras.layers.Dense(32, "relu")(bottom)]
    )
    model = keras.Model(
        [top, bottom],
        {
            "digit": keras.layers.Dense(10, name="digit")(hidden),
            "parity": keras.layers.Dense(1, activation="sigmoid", name="parity")(hidden),
        },
    )
    est = ds.Estimator.from_keras(
        model,
        optimizer=keras.optimizers.Adam(1e-2),
        loss={
            "digit": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "parity": "binary_crossentropy",
        },
        loss_weights={"digit": 1.0, "parity": 0.5},
        metrics={"digit": ["accuracy"], "parity": ["accuracy"]},
        backend="torch",
    )
    history = est.fit(
        halves(train_df),
        feature_cols=["top", "bottom"],  # two columns, the model's two inputs
        label_cols=["label", "odd"],  # in the order of the model's outputs
        label_dtypes={"odd": "float32"},
        epochs=5,
        batch_size=64,
        validation_data=halves(test_df),
        num_workers=2,
    )
    last = history.iloc[-1]
    assert last["val_digit_accuracy"] >= 0.9, history
    assert last["val_parity_accuracy"] >= 0.9, history
    assert last["train_loss"] < history["train_loss"].iloc[0]
    scored = est.predict(halves(test_df), feature_cols=["top", "bottom"])
    assert {"digit", "parity"} <= set(scored.columns)


def test_keras_callbacks_stop_every_rank_at_the_same_epoch(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    stopper = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=2, baseline=1.01)
    log_path = tmp_path / "epochs.csv"
    epochs_seen = tmp_path / "seen.txt"

    def note(epoch, logs):  # a Keras LambdaCallback: runs on rank 0 with Keras's interface
        with open(epochs_seen, "a") as handle:
            handle.write(f"{epoch} {logs['loss']:.4f} {logs['val_accuracy']:.4f}\n")

    best_path = str(tmp_path / "best.keras")
    history = _estimator().fit(
        train_df,
        feature_cols="features",
        label_cols="label",
        epochs=6,
        batch_size=BATCH,
        validation_data=test_df,
        num_workers=2,
        callbacks=[
            stopper,
            keras.callbacks.CSVLogger(str(log_path)),
            keras.callbacks.ModelCheckpoint(best_path, monitor="val_loss", save_best_only=True),
            keras.callbacks.LambdaCallback(on_epoch_end=note),
        ],
    )
    # no epoch beats the baseline: both ranks stop after patience=2 epochs, together
    assert list(history["epoch"]) == [0, 1]
    assert stopper.stopped_epoch == 1
    assert len(pd.read_csv(log_path)) == 2
    assert [line.split()[0] for line in epochs_seen.read_text().splitlines()] == ["0", "1"]
    best = keras.saving.load_model(best_path)
    assert len(best.weights) == 4

    with pytest.raises(ValueError, match="TensorBoard"):
        _estimator().fit(
            train_df,
            feature_cols="features",
            label_cols="label",
            callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "tb"))],
        )


def test_killed_rank_resumes_from_the_checkpoint(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    # a Keras loss object (not a name) is one loss for the model's one output
    est = _estimator(loss=keras.losses.SparseCategoricalCrossentropy())
    history = est.fit(
        train_df,
        feature_cols="features",
        label_cols="label",
        epochs=4,
        batch_size=BATCH,
        validation_data=test_df,
        num_workers=2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        max_failures=1,
        callbacks=[KillRankOnce(str(tmp_path / "killed"), rank=1, epoch=1, step=3)],
    )
    assert (tmp_path / "killed").exists()
    assert est.attempts_ == 2
    assert list(history["epoch"]) == [0, 1, 2, 3]
    assert list(history["attempt"]) == [1, 2, 2, 2]  # epoch 0 came from the checkpoint
    assert history["val_accuracy"].iloc[-1] >= 0.85, history
    # the Keras optimizer's state went through the checkpoint: Adam counted every step
    state = est.optimizer_state_dict()
    assert int(state["keras_variables"][0]) == int(history["steps"].sum())


def test_save_and_load_keras_files(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    est = _estimator()
    est.fit(train_df, feature_cols="features", label_cols="label", epochs=1, batch_size=BATCH)
    _, _, test_x, _ = digits_arrays()
    expected = est.keras_model.predict(test_x, verbose=0)

    file_path = est.save(str(tmp_path / "digits.keras"))
    plain = keras.saving.load_model(file_path)  # Keras's own file, compiled
    np.testing.assert_allclose(plain.predict(test_x, verbose=0), expected, atol=1e-6)
    loaded = ds.Estimator.load(file_path)
    assert type(loaded).__name__ == "KerasEstimator" and loaded.backend == "torch"
    np.testing.assert_allclose(loaded.keras_model.predict(test_x, verbose=0), expected, atol=1e-6)

    folder = est.save(str(tmp_path / "digits"))
    again = ds.Estimator.load(folder)
    assert list(again.history["epoch"]) == [0]
    steps = int(again.optimizer_state_dict()["keras_variables"][0])
    again.fit(train_df, feature_cols="features", label_cols="label", epochs=1, batch_size=BATCH)
    assert int(again.optimizer_state_dict()["keras_variables"][0]) == 2 * steps  # continued
    scores = again.evaluate(test_df, feature_cols="features", label_cols="label")
    assert scores["accuracy"] > 0.8


def test_predict_takes_a_keras_file_and_a_keras_model(spark, tmp_path):
    _, test_df = digits_frames(spark)
    model = _digits_net(1)
    path = str(tmp_path / "net.keras")
    model.save(path)
    _, _, test_x, _ = digits_arrays()
    expected = model.predict(test_x, verbose=0)

    for source in (path, model):
        scored = ds.predict(test_df, source, feature_cols="features").toPandas()
        np.testing.assert_allclose(np.stack(scored["prediction"]), expected, atol=1e-5)
    ds.predict(test_df, path, feature_cols="features").count()  # cached per Python worker


def _keras_mlp(config):
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(config["hidden"], activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def test_auto_estimator_searches_keras_models(spark, tmp_path):
    from deepspark.automl import AutoEstimator

    train_df, test_df = digits_frames(spark)
    auto = AutoEstimator.from_keras(
        _keras_mlp,
        {"hidden": [16, 64], "lr": [3e-3]},
        optimizer=lambda config: keras.optimizers.Adam(config["lr"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        metric="val_accuracy",
        sampler="grid",
        pruner="none",
        max_concurrent=1,
        checkpoint_dir=str(tmp_path / "search"),
    )
    table = auto.fit(
        train_df,
        n_trials=2,
        feature_cols="features",
        label_cols="label",
        epochs=EPOCHS,
        batch_size=BATCH,
        validation_data=test_df,
    )
    assert sorted(table["param_hidden"]) == [16, 64]
    assert (table["state"] == "COMPLETE").all()
    assert auto.best_value >= 0.9
    best = auto.best_estimator
    assert type(best).__name__ == "KerasEstimator"
    scores = best.evaluate(test_df, feature_cols="features", label_cols="label")
    assert scores["accuracy"] == pytest.approx(auto.best_value, abs=1e-6)
