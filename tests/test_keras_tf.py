"""Keras 3 on the TensorFlow backend: fit and evaluate under MultiWorkerMirroredStrategy, one
worker per Spark task, on real Spark with real digits data."""

from __future__ import annotations

import time

import cloudpickle
import numpy as np
import psutil
import pytest

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import digits_arrays, digits_frames
from conftest import started_by_this_run

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

# Spark's Python workers cannot import the tests folder: ship these helpers by value.
cloudpickle.register_pickle_by_value(helpers)

# every test trains on Spark
pytestmark = pytest.mark.slow

EPOCHS, BATCH, LR = 8, 64, 3e-3


def _digits_model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def _estimator(model):
    return ds.Estimator.from_keras(
        model,
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        backend="tensorflow",
    )


def _accuracy(model, features, labels) -> float:
    return float((model.predict(features, verbose=0, batch_size=512).argmax(1) == labels).mean())


def _tf_workers(since: float) -> list[str]:
    """TensorFlow worker processes started after `since` that are still alive."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
        info = process.info
        cmdline = " ".join(info["cmdline"] or [])
        if (
            info["create_time"] >= since
            and "deepspark.training.rank._tf_worker" in cmdline
            and info["status"] != psutil.STATUS_ZOMBIE
            and started_by_this_run(process)
        ):
            found.append(f"{info['pid']}: {cmdline}")
    return found


def test_tf_fit_on_digits_reaches_accuracy_and_matches_single_process(spark):
    train_df, test_df = digits_frames(spark)
    train_x, train_y, test_x, test_y = digits_arrays()
    model = _digits_model()
    initial = model.get_weights()
    est = _estimator(model)
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
    assert est.history is history
    assert history["epoch"].tolist() == list(range(EPOCHS))
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(history.columns)
    # every row counted once per epoch, filler rows of the shorter worker left out
    assert set(history["train_rows"]) == {len(train_y)}
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] / 3
    accuracy = history["val_accuracy"].iloc[-1]
    assert accuracy >= 0.95, history.to_string()

    # the trained weights came back to the driver's model: its accuracy is the last epoch's
    assert _accuracy(model, test_x, test_y) == pytest.approx(accuracy, abs=1e-6)

    # evaluate reduces loss and metrics exactly over every row of both workers
    scores = est.evaluate(test_df, feature_cols="features", label_cols="label", num_workers=2)
    assert scores["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    logits = model.predict(test_x, verbose=0)
    expected_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(test_y, logits)
    assert scores["loss"] == pytest.approx(float(expected_loss), rel=1e-4)

    # the same model, split and epochs trained by Keras's own fit in this process
    single = _digits_model()
    single.set_weights(initial)
    single.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    single.fit(train_x, train_y, epochs=EPOCHS, batch_size=BATCH, shuffle=True, verbose=0)
    single_accuracy = _accuracy(single, test_x, test_y)
    assert abs(accuracy - single_accuracy) <= 0.02, (accuracy, single_accuracy)


def test_tf_fit_trains_a_model_with_two_inputs_and_a_dict_of_outputs(spark):
    import pandas as pd

    train_x, train_y, test_x, test_y = digits_arrays()

    def frame(x, y):
        pdf = pd.DataFrame(
            {
                "top": list(x[:, :32].astype(np.float64)),
                "bottom": list(x[:, 32:].astype(np.float64)),
                "label": y.astype(np.int64),
                "big": (y >= 5).astype(np.float64),
            }
        )
        return spark.createDataFrame(
            pdf, "top array<double>, bottom array<double>, label long, big double"
        )

    keras.utils.set_random_seed(0)
    top = keras.Input((32,), name="top")
    bottom = keras.Input((32,), name="bottom")
    hidden = keras.layers.Dense(64, activation="relu")(keras.layers.Concatenate()([top, bottom]))
    outputs = {
        "digit": keras.layers.Dense(10, name="digit")(hidden),
        "big": keras.layers.Dense(1, activation="sigmoid", name="big")(hidden),
    }
    model = keras.Model([top, bottom], outputs)
    est = ds.Estimator.from_keras(
        model,
        optimizer=keras.optimizers.Adam(LR),
        loss={
            "digit": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "big": "binary_crossentropy",
        },
        metrics={"digit": ["accuracy"], "big": ["binary_accuracy"]},
        backend="tensorflow",
    )
    history = est.fit(
        frame(train_x, train_y),
        feature_cols=["top", "bottom"],
        label_cols={"digit": "label", "big": "big"},
        epochs=6,
        batch_size=BATCH,
        validation_data=frame(test_x, test_y),
        num_workers=2,
        seed=0,
    )
    assert {"val_digit_accuracy", "val_big_binary_accuracy"} <= set(history.columns)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] / 2
    assert history["val_digit_accuracy"].iloc[-1] >= 0.9, history.to_string()
    assert history["val_big_binary_accuracy"].iloc[-1] >= 0.9, history.to_string()
    predicted = model.predict([test_x[:, :32], test_x[:, 32:]], verbose=0)
    assert float((predicted["digit"].argmax(1) == test_y).mean()) == pytest.approx(
        history["val_digit_accuracy"].iloc[-1], abs=1e-6
    )


@pytest.mark.timeout(600)
def test_tf_worker_killed_mid_fit_resumes_from_checkpoint(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    started = time.time()
    est = _estimator(_digits_model())
    killer = helpers.KillRankOnce(str(tmp_path / "killed"), rank=1, epoch=2, step=3)
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
        callbacks=[killer],
        seed=0,
        progress=False,
    )
    assert (tmp_path / "killed").exists(), "the callback never killed rank 1"
    # each epoch exactly once: 0-1 from the first attempt's checkpoint, 2-3 trained again
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    assert history["attempt"].tolist() == [1, 1, 2, 2]
    assert est.attempts_ == 2
    # the second attempt continued from the checkpoint's weights and optimizer state
    assert history["train_loss"].iloc[2] < history["train_loss"].iloc[0]
    assert history["val_accuracy"].iloc[-1] >= 0.9
    assert not _tf_workers(started)


@pytest.mark.timeout(300)
def test_tf_dead_peer_without_max_failures_fails_fast_naming_the_rank(spark, tmp_path):
    train_df, _ = digits_frames(spark)
    started = time.time()
    est = _estimator(_digits_model())
    killer = helpers.KillRankOnce(str(tmp_path / "killed"), rank=1, epoch=0, step=2)
    with pytest.raises(ds.TrainingError, match=r"failed after 1 attempt") as failure:
        est.fit(
            train_df,
            feature_cols="features",
            label_cols="label",
            epochs=3,
            batch_size=BATCH,
            num_workers=2,
            callbacks=[killer],
            collective_timeout_s=60,
            progress=False,
        )
    message = str(failure.value)
    first_line = message.splitlines()[1].strip()
    assert first_line.startswith(
        "attempt 1: rank 1: TFWorkerError: the TensorFlow worker process of rank 1 was killed "
        "by signal 9 (SIGKILL)"
    ), message
    # the fit ended (no hang) and left no TensorFlow worker behind
    assert not _tf_workers(started)


def test_tf_fit_refuses_torch_only_options_before_any_job(spark):
    train_df, _ = digits_frames(spark)
    est = _estimator(_digits_model())
    with pytest.raises(ValueError, match=r"precision='bf16' is not supported on Keras's Tensor"):
        est.fit(train_df, feature_cols="features", label_cols="label", precision="bf16")


def test_tf_backend_models_predict_from_memory_keras_files_and_saved_models(spark, tmp_path):
    """deepspark.predict runs a TensorFlow-backend Keras model in the Spark workers, from the
    estimator, from a .keras file and from a SavedModel directory, as Keras does locally."""
    train_df, test_df = digits_frames(spark)
    _, _, test_x, _ = digits_arrays()
    est = _estimator(_digits_model())
    est.fit(train_df, feature_cols="features", label_cols="label", epochs=2, batch_size=BATCH)
    expected = est.keras_model.predict(test_x, verbose=0)
    ordered = test_df  # predict keeps the rows' order, as toPandas reads them

    def scores(frame, column: str = "prediction") -> np.ndarray:
        return np.array(frame.toPandas()[column].tolist(), dtype=np.float32)

    from_estimator = est.predict(ordered, feature_cols="features")
    np.testing.assert_allclose(scores(from_estimator), expected, atol=1e-4)

    keras_file = str(tmp_path / "digits.keras")
    est.keras_model.save(keras_file)
    from_file = ds.predict(ordered, keras_file, feature_cols="features")
    np.testing.assert_allclose(scores(from_file), expected, atol=1e-4)

    saved_model = str(tmp_path / "saved")
    est.keras_model.export(saved_model, verbose=False)
    from_saved = ds.predict(ordered, saved_model, feature_cols="features")
    added = [name for name in from_saved.columns if name not in ordered.columns]
    assert len(added) == 1, added
    np.testing.assert_allclose(scores(from_saved, added[0]), expected, atol=1e-4)
