"""The feed on a real Spark session: driver-side checks and the worker code inside tasks."""

from __future__ import annotations

import json
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pytest

from deepspark.context.spark_versions import collect_arrow
from deepspark.data import ColumnKind, FeedError, batch_to_tensors, resolve_specs

ROWS = [
    # a, b, c, label, img (2x2), raw (2 int16), text, target
    (1.0, 0.0, 0.0, 1, [1.0, 2.0, 3.0, 4.0], np.array([1, 2], np.int16).tobytes(), "a b", 0.5),
    (0.0, 2.0, 3.0, 0, [5.0, 6.0, 7.0, 8.0], np.array([3, 4], np.int16).tobytes(), "b", 1.5),
    (4.0, 5.0, 6.0, 2, [9.0, 1.0, 2.0, 3.0], np.array([5, 6], np.int16).tobytes(), "c a", 2.5),
]
SCHEMA = (
    "a double, b double, c double, label int, img array<float>, raw binary, text string, "
    "target double"
)


def decode_raw(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int16)


def tokenize(text: str) -> list[int]:
    ids = [ord(token) - ord("a") + 1 for token in text.split()]
    return [*ids, 0, 0, 0][:3]


@pytest.fixture
def frame(spark):
    from pyspark.ml.feature import VectorAssembler

    df = spark.createDataFrame(ROWS, SCHEMA)
    return VectorAssembler(inputCols=["a", "b", "c"], outputCol="features").transform(df)


def test_resolve_specs_reads_kinds_shapes_and_dtypes_from_a_real_dataframe(frame):
    features = resolve_specs(
        frame,
        ["features", "img", ["a", "b"], "raw", "text"],
        role="feature",
        shapes={"img": (1, 2, 2)},
        decoders={"raw": decode_raw, "text": tokenize},
    )
    kinds = [(s.kind, s.shape, s.dtype) for s in features]
    assert kinds == [
        (ColumnKind.VECTOR, (3,), "float32"),
        (ColumnKind.ARRAY, (1, 2, 2), "float32"),
        (ColumnKind.SCALAR, (2,), "float32"),
        (ColumnKind.BINARY, (2,), "float32"),  # shape from the decoder's first output
        (ColumnKind.STRING, (3,), "float32"),
    ]
    labels = resolve_specs(frame, ["label", "target"], role="label")
    assert [(s.columns, s.dtype) for s in labels] == [
        (("label",), "int64"),
        (("target",), "float32"),
    ]
    assert resolve_specs(frame, "label", role="label", dtypes={"label": "float32"})[0].dtype == (
        "float32"
    )
    assert resolve_specs(frame, None, role="label") == ()

    # The same specs convert what a task receives; VectorAssembler wrote sparse rows too.
    table = collect_arrow(frame)
    vectors, images, stacked, raw, text = batch_to_tensors(table, features)
    assert vectors.tolist() == [[1, 0, 0], [0, 2, 3], [4, 5, 6]]
    assert images.shape == (3, 1, 2, 2) and images[2, 0, 0].tolist() == [9.0, 1.0]
    assert stacked.tolist() == [[1, 0], [0, 2], [4, 5]]
    assert raw.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert text.tolist() == [[1, 2, 0], [2, 0, 0], [3, 1, 0]]


def test_array_shape_is_taken_from_the_first_row(frame):
    (spec,) = resolve_specs(frame, "img", role="feature")
    assert spec.shape == (4,)


@pytest.mark.parametrize(
    ("cols", "kwargs", "match"),
    [
        ("nope", {}, r"feature_cols: column 'nope' is not in the DataFrame; available columns: a,"),
        ("Label", {}, r"did you mean 'label'"),
        ("raw", {}, r"feature_cols: column 'raw' is a binary column and needs a decode"),
        ("img", {"shapes": {"img": (3, 3)}}, r"feature_cols: column 'img' is ragged: expected"),
        (["features", ["a", "img"]], {}, r"\['img'\] is not scalar"),
        ("img", {"shapes": {"imgg": (4,)}}, r"feature_shapes: \['imgg'\] is not a DataFrame col"),
        ("img", {"dtypes": {("a", "z"): "float64"}}, r"dtypes: \[\('a', 'z'\)\] is not"),
        ("features", {"shapes": {"features": (5,)}}, r"expected 5 \(shape \(5,\)\)"),
        ([], {}, r"feature_cols is empty"),
        (
            "raw",
            {"decoders": {"raw": lambda data: np.zeros(data[0])}},
            r"'raw'.*decode function returned shape",
        ),
    ],
)
def test_resolve_specs_refuses_with_the_argument_named(frame, cols, kwargs, match):
    with pytest.raises(FeedError, match=match):
        resolve_specs(frame, cols, role="feature", **kwargs)


def test_resolve_specs_refuses_unsupported_types_and_nulls(spark):
    df = spark.createDataFrame(
        [(1, ["a"], Decimal("1.50"), None), (2, ["b"], Decimal("2.50"), 3.0)],
        "id int, tags array<string>, price decimal(5,2), score double",
    )
    with pytest.raises(FeedError, match=r"label_cols: column 'tags' is array<string>"):
        resolve_specs(df, "tags", role="label")
    with pytest.raises(FeedError, match=r"'price' is decimal\(5,2\); cast it to double"):
        resolve_specs(df, "price", role="feature")
    with pytest.raises(FeedError, match=r"feature_cols: column 'score' has 1 null values"):
        resolve_specs(df, "score", role="feature")


def _uneven_frame(spark):
    """Two range partitions, 500 and 200 rows; every fifth row is validation data."""
    from pyspark.sql import functions as F

    df = spark.range(0, 1000, 1, 2).where(~((F.col("id") >= 500) & (F.col("id") < 800)))
    x = F.array(*[F.col("id").cast("float")] * 4)
    return df.select("id", x.alias("x"), (F.col("id") % 5 == 0).cast("int").alias("split"))


def test_tasks_spill_and_iterate_their_partitions_in_a_barrier_job(spark):
    df = _uneven_frame(spark)
    features = resolve_specs(df, ["x"], role="feature")
    labels = resolve_specs(df, ["id"], role="label")
    batch_size, epochs = 64, 2

    def train_like(batches):
        import os

        import torch
        from pyspark import BarrierTaskContext

        from deepspark.data import PartitionSpill, plan_steps

        context = BarrierTaskContext.get()
        rank = context.partitionId()
        local_dirs = os.environ.get("SPARK_LOCAL_DIRS", "")
        records = []
        with PartitionSpill.write(batches, split_column="split") as spill:
            directory = spill.directory
            hello = json.dumps([rank, spill.num_rows(0)])
            counts = sorted(json.loads(message) for message in context.allGather(hello))
            plan = plan_steps([rows for _, rows in counts], batch_size)
            for epoch in range(epochs):
                batches_seen = spill.epoch(
                    features, labels, plan=plan, rank=rank, epoch=epoch, seed=11
                )
                for step, batch in enumerate(batches_seen):
                    ids = batch.labels[0]
                    aligned = torch.equal(batch.features[0][:, 0], ids.to(torch.float32))
                    real = ids[: batch.num_real].tolist()
                    records.append(
                        ["train", epoch, step, len(batch), batch.num_real, real, aligned]
                    )
            validation = [
                int(i)
                for b in spill.ordered(features, labels, batch_size=50, split=1)
                for i in b.labels[0]
            ]
            records.append(["validation", 0, 0, len(validation), 0, validation, True])
        under_local = any(directory.startswith(d) for d in local_dirs.split(",") if d)
        records.append(
            ["cleanup", 0, 0, int(os.path.exists(directory)), int(under_local), [], True]
        )
        names = ["kind", "epoch", "step", "size", "num_real", "ids", "aligned"]
        columns = list(zip(*records, strict=True))
        data = {name: list(column) for name, column in zip(names, columns, strict=True)}
        data["rank"] = [rank] * len(records)
        yield pa.RecordBatch.from_pydict(data)

    schema = (
        "kind string, epoch long, step long, size long, num_real long, ids array<long>, "
        "aligned boolean, rank long"
    )
    rows = df.mapInArrow(train_like, schema, barrier=True).collect()

    train_ids = sorted(i for i in [*range(500), *range(800, 1000)] if i % 5 != 0)
    for epoch in range(epochs):
        train = [r for r in rows if r.kind == "train" and r.epoch == epoch]
        steps = {rank: [r for r in train if r.rank == rank] for rank in (0, 1)}
        assert len(steps[0]) == len(steps[1]) == -(-400 // 32)  # the larger partition's steps
        assert all(r.size == 32 and r.aligned for r in train)
        assert sorted(i for r in train for i in r.ids) == train_ids  # each row exactly once
    first = [i for r in rows if r.kind == "train" and r.epoch == 0 and r.rank == 0 for i in r.ids]
    second = [i for r in rows if r.kind == "train" and r.epoch == 1 and r.rank == 0 for i in r.ids]
    assert first != second  # reshuffled
    validation = {r.rank: r.ids for r in rows if r.kind == "validation"}
    assert validation[0] == list(range(0, 500, 5))
    assert validation[1] == list(range(800, 1000, 5))
    cleanup = [r for r in rows if r.kind == "cleanup"]
    assert len(cleanup) == 2 and all(r.size == 0 and r.num_real == 1 for r in cleanup)


def test_inference_tasks_stream_batches_in_order(spark):
    df = _uneven_frame(spark)
    features = resolve_specs(df, "x", role="feature")

    def score(batches):
        from deepspark.data import iter_batches

        for batch in iter_batches(batches, features, batch_size=37):
            (x,) = batch.features
            yield pa.record_batch({"score": x.sum(dim=1).numpy().astype(np.float64)})

    scored = df.select("id", "x").mapInArrow(score, "score double").collect()
    expected = [4.0 * i for i in [*range(500), *range(800, 1000)]]
    assert [r.score for r in scored] == expected
