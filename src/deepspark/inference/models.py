"""Models that travel to Spark tasks, and their loading once per Python worker.

Worker side: no pyspark here. A :class:`ModelSource` is a small, picklable description of a
model that a task can load: an in-memory ``nn.Module`` carried as cloudpickle bytes, or a file
or directory at an fsspec URL (TorchScript, ``torch.export`` ``.pt2``, ONNX, or a directory
written by ``Estimator.save``). `deepspark.inference.model_loading.load_model` turns it into a
:class:`~deepspark.inference.runtimes.Predictor` once per Python worker.

Size rule: a model whose pickle is at most :data:`DEFAULT_INLINE_LIMIT_BYTES` (64 MiB) travels
inside the task closure (Spark broadcasts large closures once per executor); above that it is
written once to a driver-given directory (``spill_dir``, any fsspec URL every executor can
read) and travels by path. 64 MiB keeps a closure well under Spark Connect's 128 MiB default
gRPC message limit and under the driver-memory cost of re-pickling a plan.

A spilled model's file is named by the SHA-256 of its bytes and the source carries that hash:
a worker hashes the file before loading it and refuses one that changed, so nobody who can
write to the directory can swap in other code. On one machine the default directory is
:func:`private_model_dir`, this user's own (mode 0700).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import cloudpickle
import fsspec
import torch

from deepspark.errors import DeepsparkError
from deepspark.inference.runtimes import (
    torchscript_deprecation_silenced,
)
from deepspark.persist.keras_files import is_keras_model

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_INLINE_LIMIT_BYTES",
    "ModelIntegrityError",
    "ModelKind",
    "ModelSource",
    "model_source",
    "private_model_dir",
]

DEFAULT_INLINE_LIMIT_BYTES = 64 * 1024 * 1024
"""Models whose pickle is larger than this travel by path, not inside the task closure."""

DEFAULT_CACHE_BYTES = 2 * 1024 * 1024 * 1024
"""Default budget of the per-worker model cache (weights' bytes; the newest model always stays)."""

# `Estimator.save` writes a directory whose metadata.json marks it complete.
SAVED_METADATA = "metadata.json"


class ModelIntegrityError(DeepsparkError, ValueError):
    """A spilled model file's bytes are not the model it was written for (changed on disk)."""


class ModelKind(str, Enum):
    """How a model is stored, and so which runtime loads it."""

    TORCH = "torch"  # a cloudpickled nn.Module
    TORCHSCRIPT = "torchscript"  # torch.jit.save
    TORCH_EXPORT = "torch_export"  # torch.export.save (.pt2)
    ONNX = "onnx"
    SAVED = "saved"  # a directory written by Estimator.save
    KERAS = "keras"  # a .keras file (Keras 3), run on the source's Keras backend
    TF_SAVED_MODEL = "tf_saved_model"  # a TensorFlow SavedModel directory


@dataclass(frozen=True)
class ModelSource:
    """A picklable description of a model that a worker can load.

    Exactly one of ``payload`` (the model's bytes, carried with the task) and ``path`` (an
    fsspec URL every worker can read) is set. ``identity`` names the model's content: equal
    identities load once per Python worker. ``sha256``, set for models spilled to a file, is
    the hash of the file's bytes: the loader refuses a file that does not match it.
    """

    kind: ModelKind
    identity: str
    path: str | None = None
    payload: bytes | None = field(default=None, repr=False)
    nbytes: int = 0
    sha256: str | None = None
    backend: str | None = None  # the Keras backend a KERAS model loads with

    def __post_init__(self) -> None:
        if (self.path is None) == (self.payload is None):
            raise ValueError("a ModelSource carries either a path or a payload, not both")

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], kind: ModelKind | str | None = None):
        """Describe a model file or ``Estimator.save`` directory at a local path or fsspec URL.

        Parameters
        ----------
        path : str or PathLike
            The model: ``*.onnx``, ``*.pt2`` (``torch.export.save``), a TorchScript file
            (``torch.jit.save``), a directory with ``metadata.json``, a Keras ``*.keras``
            file (or a directory holding ``model.keras``, as ``KerasEstimator.save`` writes),
            or a TensorFlow SavedModel directory (``saved_model.pb``).
        kind : ModelKind or str, optional
            How the model is stored; read from the path when left out.

        Raises
        ------
        FileNotFoundError
            When nothing exists at ``path``.

        Examples
        --------
        >>> import torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "linear.pt")
        >>> torch.jit.save(torch.jit.script(torch.nn.Linear(3, 1)), path)
        >>> ModelSource.from_path(path).kind
        <ModelKind.TORCHSCRIPT: 'torchscript'>
        """
        url = os.fspath(path)
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.exists(root):
            raise FileNotFoundError(f"model path {url!r} does not exist")
        is_dir = fs.isdir(root)
        kind = ModelKind(kind) if kind is not None else _kind_of(fs, root, url, is_dir)
        backend = None
        if kind is ModelKind.KERAS:
            from deepspark.persist.keras_files import chosen_backend

            backend = chosen_backend()
            if is_dir:
                url, root, is_dir = (
                    _join_url(url, KERAS_FILE),
                    posixpath.join(root, KERAS_FILE),
                    False,
                )
        if kind in (ModelKind.SAVED, ModelKind.TF_SAVED_MODEL):
            files = sorted(fs.find(root))  # every file: weights, architecture, metadata
        elif is_dir:
            raise ValueError(f"model path {url!r} is a directory; kind={kind.value!r} needs a file")
        else:
            files = [root]
        stamps = [fs.ukey(name) for name in files]
        nbytes = sum(int(fs.info(name).get("size") or 0) for name in files)
        identity = _digest(kind.value, url, backend or "", *stamps)
        return cls(kind=kind, identity=identity, path=url, nbytes=nbytes, backend=backend)

    @classmethod
    def from_bytes(
        cls, data: bytes, kind: ModelKind | str, backend: str | None = None
    ) -> ModelSource:
        """Describe a model held as bytes (a pickle, a TorchScript or ``.pt2`` archive, ONNX,
        a ``.keras`` file's bytes with the Keras ``backend`` to load them on)."""
        kind = ModelKind(kind)
        if kind in (ModelKind.SAVED, ModelKind.TF_SAVED_MODEL):
            raise ValueError(f"a {kind.value} directory travels by path, not as bytes")
        identity = _digest(kind.value, backend or "", data)
        return cls(kind=kind, identity=identity, payload=data, nbytes=len(data), backend=backend)

    def describe(self) -> str:
        """A short name for messages: the path, or the kind and size of the payload."""
        if self.path is not None:
            return f"{self.kind.value} model at {self.path!r}"
        return f"in-memory {self.kind.value} model ({self.nbytes / 2**20:.1f} MiB)"


def trained_model(model: Any) -> Any:
    """An estimator's trained model (torch or Keras, from its ``get_model()``); any other
    model as it is. Duck-typed, so inference imports nothing of training."""
    get_model = getattr(model, "get_model", None)
    if callable(get_model) and callable(getattr(model, "fit", None)):
        return get_model()
    return model


def model_source(
    model: Any,
    *,
    spill_dir: str | None = None,
    max_inline_bytes: int = DEFAULT_INLINE_LIMIT_BYTES,
) -> ModelSource:
    """Describe ``model`` so that Spark tasks can load it.

    Parameters
    ----------
    model : nn.Module, torch.jit.ScriptModule, torch.export.ExportedProgram, str or ModelSource
        An in-memory model (pickled with cloudpickle; TorchScript and exported programs with
        their own savers), or a path / fsspec URL (see :meth:`ModelSource.from_path`). An
        Estimator stands for its trained model.
    spill_dir : str, optional
        A directory (fsspec URL) that every executor can read. An in-memory model whose bytes
        exceed ``max_inline_bytes`` is written there once (named by the SHA-256 of its bytes,
        which workers check before loading) and travels by path. Without it, such a model is
        refused. Whoever can write there can make predict fail, not run other code; still,
        prefer a directory only you can write (see :func:`private_model_dir`).
    max_inline_bytes : int
        The largest model carried inside the task closure; 64 MiB by default.

    Returns
    -------
    ModelSource

    Examples
    --------
    >>> import torch
    >>> source = model_source(torch.nn.Linear(3, 1))
    >>> source.kind.value, source.path is None
    ('torch', True)
    """
    if isinstance(model, ModelSource):
        return model
    model = trained_model(model)
    if isinstance(model, (str, os.PathLike)):
        return ModelSource.from_path(model)
    backend = None
    if is_keras_model(model):  # before nn.Module: a Keras model on torch is one too
        from deepspark.persist.keras_files import keras_to_bytes, model_backend

        kind, data, backend = ModelKind.KERAS, keras_to_bytes(model), model_backend(model)
    elif isinstance(model, torch.jit.ScriptModule):
        with torchscript_deprecation_silenced():
            kind, data = ModelKind.TORCHSCRIPT, _saved_bytes(torch.jit.save, model)
    elif isinstance(model, torch.export.ExportedProgram):
        kind, data = ModelKind.TORCH_EXPORT, _saved_bytes(torch.export.save, model)
    elif isinstance(model, torch.nn.Module):
        kind, data = ModelKind.TORCH, cloudpickle.dumps(_on_cpu(model))
    else:
        raise TypeError(
            f"model is of type {type(model).__name__}; give an nn.Module, a TorchScript "
            "module, a torch.export program, a Keras model, a fitted Estimator, a ModelSource "
            "or a path to a saved model"
        )
    source = ModelSource.from_bytes(data, kind, backend)
    if len(data) <= max_inline_bytes:
        return source
    if spill_dir is None:
        raise ValueError(
            f"the model takes {len(data) / 2**20:.0f} MiB, more than max_inline_bytes="
            f"{max_inline_bytes / 2**20:.0f} MiB that may travel inside a Spark task; give "
            "spill_dir='<a directory every executor can read>' (local path or fsspec URL), or "
            "save the model (torch.jit.save, torch.export.save, Estimator.save) and pass its path"
        )
    return _spill(source, spill_dir)


_SUFFIXES = {".onnx": ModelKind.ONNX, ".pt2": ModelKind.TORCH_EXPORT, ".keras": ModelKind.KERAS}
# KerasEstimator.save writes its model as this file of its directory; a SavedModel has the other
KERAS_FILE = "model.keras"
SAVED_MODEL_FILE = "saved_model.pb"


def _join_url(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _kind_of(fs: Any, root: str, url: str, is_dir: bool) -> ModelKind:
    if is_dir:
        if fs.exists(posixpath.join(root, KERAS_FILE)):
            return ModelKind.KERAS
        if fs.exists(posixpath.join(root, SAVED_METADATA)):
            return ModelKind.SAVED
        if fs.exists(posixpath.join(root, SAVED_MODEL_FILE)):
            return ModelKind.TF_SAVED_MODEL
        raise ValueError(
            f"model path {url!r} is a directory without {SAVED_METADATA}, {KERAS_FILE} or "
            f"{SAVED_MODEL_FILE}; give a model file, a directory written by Estimator.save or "
            "a TensorFlow SavedModel"
        )
    suffix = posixpath.splitext(root)[1].lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    # TorchScript and torch.export archives are zip files that differ in their entries.
    with fs.open(root, "rb") as file:
        names = zipfile.ZipFile(file).namelist() if zipfile.is_zipfile(file) else []
    if any("/code/" in name for name in names):
        return ModelKind.TORCHSCRIPT
    if any(name.endswith("/archive_format") for name in names):
        return ModelKind.TORCH_EXPORT
    raise ValueError(
        f"model path {url!r} is neither TorchScript (torch.jit.save), a torch.export program "
        "(.pt2), ONNX (.onnx) nor an Estimator.save directory. A torch.save pickle is not "
        "loaded (it runs arbitrary code): save the model with one of those, or pass the "
        "nn.Module itself"
    )


def _digest(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _saved_bytes(save: Any, model: Any) -> bytes:
    buffer = io.BytesIO()
    save(model, buffer)
    return buffer.getvalue()


def _on_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """The module when its tensors are on the CPU, else a CPU copy (workers may lack GPUs)."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(tensor.device.type == "cpu" for tensor in tensors):
        return module
    import copy

    return copy.deepcopy(module).cpu()


_SPILL_SUFFIXES = {
    ModelKind.TORCH: ".pkl",
    ModelKind.TORCHSCRIPT: ".pt",
    ModelKind.TORCH_EXPORT: ".pt2",
    ModelKind.KERAS: ".keras",
}


def _spill(source: ModelSource, spill_dir: str) -> ModelSource:
    """Write the payload once under ``spill_dir``, named by its SHA-256; a by-path source."""
    assert source.payload is not None
    sha256 = hashlib.sha256(source.payload).hexdigest()
    fs, root = fsspec.core.url_to_fs(spill_dir)
    name = f"deepspark-model-{sha256}{_SPILL_SUFFIXES[source.kind]}"
    target = posixpath.join(root, name)
    if not (fs.exists(target) and _file_sha256(fs, target) == sha256):
        fs.makedirs(root, exist_ok=True)
        partial = f"{target}.{os.getpid()}.partial"
        with fs.open(partial, "wb") as file:
            file.write(source.payload)
        fs.mv(partial, target)
    url = spill_dir.rstrip("/") + "/" + name
    # The content hash stays the identity: the same model loads once, whichever way it came.
    return ModelSource(
        kind=source.kind,
        identity=source.identity,
        path=url,
        nbytes=source.nbytes,
        sha256=sha256,
        backend=source.backend,
    )


def _file_sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def private_model_dir(base: str | None = None) -> str:
    """This user's own directory for large models on this machine, created if needed.

    ``<base>/deepspark-models-<uid>`` with mode 0700, so no other user can read the models or
    put files there. A directory of that name owned by another user, or a symlink, is refused;
    one of this user's with a wider mode (not made by deepspark) is emptied and made private.

    Parameters
    ----------
    base : str, optional
        Where to create it; the system's temporary directory by default.

    Returns
    -------
    str

    Raises
    ------
    PermissionError
        When the path is taken by another user or is not a plain directory.

    Examples
    --------
    >>> import os, stat
    >>> oct(stat.S_IMODE(os.stat(private_model_dir()).st_mode))
    '0o700'
    """
    base = base or tempfile.gettempdir()
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = os.path.join(base, f"deepspark-models-{uid if uid is not None else 'user'}")
    for _ in range(2):
        with contextlib.suppress(FileExistsError):  # a file or dangling link: refused below
            os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise PermissionError(
                f"{path} is not a plain directory (a symlink or a file); remove it, or pass "
                "spill_dir='<a directory every executor can read>'"
            )
        if uid is not None and info.st_uid != uid:
            raise PermissionError(
                f"{path} belongs to another user (uid {info.st_uid}), so models written there "
                "are not private; remove it, or pass spill_dir='<a directory of yours>'"
            )
        if uid is None or stat.S_IMODE(info.st_mode) == 0o700:
            return path
        if stat.S_IMODE(info.st_mode) & 0o077:  # others could have written into it: start over
            shutil.rmtree(path)
            continue
        os.chmod(path, 0o700)  # made under a restrictive umask: give this user its rights back
    return path


def is_local(fs: Any) -> bool:
    """Whether an fsspec file system is this machine's own disk."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols
