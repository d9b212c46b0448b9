"""Data creators (issue #11): each rank builds its own batches with a function
``(config, batch_size) -> DataLoader``, for data that is not in Spark; real Spark jobs on 2
workers, scikit-learn's digits."""

from __future__ import annotations

import sys

import cloudpickle
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import DigitsNet, digits_arrays
from deepspark.training.rank.sources import sharded

cloudpickle.register_pickle_by_value(helpers)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BATCH = 64


def train_loader(config, batch_size):
    """A map-style dataset with a shuffling loader: deepspark shards it by rank."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y, _, _ = digits_arrays()
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def holdout_loader(config, batch_size):
    from torch.utils.data import DataLoader, TensorDataset

    _, _, x, y = digits_arrays()
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size)


def uneven_batches(config, batch_size):
    """Not a DataLoader: 7 batches that every rank reads; deepspark deals them out."""
    x, y, _, _ = digits_arrays()
    for start in range(0, 7 * batch_size, batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def own_half(config, batch_size):
    """Reads only this rank's half itself, and says so with `sharded`."""
    x, y, _, _ = digits_arrays()
    half = slice(None, 700) if config["rank"] == 0 else slice(700, None)
    x, y = x[half], y[half]
    batches = [
        (x[start : start + batch_size], y[start : start + batch_size])
        for start in range(0, len(y), batch_size)
    ]
    return sharded(batches)


def dict_batches(config, batch_size):
    from torch.utils.data import DataLoader

    x, y, _, _ = digits_arrays()
    rows = [
        {"pixels": pixels, "digit": int(label), "id": i}
        for i, (pixels, label) in enumerate(zip(x, y, strict=True))
    ]
    return DataLoader(rows, batch_size=batch_size, shuffle=True)


def _estimator(metrics=("accuracy",)) -> ds.Estimator:
    torch.manual_seed(0)
    return ds.Estimator.from_torch(
        model=DigitsNet(),
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=list(metrics),
    )


@pytest.mark.slow
def test_data_creator_trains_evaluates_and_predicts(spark):
    est = _estimator()
    history = est.fit(
        train_loader,
        epochs=8,
        batch_size=BATCH,
        num_workers=2,
        validation_data=holdout_loader,
        seed=0,
        progress=False,
    )
    # 1,437 rows over 2 ranks: each rank's 719-row share (the sampler pads one) in batches of 32
    assert history["steps"].tolist() == [23] * 8
    assert history["val_accuracy"].iloc[-1] >= 0.95
    scores = est.evaluate(holdout_loader, num_workers=2)
    predicted = est.predict(holdout_loader, num_workers=2)
    _, _, _, test_y = digits_arrays()
    assert isinstance(predicted, np.ndarray) and predicted.shape == (len(test_y), 10)
    assert scores["accuracy"] == pytest.approx(
        accuracy_score(test_y, predicted.argmax(1)), abs=1e-9
    )
    with torch.no_grad():
        _, _, test_x, _ = digits_arrays()
        expected = est.get_model().eval()(torch.from_numpy(test_x)).numpy()
    np.testing.assert_allclose(predicted, expected, atol=1e-5)


@pytest.mark.slow
def test_uneven_iterable_creator_keeps_ranks_in_step(spark):
    est = _estimator()
    history = est.fit(uneven_batches, epochs=2, batch_size=BATCH, num_workers=2, progress=False)
    # rank 0 is dealt batches 0, 2, 4, 6 and rank 1 batches 1, 3, 5: three steps both can take
    assert history["steps"].tolist() == [3, 3]
    assert history["train_rows"].tolist() == [3 * 2 * 32, 3 * 2 * 32]


@pytest.mark.slow
def test_a_sharded_creator_is_taken_whole_and_retried_from_checkpoints(spark, tmp_path):
    est = _estimator()
    killer = helpers.KillRankOnce(str(tmp_path / "killed"), rank=1, epoch=1, step=3)
    history = est.fit(
        own_half,
        epochs=3,
        batch_size=BATCH,
        num_workers=2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        max_failures=1,
        callbacks=[killer],
        progress=False,
    )
    assert (tmp_path / "killed").exists()
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["attempt"].tolist() == [1, 2, 2]
    # ranks read 700 and 737 rows in batches of 32: 22 and 24 batches, so 22 steps each
    assert history["steps"].tolist() == [22] * 3
    assert history["train_rows"].tolist() == [700 + 22 * 32] * 3


@pytest.mark.slow
def test_dict_batches_are_read_by_key(spark):
    est = _estimator()
    history = est.fit(
        dict_batches,
        feature_cols=["pixels"],
        label_cols=["digit"],
        epochs=6,
        batch_size=BATCH,
        num_workers=2,
        progress=False,
    )
    assert history["train_accuracy"].iloc[-1] >= 0.93


def test_creator_errors_are_clear(spark):
    est = _estimator()
    with pytest.raises(TypeError, match="validation_data= must be a data creator too"):
        est.fit(train_loader, validation_data=spark.range(3), num_workers=2)
    with pytest.raises(Exception, match=r"the data creator's batch has no \['image'\]"):
        est.fit(dict_batches, feature_cols=["image"], label_cols=["digit"], num_workers=2)
