"""The PySpark releases deepspark supports: results reach the driver as Arrow on 3.5 and 4.x,
and a capability that needs a newer release refuses up front, naming it."""

from __future__ import annotations

import pyarrow as pa
import pytest

import deepspark as ds
from deepspark.context.spark_versions import (
    PySparkVersionError,
    collect_arrow,
    pyspark_version,
    require_pyspark,
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
