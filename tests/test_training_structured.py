"""Models that are not one tensor in, one tensor out: dict and tuple outputs, dict inputs from
a ``feature_cols`` dict or a struct column, several labels (a tuple or a dict), trained, evaluated
and predicted on real Spark jobs with two workers, on real digits data."""

from __future__ import annotations

import sys

import cloudpickle
import numpy as np
import pyarrow as pa
import pytest
import torch
from pyspark.sql import functions as F
from sklearn import metrics as skm

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import digits_frames
from deepspark.context.spark_versions import collect_arrow
from deepspark.data import FeedError, resolve_specs
from deepspark.training.rank.metric_routing import build_metrics, update_metrics
from deepspark.training.rank.metrics import reduce_metrics

# Spark's Python workers cannot import the tests folder: ship this module and the helpers by
# value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(helpers)

EPOCHS, BATCH, LR = 4, 64, 1e-2


class TwoHeads(torch.nn.Module):
    """A digit head and an odd/even head on one trunk: a dict, or a tuple of the two."""

    def __init__(self, as_tuple: bool = False) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.trunk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
        self.digit = torch.nn.Linear(64, 10)
        self.parity = torch.nn.Linear(64, 2)

    def forward(self, x: torch.Tensor):
        hidden = self.trunk(x)
        if self.as_tuple:
            return self.digit(hidden), self.parity(hidden)
        return {"logits": self.digit(hidden), "parity": self.parity(hidden)}


class SplitNet(torch.nn.Module):
    """Takes one dict argument: the digit's top and bottom halves (32 pixels each)."""

    def __init__(self) -> None:
        super().__init__()
        self.top = torch.nn.Linear(32, 32)
        self.bottom = torch.nn.Linear(32, 32)
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, halves: dict[str, torch.Tensor]) -> torch.Tensor:
        joined = torch.cat([self.top(halves["top"]), self.bottom(halves["bottom"])], dim=1)
        return self.head(joined)


class TupleLabelsLoss(torch.nn.Module):
    """Both heads' cross-entropy; insists on a dict output and a (digit, parity) label tuple."""

    def forward(self, outputs, labels):
        assert isinstance(outputs, dict), type(outputs)
        assert isinstance(labels, tuple) and len(labels) == 2, type(labels)
        digit, parity = labels
        cross_entropy = torch.nn.functional.cross_entropy
        return cross_entropy(outputs["logits"], digit) + cross_entropy(outputs["parity"], parity)


class DictLabelsLoss(torch.nn.Module):
    """The same on a tuple output and a label dict ``{"digit": ..., "odd": ...}``."""

    def forward(self, outputs, labels):
        assert isinstance(outputs, tuple), type(outputs)
        assert isinstance(labels, dict) and sorted(labels) == ["digit", "odd"], labels
        cross_entropy = torch.nn.functional.cross_entropy
        return cross_entropy(outputs[0], labels["digit"]) + cross_entropy(outputs[1], labels["odd"])


def structured_frames(spark):
    """Digits with ``parity`` (label % 2), the pixels' halves ``top`` and ``bottom``, and a
    struct ``halves`` holding both."""

    def extend(df):
        return df.select(
            "features",
            "label",
            (F.col("label") % 2).alias("parity"),
            F.slice("features", 1, 32).alias("top"),
            F.slice("features", 33, 32).alias("bottom"),
        ).withColumn("halves", F.struct("top", "bottom"))

    train_df, test_df = digits_frames(spark)
    return extend(train_df), extend(test_df)


def estimator(model: torch.nn.Module, loss, metrics) -> ds.Estimator:
    return ds.Estimator.from_torch(
        model=model,
        optimizer=lambda params: torch.optim.Adam(params, lr=LR),
        loss=loss,
        metrics=metrics,
    )


def fit(est: ds.Estimator, train_df, test_df, feature_cols, label_cols):
    return est.fit(
        train_df,
        feature_cols=feature_cols,
        label_cols=label_cols,
        epochs=EPOCHS,
        batch_size=BATCH,
        validation_data=test_df,
        num_workers=2,
        seed=0,
    )


def rows_of(df, *columns: str) -> dict[str, np.ndarray]:
    table = collect_arrow(df.select(*columns))
    return {name: np.asarray(table.column(name).to_pylist()) for name in columns}


# --- dict outputs, several labels, metrics that name an output --------------------------------


@pytest.mark.slow
def test_a_two_head_model_trains_evaluates_and_predicts_a_column_per_head(spark):
    train_df, test_df = structured_frames(spark)
    torch.manual_seed(0)
    est = estimator(
        TwoHeads(), TupleLabelsLoss(), metrics={"accuracy": "logits", "f1": ("parity", 1)}
    )
    history = fit(est, train_df, test_df, "features", ["label", "parity"])
    assert {"train_accuracy", "val_accuracy", "val_f1"} <= set(history.columns)
    assert history["val_accuracy"].iloc[-1] >= 0.9

    scores = est.evaluate(test_df, "features", ["label", "parity"], num_workers=2)
    # one column per head, named by its key ("parity" the label column is renamed first)
    predicted = est.predict(test_df.withColumnRenamed("parity", "odd"))
    assert predicted.columns[-2:] == ["logits", "parity"]
    rows = rows_of(predicted, "features", "label", "odd", "logits", "parity")
    digits, odd = rows["logits"].argmax(1), rows["parity"].argmax(1)

    # evaluate's exact values over both ranks equal scikit-learn's on predict's columns
    assert scores["accuracy"] == pytest.approx(skm.accuracy_score(rows["label"], digits), 1e-12)
    assert scores["f1"] == pytest.approx(skm.f1_score(rows["odd"], odd, average="macro"), 1e-12)
    assert scores["accuracy"] >= 0.9
    assert skm.accuracy_score(rows["odd"], odd) >= 0.9

    # the columns are the trained model's heads
    with torch.no_grad():
        local = est.get_model().eval()(torch.from_numpy(rows["features"].astype(np.float32)))
    assert (local["logits"].argmax(1).numpy() == digits).all()
    np.testing.assert_allclose(rows["logits"], local["logits"].numpy(), rtol=1e-5, atol=1e-5)


# --- tuple outputs, a label dict, output_cols -------------------------------------------------


@pytest.mark.slow
def test_a_tuple_output_model_trains_on_a_label_dict_and_names_its_columns(spark):
    train_df, test_df = structured_frames(spark)
    torch.manual_seed(1)
    est = estimator(
        TwoHeads(as_tuple=True),
        DictLabelsLoss(),
        metrics={"accuracy": [(0, "digit"), (1, "odd")]},
    )
    labels = {"digit": "label", "odd": "parity"}
    history = fit(est, train_df, test_df, "features", labels)
    assert history["val_output_0_accuracy"].iloc[-1] >= 0.9
    assert history["val_output_1_accuracy"].iloc[-1] >= 0.9

    model = est.get_model()
    named = ds.predict(
        test_df, model, "features", output_cols=["digit", "odd"], output="class"
    ).select("label", "parity", "digit", "odd")
    assert named.schema.simpleString() == "struct<label:bigint,parity:bigint,digit:int,odd:int>"
    rows = rows_of(named, "label", "parity", "digit", "odd")
    accuracy = skm.accuracy_score(rows["label"], rows["digit"])
    assert accuracy == pytest.approx(history["val_output_0_accuracy"].iloc[-1], abs=1e-12)
    assert skm.accuracy_score(rows["parity"], rows["odd"]) >= 0.9

    # default names, and the same DataFrame on both predict paths
    results = {}
    for path in ("arrow_udf", "mapInArrow"):
        spark.conf.set("deepspark.predict.path", path)
        try:
            scored = ds.predict(
                test_df, model, "features", output={1: "class"}, passthrough_cols=["label"]
            )
        finally:
            spark.conf.unset("deepspark.predict.path")
        results[path] = (scored.schema.simpleString(), scored.collect())
    assert results["arrow_udf"] == results["mapInArrow"]
    assert results["mapInArrow"][0] == (
        "struct<label:bigint,prediction_0:array<float>,prediction_1:int>"
    )


# --- dict inputs: a feature_cols dict, a struct column -----------------------------------------


@pytest.mark.slow
def test_a_feature_cols_dict_calls_forward_with_one_dict(spark):
    train_df, test_df = structured_frames(spark)
    torch.manual_seed(2)
    est = estimator(SplitNet(), torch.nn.CrossEntropyLoss(), metrics=["accuracy"])
    halves = {"top": "top", "bottom": ["bottom"]}
    history = fit(est, train_df, test_df, halves, "label")
    assert history["val_accuracy"].iloc[-1] >= 0.9

    scored = est.predict(test_df, output="class")  # the fit's feature_cols dict
    rows = rows_of(scored, "label", "prediction", "top", "bottom")
    assert skm.accuracy_score(rows["label"], rows["prediction"]) == pytest.approx(
        history["val_accuracy"].iloc[-1], abs=1e-12
    )
    with torch.no_grad():
        local = est.get_model().eval()(
            {name: torch.from_numpy(rows[name].astype(np.float32)) for name in ("top", "bottom")}
        )
    assert (local.argmax(1).numpy() == rows["prediction"]).all()


@pytest.mark.slow
def test_a_struct_column_becomes_a_dict_of_its_fields(spark):
    train_df, test_df = structured_frames(spark)
    torch.manual_seed(3)
    est = estimator(SplitNet(), torch.nn.CrossEntropyLoss(), metrics=["accuracy"])
    history = fit(est, train_df, test_df, "halves", "label")
    assert history["val_accuracy"].iloc[-1] >= 0.9
    scores = est.evaluate(test_df, "halves", "label", num_workers=2)
    assert scores["accuracy"] == pytest.approx(history["val_accuracy"].iloc[-1], abs=1e-12)

    # the struct and the dict of its fields' columns feed the model the same tensors
    by_struct = est.predict(test_df, "halves", output="class").select("prediction")
    by_dict = est.predict(test_df, {"top": "top", "bottom": "bottom"}, output="class")
    assert by_struct.collect() == by_dict.select("prediction").collect()


# --- checks on the driver, before any job -----------------------------------------------------


def test_driver_checks_name_what_is_wrong_before_any_job(spark):
    train_df, _ = structured_frames(spark)
    with_time = train_df.withColumn(
        "stamped", F.struct(F.col("top").alias("pixels"), F.current_timestamp().alias("when"))
    )
    with pytest.raises(FeedError, match=r"feature_cols\['image'\]: column 'pixel' is not in"):
        resolve_specs(train_df, {"text": "top", "image": "pixel"}, role="feature")
    with pytest.raises(FeedError, match=r"struct field 'stamped.when' has type timestamp"):
        resolve_specs(with_time, "stamped", role="feature")
    with pytest.raises(FeedError, match=r"feature_shapes: \['halves.left'\] is not a DataFrame"):
        resolve_specs(train_df, "halves", role="feature", shapes={"halves.left": (32,)})

    def fit_two_heads(metrics, labels=("label", "parity")):
        est = estimator(TwoHeads(), TupleLabelsLoss(), metrics)
        fit(est, train_df, None, "features", list(labels))

    with pytest.raises(ValueError, match=r"accuracy reads one output, but the model returns "):
        fit_two_heads(["accuracy"])
    with pytest.raises(ValueError, match=r"reads output 'digits', which the model's dict"):
        fit_two_heads({"accuracy": "digits"})
    with pytest.raises(ValueError, match=r"'accuracy' reads label 2, but there are 2 labels"):
        fit_two_heads({"accuracy": ("logits", 2)})
    with pytest.raises(ValueError, match=r"the labels do not suit the loss"):
        fit_two_heads({"accuracy": "logits"}, labels=["label"])
    with pytest.raises(ValueError, match=r"output_cols names 3 columns, but the model returns"):
        ds.predict(train_df, TwoHeads(), "features", output_cols=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"the prediction column 'label' \(model output 'logits'"):
        ds.predict(train_df, TwoHeads(), "features", output_cols={"logits": "label"})


# --- without Spark: metrics on several outputs, reduced exactly --------------------------------


def test_metrics_read_their_output_and_label_and_reduce_exactly():
    torch.manual_seed(0)
    logits = torch.randn(50, 4)
    values = torch.randn(50, 1)
    classes = torch.randint(0, 4, (50,))
    targets = torch.randn(50)
    metrics = build_metrics({"accuracy": ("scores", "kind"), "mse": [("value", "target")]})
    outputs = {"scores": logits, "value": values}
    labels = ({"kind": classes, "target": targets},)
    for start in range(0, 50, 16):  # batch by batch, as the loop feeds them
        rows = slice(start, start + 16)
        batch_labels = ({key: tensor[rows] for key, tensor in labels[0].items()},)
        update_metrics(metrics, {k: v[rows] for k, v in outputs.items()}, batch_labels)
    result = reduce_metrics(metrics, world_size=1)
    assert result["accuracy"] == pytest.approx(
        skm.accuracy_score(classes.numpy(), logits.argmax(1).numpy()), abs=1e-12
    )
    assert result["mse"] == pytest.approx(
        skm.mean_squared_error(targets.numpy(), values.squeeze(1).numpy()), rel=1e-6
    )
    tuple_metrics = build_metrics({"mse": 1})
    update_metrics(tuple_metrics, (logits, values), (targets,))
    assert reduce_metrics(tuple_metrics, world_size=1)["mse"] == pytest.approx(result["mse"])

    def a_accuracy(outputs, targets):  # the name a list of outputs gives "accuracy" on "a"
        return (outputs.argmax(1) == targets).double()

    with pytest.raises(ValueError, match=r"\['a_accuracy'\] would be reported more than once"):
        build_metrics({"accuracy": ["a", "b"], a_accuracy: "c"})


def test_a_batch_of_a_struct_column_is_a_dict_with_the_fields_dtypes():
    from deepspark.data import TensorSpec, iter_batches

    batch = pa.record_batch(
        {
            "meta": pa.array(
                [{"ids": [1, 2], "weight": 0.5}, {"ids": [3, 4], "weight": 1.5}],
                pa.struct([("ids", pa.list_(pa.int32())), ("weight", pa.float64())]),
            ),
            "x": pa.array([1.0, 2.0]),
        }
    )
    specs = [
        TensorSpec("x", "scalar", place=(0,)),
        TensorSpec("meta", "array", (2,), "int64", field=("ids",), place=(1, "ids")),
        TensorSpec("meta", "scalar", field=("weight",), place=(1, "weight")),
    ]
    (only,) = iter_batches([batch], specs, batch_size=8)
    x, meta = only.features
    assert x.tolist() == [1.0, 2.0]
    assert meta["ids"].dtype == torch.int64 and meta["ids"].tolist() == [[1, 2], [3, 4]]
    assert meta["weight"].tolist() == [0.5, 1.5]
    assert len(only) == 2 and only.real() is only
    nulls = pa.record_batch({"meta": pa.array([None], batch.schema.field("meta").type)})
    with pytest.raises(FeedError, match=r"column 'meta' has 1 null structs"):
        list(iter_batches([nulls], specs[1:], batch_size=8))
