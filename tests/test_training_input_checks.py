"""A fit never trains silently on NaN or inf, and `validation_data` passes every driver check
the training frame passes, with messages that name it."""

from __future__ import annotations

import re

import cloudpickle
import numpy as np
import pytest
import torch

import _training_helpers as helpers
import deepspark as ds
from deepspark.data import FeedError

cloudpickle.register_pickle_by_value(helpers)


def _frame(spark, x: np.ndarray, y: np.ndarray):
    # From Python rows: a pandas frame would arrive with its NaN turned into nulls (Arrow).
    rows = [(row.tolist(), int(label)) for row, label in zip(x.astype(np.float64), y, strict=True)]
    return spark.createDataFrame(rows, "features array<double>, label long")


def _estimator() -> ds.Estimator:
    torch.manual_seed(0)
    return ds.Estimator.from_torch(
        model=helpers.DigitsNet(),
        optimizer=lambda params: torch.optim.Adam(params, 1e-2),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
    )


FIT = {"feature_cols": "features", "label_cols": "label", "batch_size": 64, "num_workers": 2}


def test_nan_in_the_first_rows_is_refused_on_the_driver_with_column_and_count(spark):
    train_x, train_y, _, _ = helpers.digits_arrays()
    train_x = train_x[:200].copy()
    train_x[0, 3] = np.nan
    train_x[2, :2] = np.inf
    df = _frame(spark, train_x, train_y[:200])
    with pytest.raises(FeedError, match=r"first \d+ rows of df \(column 'features': 3\)"):
        _estimator().fit(df, epochs=1, **FIT)
    with pytest.raises(FeedError, match="allow_non_finite=True"):
        _estimator().fit(df, epochs=1, **FIT)


def test_nan_past_the_first_rows_fails_the_rank_naming_column_and_count(spark):
    train_x, train_y, _, _ = helpers.digits_arrays()
    train_x = train_x[:400].copy()
    train_x[-5:, 10] = np.nan  # the driver's first rows are clean
    df = _frame(spark, train_x, train_y[:400])
    with pytest.raises(ds.TrainingError, match=r"column 'features': \d") as failure:
        _estimator().fit(df, epochs=1, **FIT)
    counts = [int(n) for n in re.findall(r"column 'features': (\d+)", str(failure.value))]
    assert counts and all(1 <= count <= 5 for count in counts)
    # the opt-out trains on them as they are, and the loss shows what it learnt
    history = _estimator().fit(df, epochs=1, allow_non_finite=True, **FIT)
    assert np.isnan(history["train_loss"].iloc[-1])


def test_validation_data_gets_the_training_frames_checks_on_the_driver(spark):
    train_x, train_y, test_x, test_y = helpers.digits_arrays()
    df = _frame(spark, train_x[:200], train_y[:200])
    est = _estimator()

    renamed = _frame(spark, test_x, test_y).withColumnRenamed("features", "pixels")
    with pytest.raises(FeedError, match=r"validation_data has no column \['features'\]"):
        est.fit(df, validation_data=renamed, **FIT)

    narrower = _frame(spark, test_x[:, :32], test_y)  # 32 pixels where df has 64
    with pytest.raises(FeedError, match=r"validation_data's column 'features'.*\(32,\).*\(64,\)"):
        est.fit(df, validation_data=narrower, **FIT)

    as_text = _frame(spark, test_x, test_y).selectExpr("features", "CAST(label AS string) AS label")
    with pytest.raises(FeedError, match="validation_data"):
        est.fit(df, validation_data=as_text, **FIT)

    with_nan = test_x.copy()
    with_nan[1, 0] = np.nan
    with pytest.raises(FeedError, match=r"rows of validation_data \(column 'features': 1\)"):
        est.fit(df, validation_data=_frame(spark, with_nan, test_y), **FIT)
    assert est.history.empty  # nothing trained
