"""The two ways `predict` runs in Spark, and the functions its tasks run.

Driver side (pyspark is imported inside functions only). ``arrow_udf`` (Spark >= 4.1): an
Arrow iterator UDF receives only the feature columns; ``mapInArrow`` (Spark 3.5 and 4.0): a
non-barrier ``DataFrame.mapInArrow`` carries every column to Python and back. The session conf
``deepspark.predict.path`` chooses (`choose_path`); both give the same DataFrame. The task
functions capture one plain `PredictSpec` (and, on a stream, the `ModelVersions` directory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from deepspark.inference.versions import ModelVersions, predict_partition_versioned
from deepspark.inference.worker import (
    OutputColumn,
    OutputKind,
    PredictSpec,
    predict_arrays,
    predict_partition,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from pyspark.sql.types import DataType

__all__ = [
    "PATH_CONF",
    "choose_path",
    "feature_columns",
    "predict_with_arrow_udf",
    "predict_with_map_in_arrow",
]

# The session conf that chooses how predict runs: "auto", "arrow_udf" or "mapInArrow".
PATH_CONF = "deepspark.predict.path"
_PATHS = ("auto", "arrow_udf", "mapInArrow")
# Arrow iterator UDFs (pyspark.sql.functions.arrow_udf) arrived in Spark 4.1.
_ARROW_UDF_SINCE = (4, 1)
# What a streaming query's tasks carry as local properties: its id (kept across restarts
# from a checkpoint) and the micro-batch id.
_QUERY_ID_PROPERTY = "sql.streaming.queryId"
_BATCH_ID_PROPERTY = "streaming.sql.batchId"


def choose_path(session: Any) -> str:
    """``arrow_udf`` or ``mapInArrow``, from the ``deepspark.predict.path`` conf and the session."""
    try:
        requested = session.conf.get(PATH_CONF, "auto") or "auto"
    except Exception:  # a Connect server may refuse to read confs: choose by version
        requested = "auto"
    if requested not in _PATHS:
        raise ValueError(f"{PATH_CONF}={requested!r}: use one of {', '.join(_PATHS)}")
    supported = _arrow_udf_supported(session)
    if requested == "arrow_udf" and not supported:
        raise ValueError(
            f"{PATH_CONF}=arrow_udf needs Spark >= 4.1 (pyspark.sql.functions.arrow_udf); this "
            f"session runs Spark {session.version}. Unset the conf or set it to mapInArrow"
        )
    if requested == "auto":
        return "arrow_udf" if supported else "mapInArrow"
    return requested


def _arrow_udf_supported(session: Any) -> bool:
    """Both this pyspark and the session's Spark (a Connect server may be older) have it."""
    from pyspark.sql import functions

    if not hasattr(functions, "arrow_udf"):
        return False
    try:
        major, minor = (int(part) for part in session.version.split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return (major, minor) >= _ARROW_UDF_SINCE


def predict_with_arrow_udf(df: DataFrame, spec: PredictSpec) -> DataFrame:
    """The passthrough columns as they are, and the predictions from an Arrow iterator UDF.

    With several output columns the UDF returns one struct of them, which is then split into
    columns (Spark evaluates the UDF once per row: the struct is not a cheap expression to
    repeat, so the projections are not collapsed into one per field).
    """
    from pyspark.sql import functions
    from pyspark.sql.functions import arrow_udf
    from pyspark.sql.types import StructField, StructType

    columns = tuple(feature_columns(spec.features))
    if len(spec.outputs) == 1:
        (only,) = spec.outputs
        udf = arrow_udf(_predict_udf_fn(spec, columns), _spark_type(only.kind))
        prediction = _declared_not_null(udf(*columns), only.kind)
        return df.select(*spec.passthrough_cols, prediction.alias(only.column))
    packed_type = StructType(
        [StructField(out.column, _spark_type(out.kind), False) for out in spec.outputs]
    )
    udf = arrow_udf(_predict_udf_fn(spec, columns), packed_type)
    packed = _unused_name(df.columns, "__deepspark_outputs")
    unpacked = [
        _declared_not_null(functions.col(packed).getField(out.column), out.kind).alias(out.column)
        for out in spec.outputs
    ]
    passthrough = [functions.col(name) for name in spec.passthrough_cols]
    with_outputs = df.select(*passthrough, udf(*columns).alias(packed))
    return with_outputs.select(*passthrough, *unpacked)


def _unused_name(taken: Sequence[str], base: str) -> str:
    name, number = base, 0
    while name in taken:
        number += 1
        name = f"{base}_{number}"
    return name


def _declared_not_null(column: Any, kind: OutputKind) -> Any:
    """The column, declared non-nullable as the ``mapInArrow`` schema declares it.

    A UDF's result is always nullable to Spark; the predictions never hold a null, so the
    fallback of this ``coalesce`` is never taken and only makes the schemas of both paths equal.
    """
    from pyspark.sql import functions

    if kind is OutputKind.DOUBLE:
        fallback = functions.lit(0.0)
    elif kind is OutputKind.CLASS:
        fallback = functions.lit(0)
    else:
        fallback = functions.array().cast(_spark_type(kind))
    return functions.coalesce(column, fallback)


def predict_with_map_in_arrow(
    df: DataFrame, spec: PredictSpec, versions: ModelVersions | None = None
) -> DataFrame:
    """The passthrough and feature columns through a non-barrier ``mapInArrow``, which gives
    back the passthrough columns and the predictions (and, on a stream with ``versions``, the
    column naming each micro-batch's version)."""
    schema = _output_schema(df, spec.passthrough_cols, spec.outputs)
    selected = list(dict.fromkeys([*spec.passthrough_cols, *feature_columns(spec.features)]))
    if versions is not None and df.isStreaming:
        from pyspark.sql.types import StringType, StructField

        schema = schema.add(StructField(versions.version_col, StringType(), False))
    return df.select(*selected).mapInArrow(_predict_fn(spec, versions), schema)


def feature_columns(features: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(name for spec in features for name in spec.columns))


def _spark_type(kind: OutputKind) -> DataType:
    """The Spark type of the column `output_column` builds."""
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, IntegerType

    if kind is OutputKind.DOUBLE:
        return DoubleType()
    if kind is OutputKind.CLASS:
        return IntegerType()
    return ArrayType(FloatType(), containsNull=False)


def _output_schema(
    df: DataFrame, passthrough: Sequence[str], outputs: Sequence[OutputColumn]
) -> Any:
    from pyspark.sql.types import StructField, StructType

    fields = {field.name: field for field in df.schema.fields}
    return StructType(
        [
            *(fields[name] for name in passthrough),
            *(StructField(out.column, _spark_type(out.kind), False) for out in outputs),
        ]
    )


def _predict_fn(
    spec: PredictSpec, versions: ModelVersions | None = None
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The ``mapInArrow`` function: it captures the spec (and the model location) only.

    With ``versions``, a streaming task reads its query and micro-batch ids from the local
    properties Spark gives every task of a micro-batch, and scores with that batch's version.
    """

    def predict_fn(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        task = TaskContext.get()
        partition_id = task.partitionId() if task is not None else None
        task_spec = _with_task_threads(spec)
        if versions is None:
            yield from predict_partition(batches, task_spec, partition_id)
            return
        query_id = task.getLocalProperty(_QUERY_ID_PROPERTY) if task is not None else None
        batch_id = task.getLocalProperty(_BATCH_ID_PROPERTY) if task is not None else None
        if not query_id or batch_id is None:
            raise RuntimeError(
                "deepspark predict: a streaming task without its query and micro-batch ids "
                f"({_QUERY_ID_PROPERTY}, {_BATCH_ID_PROPERTY}); ModelVersions needs a "
                "micro-batch query (not Real-Time or continuous mode)"
            )
        batch = (query_id, int(batch_id))
        yield from predict_partition_versioned(batches, task_spec, versions, batch, partition_id)

    return predict_fn


def _predict_udf_fn(spec: PredictSpec, columns: tuple[str, ...]) -> Callable[..., Any]:
    """The ``arrow_udf`` function: it captures the spec and the feature column names.

    Spark picks the UDF's kind from the type hints: one column arrives as an iterator of
    arrays, several as an iterator of tuples of arrays.
    """
    spec = dataclasses.replace(spec, passthrough_cols=())

    def predict_column(arrays: Iterator[pa.Array]) -> Iterator[pa.Array]:
        from pyspark import TaskContext

        task = TaskContext.get()
        partition_id = task.partitionId() if task is not None else None
        yield from predict_arrays(arrays, _with_task_threads(spec), columns, partition_id)

    def predict_columns(arrays: Iterator[tuple[pa.Array, ...]]) -> Iterator[pa.Array]:
        yield from predict_column(arrays)  # type: ignore[arg-type]

    return predict_column if len(columns) == 1 else predict_columns


def _with_task_threads(spec: PredictSpec) -> PredictSpec:
    """Fill in the task's CPUs (``spark.task.cpus``) as its thread count, unless one is given."""
    if spec.num_threads:
        return spec
    from pyspark import TaskContext

    context = TaskContext.get()
    cpus = context.cpus() if context is not None else 1
    return dataclasses.replace(spec, num_threads=max(1, int(cpus)))
