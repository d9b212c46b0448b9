"""Distributed inference: a model's output as a DataFrame column, models cached per worker.

Driver side: :func:`predict`. Worker side (no pyspark): :mod:`~deepspark.inference.models`
(model sources), :mod:`~deepspark.inference.model_loading` (loading, the per-worker cache),
:mod:`~deepspark.inference.runtimes` (one
predictor per runtime), :mod:`~deepspark.inference.worker` (the loop inside a task).
Streams: :func:`predict` takes a streaming DataFrame; :class:`ModelVersions` switches models
at micro-batch boundaries; :func:`idempotent_batch_writer` makes ``foreachBatch`` writes
exactly once (see ``docs/streaming.md``). Export with verification: :func:`export_onnx`,
:func:`export_torchscript`, :func:`export_program`; int8 copies of ONNX models:
:func:`quantize_onnx`.
"""

from deepspark.inference.export import (
    ExportMismatchError,
    export_onnx,
    export_program,
    export_torchscript,
)
from deepspark.inference.model_loading import cache_info, clear_cache, load_model
from deepspark.inference.models import (
    ModelIntegrityError,
    ModelKind,
    ModelSource,
    model_source,
)
from deepspark.inference.predict import predict
from deepspark.inference.quantize import QuantizationError, quantize_onnx
from deepspark.inference.runtimes import ModelInputError, Predictor
from deepspark.inference.streaming import idempotent_batch_writer
from deepspark.inference.versions import ModelVersion, ModelVersions
from deepspark.inference.worker import OutputKind, PredictError, PredictSpec, predict_partition

__all__ = [
    "ExportMismatchError",
    "ModelInputError",
    "ModelIntegrityError",
    "ModelKind",
    "ModelSource",
    "ModelVersion",
    "ModelVersions",
    "OutputKind",
    "PredictError",
    "PredictSpec",
    "Predictor",
    "QuantizationError",
    "cache_info",
    "clear_cache",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "idempotent_batch_writer",
    "load_model",
    "model_source",
    "predict",
    "predict_partition",
    "quantize_onnx",
]
