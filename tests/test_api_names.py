"""One name per concept (docs/glossary.md): the old names warn and still work, predict's
arguments mean the same in `deepspark.predict` and `Estimator.predict`, every error deepspark
defines is a `deepspark.DeepsparkError`, and a fit prints no bookkeeping."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from pyspark.sql import functions as F

import deepspark as ds
from deepspark.deprecation import REMOVED_IN

FEATURES = 4


def _frame(spark, rows: int = 64, partitions: int = 4):
    rng = np.random.default_rng(0)
    data = [(i, rng.normal(size=FEATURES).tolist()) for i in range(rows)]
    return spark.createDataFrame(data, "id long, x array<double>").repartition(partitions, "id")


def _linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, 1)


def _deprecations(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


# --- old keyword and attribute names ------------------------------------------------------------


def test_automl_old_names_warn_name_the_new_ones_and_still_work(tmp_path):
    pytest.importorskip("optuna")
    from deepspark.automl import AutoEstimator

    with pytest.warns(DeprecationWarning) as caught:
        auto = AutoEstimator.from_torch(
            lambda config: _linear(),
            {"lr": [0.1]},
            workers_per_trial=2,
            directory=str(tmp_path / "search"),
        )
    messages = _deprecations(caught)
    assert any("workers_per_trial=" in m and "use num_workers=" in m for m in messages), messages
    assert any("directory=" in m and "use checkpoint_dir=" in m for m in messages), messages
    assert all(REMOVED_IN in m for m in messages)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert (auto.num_workers, auto.checkpoint_dir) == (2, str(tmp_path / "search"))
    with pytest.warns(DeprecationWarning, match="use AutoEstimator.num_workers"):
        assert auto.workers_per_trial == 2
    with pytest.raises(TypeError, match="give num_workers= only"):
        AutoEstimator(lambda config: _linear(), {}, num_workers=1, workers_per_trial=1)


def test_autots_passes_the_new_search_names_on():
    from deepspark.timeseries import AutoTS

    with pytest.warns(DeprecationWarning, match="use checkpoint_dir="):
        auto = AutoTS(horizon=4, directory="/tmp/search", seed=0)
    assert auto.search_options == {"checkpoint_dir": "/tmp/search", "seed": 0}


@pytest.mark.slow  # old names on Spark jobs: the full suite
def test_vision_old_column_names_warn_and_still_work(spark):
    from deepspark import vision

    rows = [("a", [1.0, 0.0]), ("b", [0.99, 0.05]), ("c", [0.0, 1.0])]
    frame = spark.createDataFrame(rows, "image_id string, vec array<float>")
    expected = vision.near_duplicates(frame, 0.9, feature_cols="vec").collect()
    assert [(r.id_a, r.id_b) for r in expected] == [("a", "b")]
    with pytest.warns(DeprecationWarning, match="features_col= is deprecated, use feature_cols="):
        old = vision.near_duplicates(frame, 0.9, features_col="vec").collect()
    assert old == expected
    # the alias reaches embed's own checks (the bad batch size), not a TypeError
    renamed = pytest.warns(DeprecationWarning, match="features_col= is deprecated, use output_col=")
    with renamed, pytest.raises(ValueError, match="batch_size=0"):
        vision.embed(frame.withColumnRenamed("image_id", "path"), features_col="e", batch_size=0)


def test_forecaster_history_is_the_one_name_and_history_underscore_warns():
    from deepspark.timeseries import SeasonalNaiveForecaster, TSDataset

    frame = pd.DataFrame({"ds": pd.date_range("2000-01", periods=30, freq="MS"), "y": 1.0})
    forecaster = SeasonalNaiveForecaster(season=12, horizon=2)
    forecaster.fit(TSDataset.from_pandas(frame, dt_col="ds", target_col="y"))
    assert isinstance(forecaster.history, pd.DataFrame)
    with pytest.warns(DeprecationWarning, match="use SeasonalNaiveForecaster.history"):
        assert forecaster.history_ is forecaster.history


# --- predict: the same arguments, in the same order, in both entries ----------------------------


def test_both_predicts_take_the_same_keyword_only_arguments():
    from deepspark.inference import predict

    def after_features(function) -> list[tuple[str, inspect._ParameterKind]]:
        parameters = list(inspect.signature(function).parameters.values())
        names = [p.name for p in parameters]
        start = names.index("feature_cols") + 1
        return [(p.name, p.kind) for p in parameters[start : start + 3]]

    keyword = inspect.Parameter.KEYWORD_ONLY
    expected = [("output_col", keyword), ("batch_size", keyword), ("num_workers", keyword)]
    assert after_features(ds.Estimator.predict) == expected
    assert after_features(predict)[:2] == expected[:2]
    assert ("num_workers", keyword) in [
        (p.name, p.kind) for p in inspect.signature(predict).parameters.values()
    ]


@pytest.mark.slow  # old names on Spark jobs: the full suite
def test_old_positional_predict_calls_keep_their_meaning_with_a_warning(spark):
    df = _frame(spark, rows=16, partitions=2)
    est = ds.Estimator.from_torch(model=_linear())
    expected = est.predict(df, "x", output_col="score", batch_size=3).orderBy("id").collect()

    # Estimator.predict's old order: batch_size, then output_col
    with pytest.warns(
        DeprecationWarning, match=r"^Estimator.predict: pass batch_size=, output_col="
    ):
        old_estimator = est.predict(df, "x", 3, "score")
    # deepspark.predict's old order: output_col, then batch_size
    with pytest.warns(DeprecationWarning, match=r"^predict: pass output_col=, batch_size="):
        old_function = ds.predict(df, est.get_model(), "x", "score", 3)
    for scored in (old_estimator, old_function):
        assert "score" in scored.columns
        assert scored.orderBy("id").collect() == expected

    with pytest.raises(TypeError, match="batch_size given by position and by keyword"):
        est.predict(df, "x", 3, batch_size=4)
    with pytest.raises(TypeError, match="pass the others by keyword"):
        est.predict(df, "x", 3, "score", "extra")


@pytest.mark.slow  # old names on Spark jobs: the full suite
def test_predict_takes_num_workers_as_evaluate_does(spark):
    df = _frame(spark, rows=64, partitions=4)
    est = ds.Estimator.from_torch(
        model=_linear(), optimizer=lambda p: torch.optim.SGD(p, 0.1), loss=torch.nn.MSELoss()
    )
    everywhere = est.predict(df, "x")
    one_task = est.predict(df, "x", num_workers=1)
    tasks = one_task.select(F.spark_partition_id().alias("task")).distinct().count()
    assert tasks == 1
    assert everywhere.select(F.spark_partition_id()).distinct().count() == 4
    one_rows, all_rows = one_task.orderBy("id").collect(), everywhere.orderBy("id").collect()
    # the same rows; a prediction may differ in the last bits, as one task batches other rows
    assert [row[:-1] for row in one_rows] == [row[:-1] for row in all_rows]
    np.testing.assert_allclose(
        [row.prediction for row in one_rows], [row.prediction for row in all_rows], rtol=1e-6
    )
    # a pandas frame (through Spark and back) and deepspark.predict take it too
    frame = df.orderBy("id").toPandas()
    pandas_scored = est.predict(frame, "x", num_workers=2)
    expected = np.array([row.prediction for row in everywhere.orderBy("id").collect()])
    np.testing.assert_allclose(pandas_scored["prediction"].to_numpy(), expected, rtol=1e-6)
    assert ds.predict(df, est.get_model(), "x", num_workers=2).count() == 64
    with pytest.raises(ValueError, match="num_workers=0"):
        est.predict(df, "x", num_workers=0)


# --- errors -------------------------------------------------------------------------------------


def _error_classes() -> dict[str, type]:
    """Every exception class defined in a deepspark module that imports here."""
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(ds.__path__, prefix="deepspark."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            continue
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("deepspark.")
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def test_every_error_class_is_a_deepspark_error_and_keeps_its_builtin_base():
    classes = _error_classes()
    names = {cls.__name__ for cls in classes.values()}
    assert {"TrainingError", "RunError", "WorkerEnvironmentError", "QuantizationError"} <= names
    not_ours = sorted(
        name for name, cls in classes.items() if not issubclass(cls, ds.DeepsparkError)
    )
    assert not_ours == [], not_ours
    from deepspark.data.spec import FeedError
    from deepspark.inference import QuantizationError

    assert issubclass(FeedError, ValueError) and issubclass(ds.TrainingError, RuntimeError)
    assert issubclass(QuantizationError, RuntimeError)
    assert "DeepsparkError" in ds.__all__


def test_a_refused_fit_is_caught_as_a_deepspark_error_and_as_its_builtin(spark):
    est = ds.Estimator.from_torch(
        model=_linear(), optimizer=lambda p: torch.optim.SGD(p, 0.1), loss=torch.nn.MSELoss()
    )
    features = np.zeros((8, FEATURES), dtype=np.float32)
    features[0, 0] = np.nan
    data = {"x": features, "y": np.zeros((8, 1), dtype=np.float32)}
    with pytest.raises(ds.DeepsparkError) as raised:
        est.fit(data, "x", "y", epochs=1, progress=False)
    assert "non-finite" in str(raised.value) and isinstance(
        raised.value, (ValueError, RuntimeError)
    )


# --- output -------------------------------------------------------------------------------------


def test_a_fit_prints_its_epochs_but_no_timeline_line(spark, capfd):
    est = ds.Estimator.from_torch(
        model=_linear(), optimizer=lambda p: torch.optim.SGD(p, 0.1), loss=torch.nn.MSELoss()
    )
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(64, FEATURES)).astype(np.float32)}
    data["y"] = data["x"].sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the current names warn nothing
        # PySpark 3.5's own version checks use distutils' deprecated LooseVersion
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pyspark")
        est.fit(data, "x", "y", epochs=2, batch_size=16, num_workers=2, progress=True)
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert "epoch 2/2" in text  # the progress lines are there
    assert "timeline" not in text, text[-2000:]
    assert est.timings_["total"] > 0  # the timeline is kept where it belongs
