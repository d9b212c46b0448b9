"""``predict(df, model, feature_cols)``: a model's output as a new DataFrame column.

Driver side: validates the arguments, resolves the feature columns through the data layer,
probes the model on a few rows (output type, shape errors) and wires the worker loop into
Spark (`deepspark.inference.predict_paths`). Two paths give the same DataFrame:

* ``arrow_udf`` (Spark >= 4.1): an Arrow iterator UDF
  (:func:`deepspark.inference.worker.predict_arrays`) receives only the feature columns; the
  passthrough columns stay in the JVM and never cross to Python;
* ``mapInArrow`` (Spark 3.5 and 4.0): a non-barrier ``DataFrame.mapInArrow``
  (:func:`deepspark.inference.worker.predict_partition`) carries every column to Python and back.

The session conf ``deepspark.predict.path`` (``auto``, ``arrow_udf``, ``mapInArrow``) chooses
one; ``auto`` takes ``arrow_udf`` where the session has it. The task closure captures one plain
:class:`PredictSpec`. pyspark is imported inside functions only, so importing this package on a
worker does not import it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from deepspark.context.spark_versions import collect_arrow
from deepspark.deprecation import keyword_only_after
from deepspark.inference.model_loading import load_model
from deepspark.inference.models import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_INLINE_LIMIT_BYTES,
    ModelKind,
    ModelSource,
    model_source,
    private_model_dir,
    trained_model,
)
from deepspark.inference.outputs import (
    OutputArg,
    OutputColsArg,
    check_column_names,
    check_output_cols,
    output_columns,
    requested_kinds,
)
from deepspark.inference.predict_paths import (
    choose_path,
    feature_columns,
    predict_with_arrow_udf,
    predict_with_map_in_arrow,
)
from deepspark.inference.runtimes import Outputs, Predictor, TorchModulePredictor, evaluating
from deepspark.inference.streaming import stream_features, zero_inputs
from deepspark.inference.versions import ModelVersions
from deepspark.inference.worker import (
    PredictSpec,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["predict"]

ColumnsArg = str | Sequence[str | Sequence[str]] | Mapping[str, str | Sequence[str]]


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
# Before 0.2 these four followed feature_cols by position, in an order Estimator.predict did
# not share; old positional calls keep their meaning, with a warning.
@keyword_only_after(3, ("output_col", "batch_size", "output", "passthrough_cols"))
def predict(
    df: DataFrame,
    model: Any,
    feature_cols: ColumnsArg,
    *,
    output_col: str = "prediction",
    batch_size: int = 1024,
    output: OutputArg = "auto",
    passthrough_cols: Sequence[str] | None = None,
    num_workers: int | None = None,
    output_cols: OutputColsArg = None,
    feature_shapes: dict[str, Sequence[int]] | None = None,
    feature_dtypes: dict[str, str] | None = None,
    decoders: dict[str, Callable[[Any], Any]] | None = None,
    input_names: Sequence[str] | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
    spill_dir: str | None = None,
    max_inline_bytes: int = DEFAULT_INLINE_LIMIT_BYTES,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    probe_rows: int = 2,
) -> DataFrame:
    """Run ``model`` over every row of ``df`` and return the rows with a prediction column.

    One pass over the rows: on Spark >= 4.1 an Arrow iterator UDF that receives only the
    feature columns (the passthrough columns stay in the JVM), on Spark 3.5 and 4.0 a
    non-barrier ``mapInArrow``; the session conf ``deepspark.predict.path`` (``auto``,
    ``arrow_udf``, ``mapInArrow``) overrides the choice. Each Python worker loads the model once
    (a cache keyed by the model's identity, bounded by ``cache_bytes``) and reuses it across
    tasks and jobs. Rows keep their order within each partition and the passthrough columns
    come along, so
    writing the result with Spark's writers (Parquet, Delta) is exactly-once even when tasks
    are retried. Works on local, cluster and Spark Connect sessions.

    A streaming DataFrame (``df.isStreaming``) gives a streaming DataFrame, for any sink.
    Nothing runs before its query starts, so the checks read the schema only: array, vector,
    binary and string features need ``feature_shapes`` (an ONNX model's fixed input shape
    stands in), and the model is probed on rows of zeros of those shapes. See
    ``docs/streaming.md``.

    Parameters
    ----------
    df : pyspark.sql.DataFrame
        The rows to score.
    model : nn.Module, ScriptModule, ExportedProgram, Estimator, str, ModelSource or ModelVersions
        An in-memory model (a fitted Estimator gives its trained model), a
        :class:`~deepspark.inference.ModelVersions`, or the path (fsspec URL) of a TorchScript
        file, a ``torch.export`` ``.pt2`` file, an ``.onnx`` file or a directory written by
        ``Estimator.save``.
        In-memory models and saved directories are unpickled on the workers (trusted models
        only). A model whose pickle exceeds ``max_inline_bytes`` travels by path (see
        ``spill_dir``). A :class:`~deepspark.inference.ModelVersions` directory scores with
        its newest version and adds a column naming it; on a stream each micro-batch picks
        up the version that is newest when it starts.
    feature_cols : str, sequence or dict
        One entry per model input: a column name, or a list of numeric scalar columns stacked
        into one tensor (the data layer's column kinds: numbers, arrays, ML vectors, binary
        and strings with ``decoders``; a struct column gives a dict of its fields). A dict
        ``{name: column or list}`` makes one dict argument, ``forward({name: tensor})``, as
        in ``Estimator.fit``.
    output_col : str
        Name of the new column for a model with one output; for a tuple output the prefix
        of the default names ``prediction_0``, ``prediction_1``, ... Must not exist in ``df``.
    batch_size : int
        Rows per model call.
    output : {"auto", "double", "array", "class", "probabilities"} or dict
        ``double`` (one value per row), ``array`` (``array<float>``), ``class`` (argmax as
        ``int``), ``probabilities`` (softmax as ``array<float>``); ``auto`` picks ``double``
        for one output per row, else ``array``. One kind applies to every output; a dict
        gives it per output (dict key or tuple position), e.g. ``{"logits": "class"}``, the
        others ``auto``.
    passthrough_cols : sequence of str, optional
        Input columns kept in the result (default: all of them).
    num_workers : int, optional
        At most this many Spark tasks run the model: a DataFrame with more partitions is
        coalesced to this many (no shuffle, so the rows keep their order). Default: one task
        per partition of ``df``. Everything after ``feature_cols`` is keyword-only.
    output_cols : list or dict, optional
        Column names for a model with several outputs, which writes one column per output:
        a dict output's columns are named by its keys, a tuple's (or list's)
        ``f"{output_col}_{i}"``. A list names every output in order; a dict renames some,
        by dict key or position, e.g. ``{"logits": "scores"}``.
    feature_shapes, feature_dtypes, decoders : dict, optional
        Per-column tensor shape (e.g. ``{"image": (1, 28, 28)}``), dtype and decode function,
        as in ``Estimator.fit``.
    input_names : sequence of str, optional
        ONNX only: the model inputs that ``feature_cols`` feed, in order (default: the
        model's inputs in their order).
    device : str
        Where torch models run on the workers (``"cpu"`` or ``"cuda"``).
    num_threads : int, optional
        Threads per task; default the task's CPUs (``spark.task.cpus``).
    spill_dir : str, optional
        A directory every executor can read (fsspec URL) for in-memory models larger than
        ``max_inline_bytes``; local and local-cluster masters default to a temporary directory.
    max_inline_bytes : int
        The largest model carried inside the task closure (64 MiB).
    cache_bytes : int
        Byte budget of each Python worker's model cache (the newest model always stays).
    probe_rows : int
        Rows run on the driver first, to settle the output type and catch shape errors early.

    Returns
    -------
    pyspark.sql.DataFrame
        ``passthrough_cols`` followed by ``output_col`` (or one column per model output).

    Raises
    ------
    ModelInputError
        When the features do not fit the model (shapes, count, ONNX input names).
    FileNotFoundError
        When the model path does not exist.

    Examples
    --------
    >>> import torch, deepspark as ds
    >>> from deepspark.inference import predict
    >>> spark = ds.init_context(cores=2)  # doctest: +SKIP
    >>> rows = [(i, [float(i)] * 4) for i in range(6)]
    >>> df = spark.createDataFrame(rows, "id long, x array<float>")  # doctest: +SKIP
    >>> scored = predict(df, torch.nn.Linear(4, 1), "x")  # doctest: +SKIP
    >>> scored.columns  # doctest: +SKIP
    ['id', 'x', 'prediction']

    A model with two outputs writes two columns:

    >>> class TwoHeads(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 1)
    ...     def forward(self, x):
    ...         return {"scores": self.a(x), "value": self.b(x)}
    >>> predict(df, TwoHeads(), "x").columns  # doctest: +SKIP
    ['id', 'x', 'scores', 'value']
    """
    from deepspark.context.workers import check_workers
    from deepspark.data.validate import resolve_specs

    check_workers(df.sparkSession)  # once per session: the workers' Python can run the model
    model = trained_model(model)
    streaming = df.isStreaming  # no job may run on a stream before its query starts
    versions = model if isinstance(model, ModelVersions) else None
    newest = versions.latest() if versions is not None else None
    if newest is not None:
        model = newest.path  # probes the model; on a stream each micro-batch picks its own
    # a stream's tasks choose their version: the mapInArrow function adds the column
    path = "mapInArrow" if versions is not None and streaming else choose_path(df.sparkSession)
    _check_scalars(output_col, batch_size, num_threads, num_workers, probe_rows, device)
    if num_workers is not None:
        df = df.coalesce(num_workers)
    requested, requested_by_key = requested_kinds(output)
    check_output_cols(output_cols)
    passthrough = tuple(df.columns if passthrough_cols is None else passthrough_cols)
    missing = [name for name in passthrough if name not in df.columns]
    if missing:
        raise ValueError(
            f"passthrough_cols {missing!r} are not columns of the DataFrame (it has {df.columns!r})"
        )

    features = tuple(
        resolve_specs(
            df,
            feature_cols,
            role="feature",
            shapes=feature_shapes,
            dtypes=feature_dtypes,
            decoders=decoders,
            check_rows=0 if streaming else 8,
        )
    )
    source = model_source(
        model,
        spill_dir=spill_dir or _default_spill_dir(df),
        max_inline_bytes=max_inline_bytes,
    )
    names = tuple(input_names) if input_names else None

    probe, probe_rows_seen, features = _probe_outputs(
        df, model, source, features, names, rows=probe_rows, cache_bytes=cache_bytes
    )
    outputs = output_columns(
        probe, probe_rows_seen, output_col, output_cols, requested, requested_by_key
    )
    check_column_names(outputs, df.columns, output_cols)
    if versions is not None:
        taken = [*passthrough, *(out.column for out in outputs)]
        if versions.version_col in taken:
            raise ValueError(
                f"version_col={versions.version_col!r} is already a column of the result "
                f"({taken!r}); give ModelVersions(..., version_col='<another name>')"
            )
    spec = PredictSpec(
        model=source,
        features=features,
        outputs=outputs,
        passthrough_cols=passthrough,
        batch_size=batch_size,
        input_names=names,
        device=device,
        num_threads=num_threads,
        cache_bytes=cache_bytes,
    )
    if path == "arrow_udf":
        result = predict_with_arrow_udf(df, spec)
    else:
        # a batch frame's version is chosen here (the column is added below): only a stream's
        # tasks pick their micro-batch's version
        result = predict_with_map_in_arrow(df, spec, versions if streaming else None)
    if newest is not None and not streaming:  # one version, chosen here, scores every row
        from pyspark.sql import functions

        result = result.withColumn(versions.version_col, functions.lit(newest.name))
    return result


def _check_scalars(
    output_col: Any,
    batch_size: Any,
    num_threads: Any,
    num_workers: Any,
    probe_rows: Any,
    device: Any,
) -> None:
    """Refuse, before anything runs, the arguments of `predict` that are single values."""
    if not isinstance(output_col, str) or not output_col:
        raise ValueError(f"output_col={output_col!r}: give a column name")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give a positive integer")
    for name, value in (("num_threads", num_threads), ("num_workers", num_workers)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name}={value!r}: give a positive integer or None")
    if probe_rows < 1:
        raise ValueError(f"probe_rows={probe_rows!r}: give a positive integer")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: give 'cpu', 'cuda' or 'cuda:<index>'") from err


def _probe_outputs(
    df: DataFrame,
    model: Any,
    source: ModelSource,
    features: tuple[Any, ...],
    input_names: tuple[str, ...] | None,
    *,
    rows: int,
    cache_bytes: int,
) -> tuple[Outputs | None, int, tuple[Any, ...]]:
    """Run the model on a few rows here on the driver: its outputs (None without rows), the
    number of rows and the features, so shape errors show before a job.

    A stream has no rows before its query starts: the probe runs on rows of zeros of the
    features' declared shapes, which it completes (see `stream_features`)."""
    from deepspark.data import assemble, batch_to_tensors

    with _driver_predictor(model, source, cache_bytes) as predictor:
        predictor.check_input_names(input_names)
        if df.isStreaming:
            features = stream_features(features, predictor, input_names)
            inputs, rows_seen = zero_inputs(features, rows), rows
        else:
            sample = collect_arrow(df.select(*feature_columns(features)).limit(rows))
            if not sample.num_rows:
                return None, 0, features
            inputs = assemble(features, batch_to_tensors(sample, features))
            rows_seen = sample.num_rows
        column_names = [spec.name for spec in features]
        probe = predictor(inputs, input_names=input_names, column_names=column_names)
    return probe, rows_seen, features


@contextlib.contextmanager
def _driver_predictor(model: Any, source: ModelSource, cache_bytes: int) -> Iterator[Predictor]:
    """The predictor for the probe.

    An in-memory module runs as it is, in eval mode for the probe only. Unpickling a copy here
    would let cloudpickle rebind this process's by-value globals (a notebook's functions), so
    the next pickle of the same model, and with it the model's identity, would change.
    """
    if source.kind is not ModelKind.TORCH or not isinstance(model, torch.nn.Module):
        yield load_model(source, cache_bytes=cache_bytes)
        return
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    with evaluating(model):
        yield TorchModulePredictor(model, str(device))


def _default_spill_dir(df: DataFrame) -> str | None:
    """On local masters the driver's temporary directory is the executors' too (a Connect
    server that will not show its master: unknown, so the user is asked)."""
    from deepspark.context.topology import master_of

    if master_of(df.sparkSession).is_local:
        return private_model_dir()
    return None
