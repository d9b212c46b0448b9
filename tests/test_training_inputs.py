"""Estimator.fit / evaluate / predict on pandas, pandas-on-Spark and numpy inputs, on real Spark."""

from __future__ import annotations

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import DigitsNet, digits_arrays
from deepspark.context.spark_versions import collect_arrow
from deepspark.training.driver.inputs import SparkFrame, as_spark_frame

# Spark's Python workers cannot import the tests folder: ship these helpers by value.
cloudpickle.register_pickle_by_value(helpers)

EPOCHS, BATCH, LR = 8, 64, 3e-3


def _estimator(model: torch.nn.Module | None = None, seed: int = 0) -> ds.Estimator:
    torch.manual_seed(seed)
    return ds.Estimator.from_torch(
        model=model if model is not None else DigitsNet(),
        optimizer=lambda params: torch.optim.Adam(params, lr=LR),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
    )


def _image_net() -> torch.nn.Module:
    """Takes (N, 8, 8) images: its first layer needs rows of 8, so a flat (N, 64) fails."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Flatten(), DigitsNet())


def _digits_frame(x: np.ndarray, y: np.ndarray, **columns) -> pd.DataFrame:
    return pd.DataFrame({"features": list(x), "label": y, **columns})


def _local_outputs(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# --- fit and evaluate ----------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_on_a_pandas_frame_reaches_accuracy_like_a_spark_frame(spark):
    train_x, train_y, test_x, test_y = digits_arrays()
    est = _estimator()
    # the call test_training_fit makes with Spark DataFrames, with pandas frames instead
    history = est.fit(
        _digits_frame(train_x, train_y),
        feature_cols="features",
        label_cols="label",
        epochs=EPOCHS,
        batch_size=BATCH,
        validation_data=_digits_frame(test_x, test_y),
        num_workers=2,
        seed=0,
        progress=False,
    )
    accuracy = history["val_accuracy"].iloc[-1]
    assert accuracy >= 0.95
    local = (_local_outputs(est.get_model(), test_x).argmax(1) == test_y).mean()
    assert local == pytest.approx(accuracy, abs=1e-9)
    metrics = est.evaluate(_digits_frame(test_x, test_y), "features", "label", num_workers=2)
    assert metrics["accuracy"] == pytest.approx(local, abs=1e-9)


@pytest.mark.slow
def test_a_dict_of_arrays_trains_and_predicts_a_numpy_array(spark):
    train_x, train_y, test_x, test_y = digits_arrays()
    images, test_images = train_x.reshape(-1, 8, 8), test_x.reshape(-1, 8, 8)
    est = _estimator(_image_net())
    history = est.fit(
        {"image": images, "label": train_y},
        feature_cols="image",
        label_cols="label",
        epochs=3,
        batch_size=BATCH,
        validation_data={"image": test_images, "label": test_y},
        num_workers=2,
        seed=0,
        progress=False,
    )
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    predictions = est.predict({"image": test_images})
    assert isinstance(predictions, np.ndarray)
    assert predictions.shape == (len(test_y), 10)
    expected = _local_outputs(est.get_model(), test_images)
    np.testing.assert_allclose(predictions, expected, rtol=0, atol=1e-5)


def test_in_memory_rows_reach_every_worker_exactly(spark):
    rows = 1001
    rng = np.random.default_rng(0)
    arrays = {
        "pixels": rng.integers(0, 256, (rows, 4, 3), dtype=np.uint8),
        "weight": rng.random(rows),
        "flag": rng.random(rows) > 0.5,
        "label": np.arange(rows),
    }
    converted = as_spark_frame(arrays, "df", partitions=2)
    assert converted.shapes == {"pixels": (4, 3)}
    sizes = converted.frame.rdd.glom().map(len).collect()
    assert len(sizes) >= 2 and min(sizes) > 0 and sum(sizes) == rows
    table = collect_arrow(converted.frame)  # Spark keeps the rows in their order
    pixels = table.column("pixels").combine_chunks()
    assert pa.types.is_int16(pixels.type.value_type)  # Spark has no uint8: widened, exactly
    np.testing.assert_array_equal(pixels.flatten().to_numpy().reshape(rows, 4, 3), arrays["pixels"])
    for name in ("weight", "flag", "label"):
        np.testing.assert_array_equal(table.column(name).to_numpy(), arrays[name])


def test_user_feature_shapes_win_over_the_shapes_of_the_arrays():
    converted = SparkFrame(frame=None, kind="dict of numpy arrays", shapes={"x": (8, 8)})
    assert converted.feature_shapes(None) == {"x": (8, 8)}
    assert converted.feature_shapes({"x": (1, 8, 8)}) == {"x": (1, 8, 8)}


# --- predict -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pandas_predict_keeps_row_order_and_index(spark):
    _, _, test_x, test_y = digits_arrays()
    order = np.random.default_rng(1).permutation(len(test_y))
    frame = _digits_frame(test_x, test_y, name=[f"row-{i}" for i in range(len(test_y))])
    frame.index = pd.Index(order * 7 + 1000, name="id")  # neither sorted nor a range
    original = frame.copy()
    est = _estimator()

    scored = est.predict(frame, feature_cols="features")

    assert isinstance(scored, pd.DataFrame)
    assert list(scored.columns) == ["features", "label", "name", "prediction"]
    pd.testing.assert_index_equal(scored.index, frame.index)
    pd.testing.assert_frame_equal(scored[original.columns], original)
    expected = _local_outputs(est.get_model(), test_x)
    for position, prediction in enumerate(scored["prediction"]):
        np.testing.assert_allclose(prediction, expected[position], rtol=0, atol=1e-5)
    assert "prediction" not in frame.columns  # the caller's frame is left alone

    classes = est.predict(frame, "features", output="class", passthrough_cols=["name"])
    assert list(classes.columns) == ["name", "prediction"]
    pd.testing.assert_index_equal(classes.index, frame.index)
    np.testing.assert_array_equal(classes["prediction"].to_numpy(), expected.argmax(1))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`to_pandas` loads all data")
def test_pandas_on_spark_fits_and_predicts_with_its_index(spark):
    import pyspark.pandas as ps

    train_x, train_y, test_x, test_y = digits_arrays()
    est = _estimator()
    train = ps.from_pandas(_digits_frame(train_x, train_y))
    est.fit(train, "features", "label", epochs=1, batch_size=BATCH, num_workers=2, progress=False)

    frame = _digits_frame(test_x, test_y)
    frame.index = pd.Index(np.arange(len(test_y))[::-1] * 3, name="id")
    scored = est.predict(ps.from_pandas(frame), "features")

    assert isinstance(scored, ps.DataFrame)
    local = scored.to_pandas()
    assert list(local.columns) == ["features", "label", "prediction"]
    pd.testing.assert_index_equal(local.index, frame.index)
    expected = _local_outputs(est.get_model(), test_x)
    np.testing.assert_allclose(np.stack(local["prediction"]), expected, rtol=0, atol=1e-5)


# --- bad inputs ----------------------------------------------------------------------------------

_ROWS = np.zeros((4, 64), np.float32)
_LABELS = np.arange(4)

BAD_INPUTS = {
    "list": (
        [[0.0] * 64],
        TypeError,
        r"df: got a list; give a Spark DataFrame, a pandas DataFrame, a pandas-on-Spark "
        r"DataFrame \(pyspark.pandas.DataFrame\), a dict of numpy arrays .*, or a data "
        r"creator",
    ),
    "bare array": (_ROWS, TypeError, r"df: got a ndarray; .*\{'features': array\}"),
    "ragged lists in a dict": (
        {"features": [[0.0] * 64, [0.0] * 63], "label": _LABELS[:2]},
        ValueError,
        r"df: column 'features' of the dict is ragged: .*\(64,\), \(63,\)",
    ),
    "ragged object array in a dict": (
        {"features": np.array([np.zeros(64), np.zeros(3)], dtype=object), "label": _LABELS[:2]},
        ValueError,
        r"column 'features' of the dict is ragged",
    ),
    "dict values of different lengths": (
        {"features": _ROWS, "label": _LABELS[:3]},
        ValueError,
        r"different numbers of rows \('features': 4, 'label': 3\)",
    ),
    "empty pandas frame": (
        pd.DataFrame({"features": [], "label": []}),
        ValueError,
        r"df: the pandas DataFrame is empty",
    ),
    "object column of dicts": (
        pd.DataFrame({"features": [{"a": 1.0}, {"b": 2.0}], "label": [0, 1]}),
        TypeError,
        r"column 'features' of the pandas DataFrame holds dict, which cannot become a tensor",
    ),
    "ragged pandas column": (
        pd.DataFrame({"features": [np.zeros(64), np.zeros(60)], "label": [0, 1]}),
        ValueError,
        r"column 'features' of the pandas DataFrame is ragged",
    ),
    "missing column": (
        pd.DataFrame({"pixels": list(_ROWS), "label": _LABELS}),
        ValueError,
        r"feature_cols: column 'features' is not in df \(a pandas DataFrame\); available "
        r"columns: pixels, label",
    ),
}


@pytest.mark.parametrize(("data", "error", "match"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_are_refused_on_the_driver(data, error, match):
    est = _estimator()
    with pytest.raises(error, match=match):
        est.fit(data, "features", "label", num_workers=1, batch_size=4)


def test_every_entry_point_names_the_argument_it_refuses():
    est = _estimator()
    good = {"features": _ROWS, "label": _LABELS}
    with pytest.raises(TypeError, match=r"validation_data: got a list"):
        est.fit(good, "features", "label", validation_data=[1, 2], num_workers=1, batch_size=4)
    with pytest.raises(TypeError, match=r"df: got a list"):
        est.evaluate([1, 2], "features", "label")
    with pytest.raises(TypeError, match=r"df: got a tuple"):
        est.predict((1, 2), "features")
    with pytest.raises(ValueError, match=r"passthrough_cols: predict on a dict of arrays"):
        est.predict(good, "features", passthrough_cols=["label"])
    with pytest.raises(ValueError, match=r"output_col='label': \['label'\] already exist"):
        est.predict(pd.DataFrame(good | {"features": list(_ROWS)}), "features", output_col="label")


def test_in_memory_data_without_a_session_asks_for_init_context(monkeypatch):
    import pyspark.sql

    import deepspark.context.session

    monkeypatch.setattr(deepspark.context.session, "current_session", lambda: None)
    monkeypatch.setattr(pyspark.sql.SparkSession, "getActiveSession", classmethod(lambda cls: None))
    with pytest.raises(RuntimeError, match=r"no Spark session is running; .*ds\.init_context\(\)"):
        _estimator().fit(_digits_frame(_ROWS, _LABELS), "features", "label", num_workers=1)
