"""The default embedder as a model source, on the driver: EfficientNet-Lite0 in torch, exported
to ONNX, or quantized to int8; and the model a caller gives, as a source.

The source travels to the tasks in the spec and is loaded once per Python worker by
:func:`deepspark.inference.load_model`.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy as np
import torch

from deepspark.inference import (
    ModelSource,
    export_onnx,
    load_model,
    model_source,
    quantize_onnx,
)
from deepspark.vision.decoding import fit_image
from deepspark.vision.samples import calibration_photos
from deepspark.vision.zoo import EfficientNetLite0Features

__all__ = ["EMBEDDER_RUNTIMES", "default_embedder", "embedder_source"]

EMBEDDER_RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
"""``"auto"`` picks the faster of the two exact runtimes; ``"onnx-int8"`` is asked for."""


@functools.cache
def default_embedder(runtime: str = "auto") -> ModelSource:
    """EfficientNet-Lite0 features as a model source: ``"torch"`` (the module), ``"onnx"``
    (exported and checked against torch), ``"onnx-int8"`` (that export quantized to int8,
    calibrated on :func:`~deepspark.vision.samples.calibration_photos`), or ``"auto"``,
    whichever of torch and ONNX runs a batch faster here. Built once per driver process."""
    if runtime not in EMBEDDER_RUNTIMES:
        raise ValueError(f"runtime={runtime!r}: use one of {', '.join(EMBEDDER_RUNTIMES)}")
    module = EfficientNetLite0Features()
    torch_source = model_source(module)
    if runtime == "torch":
        return torch_source
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if runtime != "auto":
            raise ImportError(
                f"runtime={runtime!r} needs onnxruntime: run `pip install 'deepspark[vision]'`"
            ) from None
        return torch_source
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "efficientnet_lite0_features.onnx")
        sample = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
        export_onnx(
            module, path, sample, input_names=["images"], output_name="features", dynamo=False
        )
        if runtime == "onnx-int8":
            return ModelSource.from_bytes(quantize_onnx(path, _calibration_batches(224)), "onnx")
        with open(path, "rb") as handle:
            onnx_source = ModelSource.from_bytes(handle.read(), "onnx")
    if runtime == "onnx":
        return onnx_source
    return min((torch_source, onnx_source), key=_seconds_per_batch)


def _calibration_batches(size: int) -> list[np.ndarray]:
    """The calibration pictures centre-cropped to ``size``, in batches of four."""
    fitted = [fit_image(picture, size, "center_crop").pixels for picture in calibration_photos()]
    return [np.stack(fitted[start : start + 4]) for start in range(0, len(fitted), 4)]


def _seconds_per_batch(source: ModelSource) -> float:
    predictor = load_model(source, num_threads=1, cached=False)
    batch = torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8)
    predictor((batch,))
    start = time.perf_counter()
    predictor((batch,))
    return time.perf_counter() - start


def embedder_source(model: Any, runtime: str) -> ModelSource:
    """``model`` as a source for the tasks: the default embedder on ``runtime`` when None."""
    if model is None:
        return default_embedder(runtime)
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, (torch.nn.Module, str, os.PathLike)):
        return model_source(model)
    raise TypeError(
        f"model: give None (EfficientNet-Lite0), an nn.Module taking uint8 (N, H, W, 3) RGB, a "
        f"TorchScript/ONNX file path or a ModelSource, not {type(model).__name__}"
    )
