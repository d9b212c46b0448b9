"""`predict`'s two Spark paths, Arrow iterator UDF and `mapInArrow`, give the same DataFrame."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import cloudpickle
import pytest
import torch
from pyspark.sql import functions

from deepspark.inference import predict

# Models defined here travel to executors that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PATH_CONF = "deepspark.predict.path"
PATHS = ("arrow_udf", "mapInArrow")
OUTPUT_KINDS = ("double", "array", "class", "probabilities")


@contextlib.contextmanager
def predict_path(spark, path: str) -> Iterator[None]:
    """`predict` calls inside take ``path``; the session's conf is restored after."""
    spark.conf.set(PATH_CONF, path)
    try:
        yield
    finally:
        spark.conf.unset(PATH_CONF)


def mixed_frame(spark, rows: int = 60, partitions: int = 3):
    """Features ``a``..``d`` (floats) and ``x`` (their array), beside columns of many types.

    Every passthrough type appears with nulls: string, array, struct, timestamp, double.
    Built from ``range`` without a shuffle, so every job sees the rows in the same order.
    """
    features = [
        f"cast((id * {k + 3}) % 11 / 5 - 1 as float) as {name}" for k, name in enumerate("abcd")
    ]
    return (
        spark.range(0, rows, 1, numPartitions=partitions)
        .selectExpr(
            "id",
            "if(id % 7 = 0, null, concat('row ', id, ' é')) as name",
            "if(id % 5 = 0, null, array(cast(id as int), null, cast(-id as int))) as tags",
            "if(id % 6 = 0, null, named_struct("
            "'n', cast(id as int), 'label', if(id % 4 = 0, null, concat('s', id)))) as info",
            "if(id % 9 = 0, null, timestamp_seconds(1796040000 + 17 * id)) as seen",
            "if(id % 3 = 0, null, id / 8) as score",
            *features,
        )
        .withColumn("x", functions.array("a", "b", "c", "d"))
    )


def make_mlp(outputs: int) -> torch.nn.Module:
    torch.manual_seed(outputs)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, outputs)
    ).eval()


def scored_on(spark, path: str, df, model, feature_cols, **options):
    with predict_path(spark, path):
        return predict(df, model, feature_cols, batch_size=7, **options)


@pytest.mark.slow
@pytest.mark.parametrize("output", OUTPUT_KINDS)
def test_both_paths_give_the_same_schema_rows_and_order(spark, output):
    df = mixed_frame(spark)
    model = make_mlp(outputs=1 if output == "double" else 3)
    results = {}
    for path in PATHS:
        scored = scored_on(spark, path, df, model, "x", output=output)
        results[path] = (scored.schema, scored.collect())
    (schema, rows), (other_schema, other_rows) = results["arrow_udf"], results["mapInArrow"]
    assert schema == other_schema
    # Every column equal, in the same order; the predictions to float32 rounding, since a
    # CPU's matmul kernel may round a row differently in batches of other sizes.
    without = [{**row.asDict(), "prediction": None} for row in rows]
    assert without == [{**row.asDict(), "prediction": None} for row in other_rows]
    torch.testing.assert_close(
        torch.tensor([row.prediction for row in rows]),
        torch.tensor([row.prediction for row in other_rows]),
        atol=1e-6,
        rtol=1e-6,
    )
    assert schema.names == [*df.columns, "prediction"]
    assert not schema["prediction"].nullable

    inputs = torch.tensor([row.x for row in rows])
    with torch.inference_mode():
        logits = model(inputs)
    expected = {
        "double": logits[:, 0].double(),
        "array": logits,
        "class": logits.argmax(dim=1).int(),
        "probabilities": torch.softmax(logits, dim=1),
    }[output]
    predicted = torch.tensor([row.prediction for row in rows], dtype=expected.dtype)
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_passthrough_columns_of_every_type_come_back_unchanged(spark):
    df = mixed_frame(spark)
    passthrough = ["id", "name", "tags", "info", "seen", "score"]
    original = df.select(*passthrough)
    expected = original.collect()
    for path in PATHS:
        scored = scored_on(spark, path, df, make_mlp(2), "x", passthrough_cols=passthrough)
        assert scored.schema.fields[:-1] == original.schema.fields, path
        rows = scored.collect()  # in partition order, the order of the input rows
        assert [tuple(row)[:-1] for row in rows] == [tuple(row) for row in expected], path


@pytest.mark.slow
def test_several_feature_columns_reach_the_udf_as_one_batch(spark):
    df = mixed_frame(spark)
    model = make_mlp(3)
    stacked = {}
    for path in PATHS:
        scored = scored_on(spark, path, df, model, [["a", "b", "c", "d"]], passthrough_cols=["id"])
        stacked[path] = scored.collect()
    assert stacked["arrow_udf"] == stacked["mapInArrow"]
    from_array = scored_on(spark, "arrow_udf", df, model, "x", passthrough_cols=["id"]).collect()
    assert stacked["arrow_udf"] == from_array


@pytest.mark.slow
def test_auto_takes_the_arrow_udf_on_spark_4_1_and_later(spark, capsys):
    df = mixed_frame(spark, rows=8, partitions=1)
    with predict_path(spark, "auto"):
        predict(df, make_mlp(1), "x").explain()
    plan = capsys.readouterr().out
    major, minor = (int(part) for part in spark.version.split(".")[:2])
    if (major, minor) >= (4, 1):
        assert "ArrowEvalPython" in plan and "MapInArrow" not in plan
    else:
        assert "MapInArrow" in plan


def test_an_unknown_path_is_refused_with_the_conf_key(spark):
    with predict_path(spark, "rdd"), pytest.raises(ValueError, match=r"deepspark\.predict\.path"):
        predict(mixed_frame(spark, rows=4, partitions=1), make_mlp(1), "x")


@pytest.mark.slow
def test_a_filter_on_the_prediction_keeps_the_rows_that_pass(spark):
    df = mixed_frame(spark)
    model = make_mlp(1)
    kept = {}
    for path in PATHS:
        scored = scored_on(spark, path, df, model, "x", passthrough_cols=["id"])
        kept[path] = sorted(row.id for row in scored.filter("prediction > 0").collect())
    assert kept["arrow_udf"] == kept["mapInArrow"]
    assert 0 < len(kept["arrow_udf"]) < df.count()


class FailsOnWorkers(torch.nn.Module):
    """Predicts on the driver (so the probe passes), raises inside Spark's Python workers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp(1)
        self.driver_pid = os.getpid()

    def forward(self, x):
        if os.getpid() != self.driver_pid:
            raise ValueError("this model refuses to run on a worker")
        return self.net(x)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_a_failing_model_names_its_error_and_partition_on_each_path(spark, path):
    scored = scored_on(
        spark, path, mixed_frame(spark, rows=20, partitions=2), FailsOnWorkers(), "x"
    )
    summary = r"deepspark predict: partition [01]: ValueError: this model refuses to run on a"
    with pytest.raises(Exception, match=summary):
        scored.collect()


@pytest.mark.slow
def test_an_action_that_does_not_read_the_prediction_skips_the_model_on_the_udf(spark):
    df = mixed_frame(spark, rows=20, partitions=2)
    # Spark prunes an unread UDF column, so the failing model never runs here ...
    assert scored_on(spark, "arrow_udf", df, FailsOnWorkers(), "x").select("id").count() == 20
    # ... while mapInArrow runs the model on every row, read or not.
    with pytest.raises(Exception, match="deepspark predict: partition"):
        scored_on(spark, "mapInArrow", df, FailsOnWorkers(), "x").select("id").count()


@pytest.mark.slow
def test_both_paths_agree_over_spark_connect(connect_spark):
    df = mixed_frame(connect_spark)
    model = make_mlp(3)
    results = {}
    for path in PATHS:
        scored = scored_on(connect_spark, path, df, model, "x", output="probabilities")
        results[path] = (scored.schema, scored.collect())
    assert results["arrow_udf"] == results["mapInArrow"]
    assert len(results["arrow_udf"][1]) == 60
