"""Loading a model once per Python worker: a `ModelSource` into a `Predictor`.

Worker side: no pyspark here. :func:`load_model` goes through a per-process cache keyed by the
source's identity (a content hash, or the file's path and stat), bounded by a byte budget. A
spilled model's file is hashed before it is loaded, and refused when it changed since the
driver wrote it (`deepspark.inference.models` says why).
"""

from __future__ import annotations

import hashlib
import io

import cloudpickle
import fsspec
import torch

from deepspark.inference._cache import CacheInfo, SizedLRUCache
from deepspark.inference.models import (
    DEFAULT_CACHE_BYTES,
    ModelIntegrityError,
    ModelKind,
    ModelSource,
    is_local,
)
from deepspark.inference.runtimes import (
    ExportedProgramPredictor,
    OnnxPredictor,
    Predictor,
    TorchModulePredictor,
    TorchScriptPredictor,
    torchscript_deprecation_silenced,
)

__all__ = ["cache_info", "clear_cache", "load_model"]

_cache: SizedLRUCache[Predictor] = SizedLRUCache(DEFAULT_CACHE_BYTES, lambda p: p.nbytes)


def load_model(
    source: ModelSource,
    *,
    device: str = "cpu",
    num_threads: int | None = None,
    cache_bytes: int | None = None,
    cached: bool = True,
) -> Predictor:
    """Load ``source`` once per process and return its predictor from then on.

    Unpickles code for in-memory ``nn.Module`` sources and ``Estimator.save`` directories
    (their architecture is a cloudpickle); give only models you trust. TorchScript,
    ``torch.export`` and ONNX files load without unpickling Python code.

    Parameters
    ----------
    source : ModelSource
        What to load (see :func:`model_source`).
    device : str
        Where torch models run (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ONNX runs on the CPU.
    num_threads : int, optional
        ONNX Runtime's intra-op threads, when the session is created.
    cache_bytes : int, optional
        A new byte budget for this process's cache (default 2 GiB of weights).
    cached : bool
        ``False`` loads a fresh predictor and leaves the cache alone (used to verify exports).

    Returns
    -------
    Predictor

    Examples
    --------
    >>> import torch
    >>> from deepspark.inference.models import model_source
    >>> predictor = load_model(model_source(torch.nn.Linear(3, 2)))
    >>> tuple(predictor((torch.ones(4, 3),)).shape)
    (4, 2)
    """
    if not cached:
        return _load_uncached(source, device, num_threads)
    if cache_bytes is not None and cache_bytes != _cache.budget_bytes:
        _cache.resize(cache_bytes)
    key = f"{source.identity}@{device}"
    return _cache.get_or_load(key, lambda: _load_uncached(source, device, num_threads))


def cache_info() -> CacheInfo:
    """This process's model cache: loads, hits, evictions, entries and bytes held.

    Examples
    --------
    >>> cache_info().loads >= 0
    True
    """
    return _cache.info()


def clear_cache() -> None:
    """Forget every loaded model in this process (the counters stay)."""
    _cache.clear()


def _load_uncached(source: ModelSource, device: str, num_threads: int | None) -> Predictor:
    kind = source.kind
    if kind is ModelKind.SAVED:
        from deepspark.persist.estimator_dir import load_saved_model

        module, _ = load_saved_model(source.path)
        return TorchModulePredictor(module, device)
    if kind is ModelKind.ONNX:
        return OnnxPredictor(_onnx_model(source), nbytes=source.nbytes, num_threads=num_threads)
    if kind is ModelKind.TF_SAVED_MODEL:
        from deepspark.inference.keras_runtime import SavedModelPredictor

        return SavedModelPredictor(_local_path(source))
    data = source.payload if source.payload is not None else _read_checked(source)
    if kind is ModelKind.TORCH:
        module = cloudpickle.loads(data)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{source.describe()} holds a {type(module).__name__}, not a module")
        return TorchModulePredictor(module, device)
    if kind is ModelKind.TORCHSCRIPT:
        with torchscript_deprecation_silenced():
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return TorchScriptPredictor(module, device)
    if kind is ModelKind.TORCH_EXPORT:
        return ExportedProgramPredictor(torch.export.load(io.BytesIO(data)), device)
    if kind is ModelKind.KERAS:
        from deepspark.inference.keras_runtime import KerasPredictor
        from deepspark.persist.keras_files import keras_from_bytes

        backend = source.backend or "tensorflow"
        return KerasPredictor(keras_from_bytes(data, backend), backend)
    raise ValueError(f"unknown model kind {kind!r}")


def _read_bytes(url: str | None) -> bytes:
    assert url is not None
    try:
        with fsspec.open(url, "rb") as file:
            return file.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model path {url!r} does not exist on this worker") from err


def _read_checked(source: ModelSource) -> bytes:
    """The file's bytes, after checking them against the hash the driver wrote them with."""
    data = _read_bytes(source.path)
    if source.sha256 is not None:
        found = hashlib.sha256(data).hexdigest()
        if found != source.sha256:
            raise ModelIntegrityError(
                f"model file {source.path!r} changed after it was written: its SHA-256 is "
                f"{found}, not {source.sha256}. It is not loaded; run predict again to "
                "rewrite it, and check who else can write to that directory"
            )
    return data


def _local_path(source: ModelSource) -> str:
    """A SavedModel directory on this machine's disk (TensorFlow reads its own URLs too)."""
    assert source.path is not None
    fs, root = fsspec.core.url_to_fs(source.path)
    return root if is_local(fs) else source.path


def _onnx_model(source: ModelSource) -> str | bytes:
    if source.payload is not None:
        return source.payload
    if source.sha256 is not None:
        return _read_checked(source)
    fs, root = fsspec.core.url_to_fs(source.path)
    if is_local(fs):
        return root  # a local path lets ONNX Runtime find external weight files beside it
    return _read_bytes(source.path)
