"""Static int8 quantization of an ONNX model, calibrated on real inputs and verified.

ONNX Runtime's quantizer rewrites the operators it can (or the ones chosen) to int8 weights
and uint8 activations, with each activation's range measured on the
calibration batches. On a CPU with VNNI instructions such a model runs about twice as fast
as the float one. Its outputs move a little: :func:`quantize_onnx` compares them with the
float model's on the calibration batches and refuses a result whose rows point elsewhere
(cosine similarity below ``min_cosine``), so a file it returns is one that still answers like
the float model on that data.

Driver or worker side; it needs ``onnx`` and ``onnxruntime`` (the ``onnx`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from deepspark.errors import DeepsparkError
from deepspark.inference.runtimes import import_onnxruntime

__all__ = ["QuantizationError", "quantize_onnx"]

DEFAULT_MIN_COSINE = 0.9


class QuantizationError(DeepsparkError, RuntimeError):
    """The quantized model's outputs drift too far from the float model's."""


def _feeds(
    calibration: Iterable[np.ndarray | Mapping[str, np.ndarray]], input_names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    feeds = []
    for batch in calibration:
        if isinstance(batch, Mapping):
            missing = set(input_names) - set(batch)
            if missing:
                raise ValueError(
                    f"calibration: a batch lacks the model's inputs {sorted(missing)}; give a "
                    f"dict with every one of {list(input_names)}"
                )
            feeds.append({name: np.asarray(batch[name]) for name in input_names})
        elif len(input_names) == 1:
            feeds.append({input_names[0]: np.asarray(batch)})
        else:
            raise ValueError(
                f"calibration: the model has {len(input_names)} inputs {list(input_names)}; give "
                "each batch as a dict of arrays by input name"
            )
    if not feeds:
        raise ValueError("calibration: give at least one batch of the model's real inputs")
    return feeds


def _agreement(float_rows: np.ndarray, int8_rows: np.ndarray) -> float:
    """The smallest cosine similarity between matching rows of two outputs."""
    a = float_rows.reshape(len(float_rows), -1).astype(np.float64)
    b = int8_rows.reshape(len(int8_rows), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min((a * b).sum(axis=1) / np.maximum(norms, 1e-12)))


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def quantize_onnx(
    model: str | os.PathLike[str] | bytes,
    calibration: Iterable[np.ndarray | Mapping[str, np.ndarray]],
    *,
    op_types: Sequence[str] | None = None,
    per_channel: bool = True,
    reduce_range: bool = True,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> bytes:
    """An int8 copy of an ONNX model, calibrated on ``calibration`` and checked against it.

    Parameters
    ----------
    model : str, PathLike or bytes
        The float ONNX model: a local file or its bytes.
    calibration : iterable of ndarray or dict
        Batches of real inputs, as the model takes them (a dict by input name when it has
        more than one input). Each activation's int8 range is measured on them, so they
        should look like the data the model will see.
    op_types : sequence of str, optional
        The ONNX operators to quantize, the others staying float (``("Conv",)`` keeps a
        detector's box decoding exact, for example). Default: every operator the quantizer
        supports, which keeps a chain of int8 operators in int8 between them.
    per_channel : bool
        One weight scale per output channel (more accurate for convolutions).
    reduce_range : bool
        Quantize weights to 7 bits instead of 8 (the default). CPUs with AVX2 or AVX-512 but
        without VNNI (AMD Zen 3, Intel before Cascade Lake) multiply uint8 by int8 with an
        instruction that saturates, and a full-range model's outputs drift there (a cosine of
        0.81 for EfficientNet-Lite0 on an AMD EPYC, against 0.92 with 7 bits). The model is
        built on the driver and runs on executors whose CPUs it cannot see, so the portable
        setting is the default; ``False`` keeps one more bit where every executor has VNNI.
    min_cosine : float
        The least cosine similarity accepted between the float and the int8 output of any
        one calibration row.

    Returns
    -------
    bytes
        The quantized model, for :meth:`ModelSource.from_bytes` or a file.

    Raises
    ------
    ValueError
        For empty calibration or batches that do not match the model's inputs.
    QuantizationError
        When an output row of the int8 model has a cosine similarity below ``min_cosine``
        with the float model's.

    Examples
    --------
    >>> import torch
    >>> from deepspark.inference import export_onnx
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten())
    >>> folder = tempfile.mkdtemp()
    >>> path = export_onnx(net, f"{folder}/net.onnx", torch.rand(2, 3, 16, 16))
    >>> batches = [np.random.default_rng(0).random((4, 3, 16, 16), np.float32)]
    >>> import onnxruntime
    >>> session = onnxruntime.InferenceSession(quantize_onnx(path, batches))
    >>> session.run(None, {"input_0": batches[0]})[0].shape
    (4, 1568)
    """
    onnxruntime = import_onnxruntime()
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:  # the quantizer imports onnx
        raise ImportError("quantize_onnx needs onnx: run `pip install 'deepspark[onnx]'`") from err
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine={min_cosine!r}: give a value in (0, 1]")
    with tempfile.TemporaryDirectory(prefix="deepspark-quantize-") as folder:
        source = os.path.join(folder, "float.onnx")
        if isinstance(model, bytes):
            with open(source, "wb") as handle:
                handle.write(model)
        else:
            source = os.fspath(model)
        float_session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
        feeds = _feeds(calibration, [given.name for given in float_session.get_inputs()])

        class Batches(CalibrationDataReader):
            def __init__(self) -> None:
                self.remaining = iter(feeds)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.remaining, None)

        # ONNX Runtime's pre-processing folds the shape arithmetic (a "same" padding computed
        # from the input's shape, for example) into constants first: without it the quantized
        # operators cannot fuse, and the int8 model runs hardly faster than the float one.
        prepared = os.path.join(folder, "prepared.onnx")
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        target = os.path.join(folder, "int8.onnx")
        chosen = {} if op_types is None else {"op_types_to_quantize": list(op_types)}
        with _quantizer_advice_silenced():
            quantize_static(
                prepared,
                target,
                Batches(),
                quant_format=QuantFormat.QDQ,
                **chosen,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        with open(target, "rb") as handle:
            quantized = handle.read()
        int8_session = onnxruntime.InferenceSession(quantized, providers=["CPUExecutionProvider"])
        for feed in feeds:
            for expected, got in zip(
                float_session.run(None, feed), int8_session.run(None, feed), strict=True
            ):
                cosine = _agreement(np.asarray(expected), np.asarray(got))
                if cosine < min_cosine:
                    raise QuantizationError(
                        f"an int8 output row has cosine similarity {cosine:.3f} with the float "
                        f"model's (min_cosine={min_cosine}): quantize fewer op_types, calibrate "
                        "on data closer to the real inputs, or keep the float model"
                    )
        return quantized


@contextlib.contextmanager
def _quantizer_advice_silenced() -> Iterator[None]:
    """Drop the quantizer's advice to pre-process the model, which it logs on the root logger
    for every call even when, as here, the model was pre-processed."""

    def advice(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
