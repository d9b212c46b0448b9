"""The PySpark releases deepspark supports: results reach the driver as Arrow on 3.5 and 4.x,
and a capability that needs a newer release refuses up front, naming it."""

from __future__ import annotations

import datetime

import numpy as np
import pyarrow as pa
import pytest

import deepspark as ds
from deepspark.context.spark_versions import (
    PySparkVersionError,
    collect_arrow,
    frame_from_arrow,
    partition_keys,
    pyspark_version,
    repartition_by_rank,
    require_pyspark,
    spark_int_hash,
)


def test_collect_arrow_gives_the_rows_and_the_schema_even_when_empty(spark):
    df = spark.createDataFrame(
        [(1, [0.5, 1.5], "a"), (2, [2.5, 3.5], "b")], "id long, xs array<double>, toArrow string"
    )
    table = collect_arrow(df)
    assert table.column("id").to_pylist() == [1, 2]
    assert table.column("xs").to_pylist() == [[0.5, 1.5], [2.5, 3.5]]
    assert table.column("toArrow").to_pylist() == ["a", "b"]  # a column, not the method
    empty = collect_arrow(df.where("id > 10"))
    assert empty.num_rows == 0
    assert empty.schema.field("xs").type == pa.list_(pa.float64())


def test_a_capability_needing_a_newer_pyspark_refuses_naming_the_release():
    newer = (pyspark_version()[0] + 1, 0)
    with pytest.raises(PySparkVersionError, match=rf"AutoFoo needs PySpark >= {newer[0]}\.0"):
        require_pyspark(newer, "AutoFoo")
    require_pyspark((3, 5), "the core")  # the oldest supported release passes


@pytest.mark.skipif(pyspark_version() >= (4, 0), reason="PySpark 3.5 only")
def test_connect_on_pyspark_35_is_refused_before_a_session_starts():
    ds.stop_context()  # a running session would be returned as it is
    with pytest.raises(PySparkVersionError, match=r"Spark Connect .* needs PySpark >= 4\.0"):
        ds.init_context("connect", master="sc://127.0.0.1:1")


def test_an_arrow_table_becomes_a_frame_of_spark_types_rows_in_order(spark):
    stamps = pa.array(
        [datetime.datetime(2024, 6, 1, hour) for hour in range(5)], pa.timestamp("ns")
    )
    table = pa.table(
        {
            "pixels": pa.array([[i, i + 1] for i in range(5)], pa.list_(pa.int16())),
            "flag": pa.array([True, False, True, False, True]),
            "name": pa.array(list("abcde")),
            "time": stamps,
        }
    )
    sliced = pa.Table.from_batches(table.to_batches(max_chunksize=2))  # 3 batches
    frame = frame_from_arrow(spark, sliced)
    assert frame.schema.simpleString() == (
        "struct<pixels:array<smallint>,flag:boolean,name:string,time:timestamp>"
    )
    back = collect_arrow(frame)  # the rows in their order
    assert back.column("pixels").to_pylist() == table.column("pixels").to_pylist()
    assert back.column("name").to_pylist() == list("abcde")
    assert [t.replace(tzinfo=None) for t in back.column("time").to_pylist()] == (stamps.to_pylist())
    empty = frame_from_arrow(spark, table.slice(0, 0))
    assert empty.count() == 0 and empty.columns == table.column_names


def test_rows_reach_the_partition_their_rank_names(spark):
    # the stand-in keys (Spark < 4.1) follow Spark's own hash, which SQL's hash() shows
    values = list(range(-50, 200))
    hashed = spark.createDataFrame([(v,) for v in values], "v int").selectExpr("hash(v) AS h")
    assert [row.h for row in hashed.collect()] == [spark_int_hash(v) for v in values]
    for ranks in (1, 2, 3, 7):
        assert [spark_int_hash(key) % ranks for key in partition_keys(ranks)] == list(range(ranks))

    ranks = 3
    rank_of_row = np.random.default_rng(0).integers(0, ranks, 300)
    rows = spark.createDataFrame([(int(r),) for r in rank_of_row], "rank int")
    moved = repartition_by_rank(rows, ranks, "rank").selectExpr(
        "rank", "spark_partition_id() AS partition"
    )
    found = moved.collect()
    assert len(found) == 300 and all(row.rank == row.partition for row in found)
