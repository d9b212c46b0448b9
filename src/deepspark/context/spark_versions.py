"""What differs between the PySpark releases deepspark supports (3.5 and 4.x), answered once.

Driver side. The core (fit, evaluate, predict, the Spark ML stages) runs on PySpark 3.5 as well
as 4.x; the few calls that 4.0 added are bridged here, and a capability that needs a newer
release refuses up front with `require_pyspark`, naming the release it needs.

Examples
--------
>>> from deepspark.context.spark_versions import pyspark_version
>>> pyspark_version() >= (3, 5)
True
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from deepspark.errors import DeepsparkError

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark import SparkContext
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "PySparkVersionError",
    "collect_arrow",
    "frame_from_arrow",
    "ml_io_session",
    "pyspark_version",
    "repartition_by_rank",
    "require_pyspark",
]


class PySparkVersionError(DeepsparkError, RuntimeError):
    """A capability needs a newer PySpark than the one installed."""


def pyspark_version() -> tuple[int, int]:
    """The installed PySpark's (major, minor) release: the client's, which sets the API."""
    import pyspark

    found = re.match(r"(\d+)\.(\d+)", pyspark.__version__)
    if found is None:  # a development build without a release number: the newest API
        return (99, 0)
    return int(found.group(1)), int(found.group(2))


def require_pyspark(minimum: tuple[int, int], capability: str) -> None:
    """Refuse `capability` before it starts when PySpark is older than `minimum`.

    Raises
    ------
    PySparkVersionError
        Naming the capability, the release it needs and the one installed.
    """
    import pyspark

    if pyspark_version() < minimum:
        needed = ".".join(str(part) for part in minimum)
        raise PySparkVersionError(
            f"{capability} needs PySpark >= {needed}, but PySpark {pyspark.__version__} is "
            f"installed; run `pip install 'pyspark>={needed}'` (fit, evaluate, predict and the "
            "Spark ML stages also run on PySpark 3.5)"
        )


def collect_arrow(df: DataFrame) -> pa.Table:
    """A DataFrame's rows on the driver as one pyarrow Table, on every supported PySpark.

    ``DataFrame.toArrow`` is new in PySpark 4.0; on 3.5 a classic DataFrame collects its Arrow
    batches (``_collect_as_arrow``, what ``toPandas`` uses) and a Connect DataFrame asks its
    client for the table (what its ``toPandas`` uses). Only for results that fit in the
    driver's memory.
    """
    # The class, not the instance: a classic DataFrame answers unknown attributes with its
    # columns, so a column named "toArrow" would look like the method.
    if getattr(type(df), "toArrow", None) is not None:
        return df.toArrow()
    if type(df).__module__.startswith("pyspark.sql.connect"):
        client = df._session.client
        table, _ = client.to_table(df._plan.to_proto(client))
        return table
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = to_arrow_schema(df.schema)
    batches = df._collect_as_arrow()
    if not batches:
        return schema.empty_table()
    return pa.Table.from_batches(batches).cast(schema)


def frame_from_arrow(spark: SparkSession, table: pa.Table) -> DataFrame:
    """`table` as a Spark DataFrame, rows in order, on every supported PySpark.

    ``createDataFrame`` takes a pyarrow Table from PySpark 4.0. On 3.5 the batches go to the
    JVM as one Arrow stream, as 3.5's own ``createDataFrame(pandas_df)`` sends its slices, but
    without the round trip through pandas; the JVM keeps them as a local relation, spread over
    the default parallelism. Connect is refused before 4.0, so this is a classic session.
    """
    if pyspark_version() >= (4, 0):
        return spark.createDataFrame(table)
    from pyspark.sql import DataFrame
    from pyspark.sql.pandas.serializers import ArrowStreamSerializer
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    schema = from_arrow_schema(table.schema)
    # Spark's own Arrow types: its JVM reads timestamps as microseconds in UTC
    batches = [batch for batch in table.cast(to_arrow_schema(schema)).to_batches() if batch]
    if not batches:
        return spark.createDataFrame([], schema)
    jvm = spark._jvm
    rows = spark.sparkContext._serialize_to_jvm(
        batches,
        ArrowStreamSerializer(),
        lambda path: jvm.PythonSQLUtils.readArrowStreamFromFile(path),
        lambda: jvm.ArrowIteratorServer(),
    )
    return DataFrame(
        jvm.PythonSQLUtils.toDataFrame(rows, schema.json(), spark._jsparkSession), spark
    )


def ml_io_session(spark: SparkSession) -> SparkSession | SparkContext:
    """What Spark ML's ``DefaultParamsWriter.saveMetadata``/``DefaultParamsReader.loadMetadata``
    take: the session from PySpark 4.0 (Connect has no SparkContext), its SparkContext on 3.5."""
    return spark if pyspark_version() >= (4, 0) else spark.sparkContext


def repartition_by_rank(df: DataFrame, num_ranks: int, rank_column: str) -> DataFrame:
    """`df`'s rows moved, with one shuffle, to the partition that `rank_column` names.

    `rank_column` holds ints in ``[0, num_ranks)``. ``DataFrame.repartitionById`` is new in
    Spark 4.1. Before it, a hash repartition does the same on a stand-in key: Spark places a
    row in partition ``pmod(murmur3(key, seed 42), num_ranks)`` (``HashPartitioning``, the
    same hash as SQL's ``hash``), so each rank's key is an int whose hash lands on that rank.
    """
    if getattr(type(df), "repartitionById", None) is not None:
        return df.repartitionById(num_ranks, rank_column)
    from pyspark.sql import functions as F

    keys = F.array(*[F.lit(key) for key in partition_keys(num_ranks)])
    return df.repartition(num_ranks, F.element_at(keys, F.col(rank_column) + 1))


def partition_keys(num_partitions: int) -> list[int]:
    """For each partition, the least int key that Spark's hash partitioning sends there."""
    keys: dict[int, int] = {}
    candidate = 0
    while len(keys) < num_partitions:
        keys.setdefault(spark_int_hash(candidate) % num_partitions, candidate)
        candidate += 1
    return [keys[partition] for partition in range(num_partitions)]


def spark_int_hash(value: int, seed: int = 42) -> int:
    """Spark's ``hash`` of an int column's value: Murmur3 x86 32-bit of its 4 bytes, signed."""
    mask = 0xFFFFFFFF

    def rotate_left(word: int, bits: int) -> int:
        return ((word << bits) | (word >> (32 - bits))) & mask

    block = rotate_left((value & mask) * 0xCC9E2D51 & mask, 15) * 0x1B873593 & mask
    state = (rotate_left(seed ^ block, 13) * 5 + 0xE6546B64) & mask
    state ^= 4  # the input's length in bytes
    state = (state ^ (state >> 16)) * 0x85EBCA6B & mask
    state = (state ^ (state >> 13)) * 0xC2B2AE35 & mask
    state ^= state >> 16
    return state - (1 << 32) if state >= 1 << 31 else state
