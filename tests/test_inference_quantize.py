"""int8 copies of ONNX models: calibrated on real photos, they answer like the float model on
photos the calibration never saw, and bad calibration is refused with the argument named."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from skimage import data

from deepspark.inference import QuantizationError, export_onnx, quantize_onnx
from deepspark.vision.decoding import fit_image
from deepspark.vision.samples import calibration_photos


class SmallNet(torch.nn.Module):
    """Two inputs: an image (NCHW float) and a per-row scale."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(64, 16),
        )

    def forward(self, images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.features(images) * scale


def _nchw(pictures: list[np.ndarray]) -> np.ndarray:
    fitted = np.stack([fit_image(picture, 64, "center_crop").pixels for picture in pictures])
    return (fitted.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantize") / "net.onnx"
    sample = (torch.rand(2, 3, 64, 64), torch.ones(2, 1))
    export_onnx(SmallNet(), str(path), sample, input_names=["images", "scale"], dynamo=False)
    return str(path)


def test_int8_answers_like_float_on_photos_it_was_not_calibrated_on(float_model):
    calibration = _nchw(calibration_photos())
    batches = [
        {"images": images, "scale": np.ones((len(images), 1), np.float32)}
        for images in np.split(calibration, range(4, len(calibration), 4))
    ]
    quantized = quantize_onnx(float_model, batches)
    with open(float_model, "rb") as handle:
        float_bytes = handle.read()
    assert quantize_onnx(float_bytes, batches) == quantized  # a path or the bytes alike
    unseen = {
        "images": _nchw([data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]),
        "scale": np.full((4, 1), 2.0, np.float32),
    }
    expected = onnxruntime.InferenceSession(float_model).run(None, unseen)[0]
    got = onnxruntime.InferenceSession(quantized).run(None, unseen)[0]
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1)
    cosine = (expected * got).sum(1) / norms
    assert (cosine > 0.98).all(), cosine
    assert not np.array_equal(expected, got)  # int8 arithmetic, not the float model again


def test_bad_calibration_is_refused(float_model):
    images = _nchw(calibration_photos()[:4])
    with pytest.raises(ValueError, match="calibration: give at least one batch"):
        quantize_onnx(float_model, [])
    with pytest.raises(ValueError, match=r"lacks the model's inputs \['scale'\]"):
        quantize_onnx(float_model, [{"images": images}])
    with pytest.raises(ValueError, match="has 2 inputs"):
        quantize_onnx(float_model, [images])
    with pytest.raises(ValueError, match="min_cosine=0"):
        quantize_onnx(float_model, [{"images": images, "scale": np.ones((4, 1))}], min_cosine=0)
    # No int8 model agrees with the float one exactly: the check refuses it and says what to do.
    batch = {"images": images, "scale": np.ones((4, 1), np.float32)}
    with pytest.raises(QuantizationError, match="calibrate on data closer"):
        quantize_onnx(float_model, [batch], min_cosine=1.0)
