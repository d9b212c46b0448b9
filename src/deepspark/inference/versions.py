"""A model location that gains versions while a stream runs, and one version per micro-batch.

Worker side: no pyspark here. A :class:`ModelVersions` names a directory holding one entry
per model version: a model file (``3.onnx``, ``3.pt``, ``3.pt2``) or a directory
(``3/``, written by ``Estimator.save``, a Keras or a SavedModel directory). Names that start
with ``_`` or ``.`` are not versions (Spark and Hadoop hide such names too), so a version is
written under such a name, or elsewhere, and renamed into place when complete; a saved
directory counts once its ``metadata.json`` is there (``Estimator.save`` writes it last).
Versions sort by name, numbers by value (``2`` before ``10``); the last one is the newest.

A micro-batch runs as several tasks that start at different times, so each task reading
"the newest version" could see two of them. Instead the first task of a batch to start
records the version it chose in ``<location>/_batches/<query id>/<batch id>`` (created
exclusively: exactly one task wins) and every other task of the batch, a retried task and a
re-run of the batch after a restart from its checkpoint (same query id) reads that record.
So no micro-batch mixes versions, and a replayed batch gives the same predictions.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

from deepspark.inference.models import ModelSource
from deepspark.inference.worker import PredictSpec, predict_partition

__all__ = ["ModelVersion", "ModelVersions", "predict_partition_versioned"]

# Where the chosen version of each micro-batch is recorded, inside the model location.
BATCH_RECORDS = "_batches"
# Spark keeps the last 100 batches' checkpoint files (spark.sql.streaming.minBatchesToRetain):
# no restart goes back further, so older records are removed.
RECORDS_KEPT = 100
# The suffixes of model files, left out of a version's name (``3.onnx`` is version ``3``).
MODEL_FILE_SUFFIXES = (".onnx", ".pt", ".pt2", ".pth", ".jit", ".keras")
# How long a task waits for the batch's record that another task is writing.
RECORD_WAIT_S = 30.0


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model location: its name (the entry's name without a file suffix)
    and the entry's path."""

    name: str
    path: str


@dataclass(frozen=True)
class ModelVersions:
    """A directory of model versions; the newest scores each micro-batch of a stream.

    Pass it as ``model`` to :func:`deepspark.predict` (or use it with ``Estimator.predict``'s
    saved directories): every output row gets a ``version_col`` column naming the version
    that scored it, and a new version is picked up at the next micro-batch without stopping
    the query. On a batch DataFrame, the newest version at the call scores every row.

    Parameters
    ----------
    location : str
        A directory (local path or fsspec URL) whose entries are versions (see the module
        notes). Tasks write small records under ``<location>/_batches``, so the file system
        must create files exclusively (local disks, NFS, HDFS; not S3).
    version_col : str
        The output column that names each row's version.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> location = tempfile.mkdtemp()
    >>> for version in (1, 2, 10):
    ...     module = torch.jit.script(torch.nn.Linear(2, 1))
    ...     torch.jit.save(module, os.path.join(location, f"{version}.pt"))
    >>> ModelVersions(location).latest().name
    '10'
    """

    location: str
    version_col: str = "model_version"

    def __post_init__(self) -> None:
        if not isinstance(self.location, str) or not self.location:
            raise ValueError(f"location={self.location!r}: give a directory path or URL")
        if not isinstance(self.version_col, str) or not self.version_col:
            raise ValueError(f"version_col={self.version_col!r}: give a column name")

    def latest(self) -> ModelVersion:
        """The newest complete version.

        Raises
        ------
        FileNotFoundError
            When the location does not exist or holds no complete version.
        """
        fs, root = fsspec.core.url_to_fs(self.location)
        if not fs.isdir(root):
            raise FileNotFoundError(
                f"model location {self.location!r} is not a directory; ModelVersions needs a "
                "directory with one entry per version (e.g. 1.onnx, 2.onnx or 1/, 2/)"
            )
        entries = sorted(
            (posixpath.basename(name.rstrip("/")) for name in fs.ls(root, detail=False)),
            key=_version_order,
        )
        for entry in reversed(entries):
            if entry.startswith(("_", ".")):
                continue
            version = self._entry(entry)
            if _complete(version):
                return version
        raise FileNotFoundError(
            f"model location {self.location!r} holds no complete model version yet; write one "
            "(a model file or an Estimator.save directory) under a name such as '1'"
        )

    def for_batch(self, query_id: str, batch_id: int) -> ModelVersion:
        """The version that scores micro-batch ``batch_id`` of query ``query_id``.

        The first caller for a batch chooses the newest version and records it; every later
        caller for the same batch, in any process, gets the recorded one.
        """
        fs, root = fsspec.core.url_to_fs(self.location)
        folder = posixpath.join(root, BATCH_RECORDS, query_id)
        record = posixpath.join(folder, str(batch_id))
        entry = _read_record(fs, record, wait_s=0.0)
        if entry is None:
            chosen = self.latest()
            fs.makedirs(folder, exist_ok=True)
            try:
                with fs.open(record, "xb") as file:
                    file.write(posixpath.basename(chosen.path).encode())
            except FileExistsError:  # another task of the batch recorded first
                entry = _read_record(fs, record, wait_s=RECORD_WAIT_S)
            else:
                if batch_id % RECORDS_KEPT == 0:
                    _remove_old_records(fs, folder, batch_id - RECORDS_KEPT)
                return chosen
        if entry is None:
            raise TimeoutError(f"the model version record {record!r} stayed empty")
        return self._entry(entry)

    def _entry(self, entry: str) -> ModelVersion:
        stem, suffix = posixpath.splitext(entry)
        name = stem if suffix.lower() in MODEL_FILE_SUFFIXES else entry
        return ModelVersion(name=name, path=self.location.rstrip("/") + "/" + entry)


def _version_order(name: str) -> list[tuple[int, int | str]]:
    """Numbers by value, the rest as text: ``2`` before ``10``, ``v2`` before ``v10``."""
    parts = re.split(r"(\d+)", name)
    return [(0, int(part)) if part.isdigit() else (1, part) for part in parts if part]


# A version's files do not change once it is complete, so each process describes it once.
_sources: dict[str, ModelSource] = {}


def _complete(version: ModelVersion) -> bool:
    """A version loads once its directory is complete; an incomplete one is skipped."""
    try:
        _source_of(version)
    except (ValueError, FileNotFoundError):
        return False
    return True


def _source_of(version: ModelVersion) -> ModelSource:
    source = _sources.get(version.path)
    if source is None:
        source = _sources[version.path] = ModelSource.from_path(version.path)
    return source


def _read_record(fs: Any, record: str, *, wait_s: float) -> str | None:
    """The entry recorded for a batch; None when there is no record (or none after a wait:
    a record exists but its writer has not written the name yet)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            entry = fs.cat_file(record).decode().strip()
        except FileNotFoundError:
            entry = ""
        if entry or time.monotonic() >= deadline:
            return entry or None
        time.sleep(0.05)


def _remove_old_records(fs: Any, folder: str, below: int) -> None:
    for name in fs.ls(folder, detail=False):
        batch = posixpath.basename(name.rstrip("/"))
        if batch.isdigit() and int(batch) < below:
            fs.rm(name)


def predict_partition_versioned(
    batches: Iterable[pa.RecordBatch],
    spec: PredictSpec,
    versions: ModelVersions,
    batch: tuple[str, int],
    partition_id: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """:func:`~deepspark.inference.worker.predict_partition` with the micro-batch's version.

    Parameters
    ----------
    batches : iterable of pyarrow.RecordBatch
        The partition.
    spec : PredictSpec
        What to predict; its ``model`` is replaced by the batch's version.
    versions : ModelVersions
        The model location.
    batch : tuple of (str, int)
        The streaming query's id and the micro-batch id (outside a stream the driver
        chooses the version instead, once for the whole job).
    partition_id : int, optional
        The Spark partition, named in error messages.

    Yields
    ------
    pyarrow.RecordBatch
        The predictions, followed by ``versions.version_col``.
    """
    version = versions.for_batch(*batch)
    scoring = dataclasses.replace(spec, model=_source_of(version))
    for predictions in predict_partition(batches, scoring, partition_id):
        names = pa.array([version.name] * predictions.num_rows, pa.string())
        yield predictions.append_column(versions.version_col, names)
