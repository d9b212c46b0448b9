"""Structured Streaming: what predict checks on a stream, and an exactly-once foreachBatch writer.

Driver side. A streaming DataFrame runs no job before its query starts: no ``limit``, no
``toArrow``, no ``count``. So on a stream :func:`deepspark.predict` checks the schema alone,
takes each array column's per-row shape from ``feature_shapes`` (or an ONNX model's declared
input shape), and probes the model on rows of zeros of those shapes: a model that cannot take
the columns fails here, before the query starts, as on a batch DataFrame.

Exactly once: Spark's file sinks (Parquet, ORC, JSON, CSV) and Delta with a
``checkpointLocation`` commit each micro-batch once. ``foreachBatch`` is at least once: after
a failure Spark runs the last, uncommitted batch again with the same ``batchId``.
:func:`idempotent_batch_writer` makes such a write idempotent by that id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import fsspec

from deepspark.data import assemble
from deepspark.data.columns import filler_tensor
from deepspark.data.spec import FeedError, TensorSpec
from deepspark.inference.models import is_local
from deepspark.inference.runtimes import OnnxPredictor, Predictor

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["BATCH_ID_COLUMN", "idempotent_batch_writer", "stream_features", "zero_inputs"]

# The partition column that idempotent_batch_writer's directories add when read back.
BATCH_ID_COLUMN = "batch_id"
_STAGING = "_staging"


def stream_features(
    features: Sequence[TensorSpec], predictor: Predictor, input_names: Sequence[str] | None
) -> tuple[TensorSpec, ...]:
    """The features with every per-row shape known, as a stream needs them before it starts.

    A batch DataFrame's first rows give the shape of an array, vector, binary or string
    column; a stream has no rows yet. The shape comes from ``feature_shapes``, else from the
    ONNX model's declared input shape.

    Raises
    ------
    FeedError
        When a shape is known from neither; the message names ``feature_shapes``.
    """
    declared = _onnx_row_shapes(predictor, input_names)
    completed = []
    for position, spec in enumerate(features):
        if spec.row_numel == 0 and position < len(declared) and declared[position]:
            spec = dataclasses.replace(spec, shape=declared[position])
        completed.append(spec)
    unknown = [spec for spec in completed if spec.row_numel == 0]
    if unknown:
        listed = ", ".join(f"{spec.name!r} ({spec.kind.value})" for spec in unknown)
        example = ", ".join(f"{spec.name!r}: (...)" for spec in unknown)
        raise FeedError(
            f"feature_shapes: a streaming DataFrame has no rows before its query starts to "
            f"read the per-row shape of {listed} from; give feature_shapes={{{example}}} "
            "with the shape of one row, e.g. (4,) or (1, 28, 28)"
        )
    return tuple(completed)


def _onnx_row_shapes(
    predictor: Predictor, input_names: Sequence[str] | None
) -> list[tuple[int, ...] | None]:
    """Per input, in feed order, the ONNX model's fixed per-row shape (None where a dimension
    after the batch one is symbolic)."""
    if not isinstance(predictor, OnnxPredictor):
        return []
    inputs = {arg.name: arg for arg in predictor.session.get_inputs()}
    order = list(input_names) if input_names else list(inputs)
    shapes: list[tuple[int, ...] | None] = []
    for name in order:
        dims = list(inputs[name].shape)[1:] if name in inputs else [None]
        fixed = all(isinstance(dim, int) and dim > 0 for dim in dims)
        shapes.append(tuple(dims) if fixed else None)
    return shapes


def zero_inputs(features: Sequence[TensorSpec], rows: int) -> tuple[Any, ...]:
    """The model's arguments for ``rows`` rows of zeros (what a stream's probe runs on).

    Binary and string columns are decoded on the workers; here their decoded shape stands in.
    """
    return assemble(features, [filler_tensor(spec, rows) for spec in features])


def idempotent_batch_writer(
    path: str,
    *,
    format: str = "parquet",
    options: Mapping[str, str] | None = None,
    partition_by: Sequence[str] | None = None,
) -> Callable[[DataFrame, int], None]:
    """A ``foreachBatch`` function that writes every micro-batch exactly once.

    ``foreachBatch`` is at least once: after a failure, Spark runs the last batch again with
    the same ``batchId``. This writer puts batch ``B`` in ``<path>/batch_id=B/``: it writes
    the batch into a staging directory (``<path>/_staging/``, hidden from readers by its
    ``_``) and renames it into place. A batch whose directory exists is committed and is
    skipped when replayed; a write that died half-way left only staging files, which the
    replay removes. Reading ``path`` with Spark gives every committed row once, with a
    ``batch_id`` column.

    The rename must be atomic: local disks, NFS and HDFS (fsspec URLs) give that. Object
    stores (S3, GCS) do not; write to Delta there and let its own ``txnAppId`` /
    ``txnVersion`` options make the write idempotent.

    Parameters
    ----------
    path : str
        The output directory (local path or fsspec URL that Spark can write too).
    format : str
        A Spark file format: ``parquet``, ``orc``, ``json``, ``csv``.
    options : dict, optional
        Writer options (``compression``...).
    partition_by : sequence of str, optional
        Columns to partition each batch's directory by.

    Returns
    -------
    callable
        ``(batch_df, batch_id) -> None``, for ``writeStream.foreachBatch``.

    Examples
    --------
    >>> from deepspark.inference import idempotent_batch_writer
    >>> write = idempotent_batch_writer("/tmp/scores")
    >>> query = (scored.writeStream.foreachBatch(write)  # doctest: +SKIP
    ...          .option("checkpointLocation", "/tmp/scores-checkpoint").start())
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"path={path!r}: give the output directory")
    if not isinstance(format, str) or not format:
        raise ValueError(f"format={format!r}: give a Spark file format such as 'parquet'")
    writer_options = dict(options or {})
    partitions = list(partition_by or [])

    def write_batch(batch_df: DataFrame, batch_id: int) -> None:
        fs, root = fsspec.core.url_to_fs(path)
        committed = posixpath.join(root, f"{BATCH_ID_COLUMN}={batch_id}")
        if fs.exists(committed):
            return  # a replay of a batch already written
        staging_root = posixpath.join(root, _STAGING)
        _remove_attempts(fs, staging_root, batch_id)
        attempt = f"{BATCH_ID_COLUMN}={batch_id}-{uuid.uuid4().hex[:12]}"
        staging_url = f"{path.rstrip('/')}/{_STAGING}/{attempt}"
        writer = batch_df.write.format(format).options(**writer_options).mode("errorifexists")
        if partitions:
            writer = writer.partitionBy(*partitions)
        writer.save(staging_url)
        _rename(fs, posixpath.join(staging_root, attempt), committed)

    return write_batch


def _remove_attempts(fs: Any, staging_root: str, batch_id: int) -> None:
    """Earlier attempts of this batch that died before their rename."""
    if not fs.exists(staging_root):
        return
    prefix = f"{BATCH_ID_COLUMN}={batch_id}-"
    for name in fs.ls(staging_root, detail=False):
        if posixpath.basename(name.rstrip("/")).startswith(prefix):
            fs.rm(name, recursive=True)


def _rename(fs: Any, source: str, target: str) -> None:
    """Move the written batch into place, in one step where the file system allows it."""
    if is_local(fs):
        try:
            os.rename(source, target)  # atomic; refuses an existing non-empty target
        except OSError:
            if not os.path.isdir(target):
                raise
            with contextlib.suppress(FileNotFoundError):  # written meanwhile: keep that one
                fs.rm(source, recursive=True)
        return
    fs.mv(source, target, recursive=True)
