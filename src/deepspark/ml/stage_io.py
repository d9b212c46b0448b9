"""Spark ML persistence of `TorchEstimator` and `TorchModel`.

Layout of a saved stage (``path`` is what ``write().save(path)`` received; inside a
``PipelineModel`` it is ``stages/<index>_<uid>``)::

    metadata/      Spark ML's JSON metadata, written by Spark as DefaultParamsWriter does:
                   class, uid, sparkVersion, paramMap (the JSON-ready Params that were set),
                   defaultParamMap, and "deepspark": {format version, pickled Param names}
    params.pkl     the Params whose values are Python objects (model, loss, optimizer class,
                   metric objects), with cloudpickle: trusted code only
    estimator/     TorchModel only: the trained network as `deepspark.Estimator.save` writes
                   it (weights.safetensors, the architecture and loss in cloudpickle, history)

The metadata is written last and through Spark, so ``DefaultParamsReader.loadParamsInstance``
(used by ``PipelineModel.load``) finds the class and calls ``TorchModel.load``. The other files
go through fsspec: the path must be reachable by both (a local path, HDFS, S3 with s3fs).
"""

from __future__ import annotations

import json
from typing import Any

import cloudpickle
import fsspec
from pyspark.ml.util import DefaultParamsReader, DefaultParamsWriter, MLReader, MLWriter

from deepspark.context.spark_versions import ml_io_session

__all__ = ["FORMAT_VERSION", "TorchStageReader", "TorchStageWriter", "join"]

FORMAT_VERSION = 1
PICKLED_PARAMS = "params.pkl"


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def join(path: str, name: str) -> str:
    """``path/name`` for a URL or a local path."""
    return path.rstrip("/") + "/" + name


class TorchStageWriter(MLWriter):
    """Writes a deepspark stage: JSON Params through Spark, Python objects and weights beside.

    A stage class provides ``_save_data(path)`` for what its Params do not hold.
    """

    def __init__(self, instance: Any) -> None:
        super().__init__()
        self.instance = instance

    def _handleOverwrite(self, path: str) -> None:
        from deepspark.context.identity import is_connect

        if is_connect(self.sparkSession):
            # pyspark's own handler reaches for the JVM; Connect has a server-side one
            from pyspark.ml.connect.readwrite import RemoteMLWriter

            RemoteMLWriter.handleOverwrite(path, True)
            return
        super()._handleOverwrite(path)

    def saveImpl(self, path: str) -> None:
        fs, root = fsspec.core.url_to_fs(path)
        if not self.shouldOverwrite and fs.exists(join(root, "metadata")):
            raise FileExistsError(
                f"{path} already holds a saved stage; use write().overwrite().save(path) to "
                "replace it"
            )
        instance = self.instance
        set_json, set_objects = {}, {}
        for param, value in instance._paramMap.items():
            (set_json if _is_json(value) else set_objects)[param.name] = value
        not_json = [p.name for p, v in instance._defaultParamMap.items() if not _is_json(v)]
        if not_json:  # defaults are declared JSON-ready; this guards the declaration
            raise TypeError(f"{type(instance).__name__}: defaults of {not_json} are not JSON")
        fs.makedirs(root, exist_ok=True)
        if set_objects:
            with fs.open(join(root, PICKLED_PARAMS), "wb") as handle:
                handle.write(_pickled(set_objects))
        instance._save_data(path)
        DefaultParamsWriter.saveMetadata(
            instance,
            path,
            ml_io_session(self.sparkSession),
            extraMetadata={
                "deepspark": {
                    "formatVersion": FORMAT_VERSION,
                    "pickledParams": sorted(set_objects),
                }
            },
            paramMap=set_json,
        )


class TorchStageReader(MLReader):
    """Reads what `TorchStageWriter` wrote (unpickles code: trusted paths only)."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> Any:
        metadata = DefaultParamsReader.loadMetadata(path, ml_io_session(self.sparkSession))
        expected = f"{self.cls.__module__}.{self.cls.__name__}"
        if metadata.get("class") != expected:
            raise ValueError(
                f"{path} holds a saved {metadata.get('class')}, not a {expected}; load it with "
                "that class (or with PipelineModel.load for a whole pipeline)"
            )
        extra = metadata.get("deepspark") or {}
        version = int(extra.get("formatVersion", 0))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{path} was saved by a newer deepspark (stage format {version}); upgrade "
                "deepspark to load it"
            )
        instance = self.cls()
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        pickled = extra.get("pickledParams") or []
        if pickled:
            fs, root = fsspec.core.url_to_fs(path)
            values = cloudpickle.loads(fs.cat_file(join(root, PICKLED_PARAMS)))
            instance._set(**{name: values[name] for name in pickled})
        instance._load_data(path)
        return instance


def _pickled(values: dict[str, Any]) -> bytes:
    try:
        return cloudpickle.dumps(values)
    except Exception as error:
        raise ValueError(
            f"the Params {sorted(values)} could not be pickled for saving: {error}. Define "
            "the network, loss and metrics at module level, and keep open files, locks and "
            "sessions out of them"
        ) from error
