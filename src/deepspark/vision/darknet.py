"""Darknet YOLO networks (``.cfg`` + ``.weights``) as torch modules.

OpenCV DNN runs a Darknet network one image at a time. The same network as a torch module
runs batches and exports to ONNX for ONNX Runtime; :class:`DarknetRunner` runs any of the
three, and :func:`fastest_runtime` measures which is fastest here. The module reads
the layer types YOLOv3 and YOLOv3-tiny use (convolutional, maxpool, upsample, route,
shortcut, yolo) and gives the rows OpenCV gives: per anchor and cell, the box centre and
size as fractions of the input, the objectness, then each class's score times the
objectness (zero when at most :data:`SCORE_FLOOR`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional

__all__ = ["DarknetNetwork", "read_cfg"]

BN_EPSILON = 1e-6
"""Darknet's batch-norm epsilon (it adds .000001 to the variance)."""

SCORE_FLOOR = 0.2
"""Class scores at or below this are zeroed, as Darknet and OpenCV's YOLO layer do."""


@dataclass
class Section:
    """One ``[kind]`` block of a Darknet cfg and its ``key=value`` options."""

    kind: str
    options: dict[str, str] = field(default_factory=dict)

    def int(self, key: str, default: int | None = None) -> int:
        if key not in self.options:
            if default is None:
                raise ValueError(f"[{self.kind}] has no {key}=")
            return default
        return int(self.options[key])

    def ints(self, key: str) -> list[int]:
        return [int(value) for value in self.options[key].split(",") if value.strip()]


def read_cfg(path: str) -> list[Section]:
    """The sections of a Darknet cfg file, ``[net]`` first."""
    sections: list[Section] = []
    with open(path) as handle:
        for raw in handle:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                sections.append(Section(line[1:-1].strip().lower()))
            elif "=" in line and sections:
                key, value = line.split("=", 1)
                sections[-1].options[key.strip()] = value.strip()
    if not sections or sections[0].kind not in ("net", "network"):
        raise ValueError(f"{path} is not a Darknet cfg: it does not start with [net]")
    return sections


class _Conv(nn.Module):
    """A convolution with its batch norm folded in, then leaky ReLU or nothing."""

    def __init__(self, section: Section, channels: int) -> None:
        super().__init__()
        size = section.int("size")
        self.batch_norm = bool(section.int("batch_normalize", 0))
        self.leaky = section.options.get("activation", "linear") == "leaky"
        if section.options.get("activation", "linear") not in ("leaky", "linear"):
            raise ValueError(f"activation={section.options['activation']!r} is not supported")
        padding = size // 2 if section.int("pad", 0) else section.int("padding", 0)
        self.conv = nn.Conv2d(
            channels, section.int("filters"), size, section.int("stride", 1), padding, bias=True
        )

    def load(self, values: np.ndarray, offset: int) -> int:
        """Read this layer's weights from Darknet's flat float32 array at ``offset``."""
        out_channels = self.conv.out_channels
        weight_count = self.conv.weight.numel()
        needed = out_channels * (4 if self.batch_norm else 1) + weight_count
        if offset + needed > len(values):
            raise ValueError("the weights file ends before the network does: wrong cfg?")
        take = lambda count: values[offset : offset + count]  # noqa: E731
        bias = take(out_channels).copy()
        offset += out_channels
        if self.batch_norm:
            scales, mean, variance = (
                values[offset + i * out_channels : offset + (i + 1) * out_channels]
                for i in range(3)
            )
            offset += 3 * out_channels
            factor = scales / np.sqrt(variance + BN_EPSILON)
        else:
            factor = mean = np.ones(out_channels, np.float32)
        weight = take(weight_count).reshape(self.conv.weight.shape)
        offset += weight_count
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(weight * factor[:, None, None, None]))
            folded = bias - mean * factor if self.batch_norm else bias
            self.conv.bias.copy_(torch.from_numpy(np.ascontiguousarray(folded)))
        return offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return functional.leaky_relu(x, 0.1) if self.leaky else x


class _MaxPool(nn.Module):
    """Darknet's max pool: the window may run past the right and bottom edges (those
    pixels are ignored), so a stride-1 pool keeps the size."""

    def __init__(self, size: int, stride: int) -> None:
        super().__init__()
        self.size, self.stride = size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            x = functional.pad(x, (0, self.size - 1, 0, self.size - 1), mode="replicate")
        return functional.max_pool2d(x, self.size, self.stride)


class _Yolo(nn.Module):
    """Decodes one detection head into rows of (x, y, w, h, objectness, class scores)."""

    def __init__(self, section: Section) -> None:
        super().__init__()
        pairs = section.ints("anchors")
        mask = section.ints("mask")
        anchors = torch.tensor([[pairs[2 * i], pairs[2 * i + 1]] for i in mask], dtype=torch.float)
        self.register_buffer("anchors", anchors, persistent=False)
        self.classes = section.int("classes")

    def forward(self, x: torch.Tensor, input_height: int, input_width: int) -> torch.Tensor:
        batch, _, height, width = x.shape
        count = self.anchors.shape[0]
        # (N, A, 5 + C, H, W) -> (N, H, W, A, 5 + C): OpenCV's row order, cell by cell.
        x = x.view(batch, count, 5 + self.classes, height, width).permute(0, 3, 4, 1, 2)
        rows = torch.arange(height, dtype=x.dtype, device=x.device).view(1, height, 1, 1)
        cols = torch.arange(width, dtype=x.dtype, device=x.device).view(1, 1, width, 1)
        centre_x = (torch.sigmoid(x[..., 0]) + cols) / width
        centre_y = (torch.sigmoid(x[..., 1]) + rows) / height
        box_w = torch.exp(x[..., 2]) * self.anchors[:, 0] / input_width
        box_h = torch.exp(x[..., 3]) * self.anchors[:, 1] / input_height
        objectness = torch.sigmoid(x[..., 4])
        scores = torch.sigmoid(x[..., 5:]) * objectness.unsqueeze(-1)
        scores = scores * (scores > SCORE_FLOOR)
        parts = [centre_x, centre_y, box_w, box_h, objectness]
        decoded = torch.cat([torch.stack(parts, dim=-1), scores], dim=-1)
        return decoded.reshape(batch, height * width * count, 5 + self.classes)


class DarknetNetwork(nn.Module):
    """A Darknet YOLO network: uint8 ``(N, H, W, 3)`` RGB in, with sides that are multiples
    of the network's largest stride (32 for YOLO), ``(N, rows, 5 + classes)`` out (see the
    module's docstring).

    Parameters
    ----------
    cfg, weights : str
        The network's ``.cfg`` and ``.weights`` files.

    Examples
    --------
    >>> from deepspark.vision.zoo import yolov3_tiny_files
    >>> files = yolov3_tiny_files()
    >>> network = DarknetNetwork(files.cfg, files.weights)
    >>> tuple(network(torch.zeros(1, 256, 256, 3, dtype=torch.uint8)).shape)
    (1, 960, 85)
    """

    def __init__(self, cfg: str, weights: str) -> None:
        super().__init__()
        sections = read_cfg(cfg)
        channels = [sections[0].int("channels", 3)]
        self.layers = nn.ModuleList()
        self.sources: list[list[int]] = []  # the earlier outputs each layer reads
        self.kinds: list[str] = []
        for index, section in enumerate(sections[1:]):
            below = channels[-1]
            sources = [index - 1]
            if section.kind == "convolutional":
                layer: nn.Module = _Conv(section, below)
                out = section.int("filters")
            elif section.kind == "maxpool":
                layer = _MaxPool(section.int("size"), section.int("stride", 1))
                out = below
            elif section.kind == "upsample":
                layer = nn.Upsample(scale_factor=section.int("stride", 2), mode="nearest")
                out = below
            elif section.kind == "route":
                sources = [i if i >= 0 else index + i for i in section.ints("layers")]
                layer, out = nn.Identity(), sum(channels[i + 1] for i in sources)
            elif section.kind == "shortcut":
                sources = [index - 1, index + section.int("from")]
                layer, out = nn.Identity(), below
            elif section.kind == "yolo":
                layer, out = _Yolo(section), below
            else:
                raise ValueError(f"{cfg}: Darknet layer [{section.kind}] is not supported")
            self.layers.append(layer)
            self.sources.append(sources)
            self.kinds.append(section.kind)
            channels.append(out)
        self._load(weights)
        self.eval()

    def _load(self, path: str) -> None:
        with open(path, "rb") as handle:
            major, minor, _ = np.frombuffer(handle.read(12), np.int32)
            # The count of images seen during training: 8 bytes from format 0.2 on.
            handle.read(8 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else 4)
            values = np.frombuffer(handle.read(), np.float32)
        offset = 0
        for layer in self.layers:
            if isinstance(layer, _Conv):
                offset = layer.load(values, offset)
        if offset != len(values):
            raise ValueError(
                f"{path} holds {len(values)} weights, the cfg reads {offset}: wrong cfg?"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[1], images.shape[2]
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        outputs: list[torch.Tensor] = []
        found: list[torch.Tensor] = []
        for layer, kind, sources in zip(self.layers, self.kinds, self.sources, strict=True):
            if kind == "route":
                x = torch.cat([outputs[i] for i in sources], dim=1)
            elif kind == "shortcut":
                x = outputs[sources[0]] + outputs[sources[1]]
            elif kind == "yolo":
                found.append(layer(x, height, width))
            else:
                x = layer(x)
            outputs.append(x)
        return torch.cat(found, dim=1)


EXACT_RUNTIMES = ("opencv", "torch", "onnx")
"""The ways to run a Darknet network in float32 (the same rows), slowest to set up last."""

RUNTIMES = (*EXACT_RUNTIMES, "onnx-int8")
"""Also the ONNX export quantized to int8 (about twice as fast on CPUs with VNNI)."""


class DarknetRunner:
    """Runs a Darknet network on batches of square canvases with one runtime.

    ``runner(canvases)`` takes uint8 ``(N, side, side, 3)`` RGB and returns float32
    ``(N, rows, 5 + classes)``, whatever the runtime: OpenCV DNN (one image per call), the
    torch module, or the module exported to ONNX for ONNX Runtime (one export per side),
    there optionally quantized to int8 after calibrating on ``calibration`` (canvases like
    the ones it will see; its convolutions only, so the decoding of the boxes stays float).
    """

    def __init__(
        self,
        cfg: str,
        weights: str,
        runtime: str,
        num_threads: int | None = None,
        calibration: np.ndarray | None = None,
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r}: use one of {', '.join(RUNTIMES)} or 'auto'")
        if runtime == "onnx-int8" and calibration is None:
            raise ValueError("runtime='onnx-int8' needs calibration canvases (N, side, side, 3)")
        self.runtime = runtime
        self.num_threads = num_threads
        self.calibration = calibration
        self._sessions: dict[int, object] = {}
        if runtime == "opencv":
            import cv2

            if num_threads:
                cv2.setNumThreads(num_threads)
            self.net = cv2.dnn.readNetFromDarknet(cfg, weights)
            self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            self.outputs = self.net.getUnconnectedOutLayersNames()
        else:
            if num_threads:
                torch.set_num_threads(num_threads)
            self.network = DarknetNetwork(cfg, weights)

    def __call__(self, canvases: np.ndarray) -> np.ndarray:
        if self.runtime == "opencv":
            return np.stack([self._opencv(canvas) for canvas in canvases])
        if self.runtime == "torch":
            with torch.inference_mode():
                return self.network(torch.from_numpy(canvases)).numpy()
        session = self._session(canvases.shape[1])
        return session.run(None, {"images": canvases})[0]

    def _opencv(self, canvas: np.ndarray) -> np.ndarray:
        import cv2

        blob = cv2.dnn.blobFromImage(canvas, 1 / 255.0, swapRB=False, crop=False)
        self.net.setInput(blob)
        return np.concatenate(
            [out.reshape(-1, out.shape[-1]) for out in self.net.forward(self.outputs)]
        )

    def prepare(self, side: int) -> None:
        """Build what runs ``side`` x ``side`` inputs now (the ONNX export and its int8
        quantization, seconds), not on the first call."""
        if self.runtime.startswith("onnx"):
            self._session(side)

    def _session(self, side: int):
        if side not in self._sessions:
            import os
            import tempfile

            from deepspark.inference import export_onnx, quantize_onnx
            from deepspark.inference.runtimes import import_onnxruntime, onnx_session_options

            onnxruntime = import_onnxruntime()
            sample = torch.zeros(1, side, side, 3, dtype=torch.uint8)
            with tempfile.TemporaryDirectory(prefix="deepspark-darknet-") as folder:
                # Exported and checked against torch by the inference engine's exporter.
                model = export_onnx(
                    self.network,
                    os.path.join(folder, "darknet.onnx"),
                    sample,
                    input_names=["images"],
                    output_name="rows",
                    dynamo=False,
                )
                if self.runtime == "onnx-int8":
                    model = quantize_onnx(model, self._calibration(side), op_types=("Conv",))
                options = onnx_session_options(onnxruntime, self.num_threads)
                self._sessions[side] = onnxruntime.InferenceSession(
                    model, sess_options=options, providers=["CPUExecutionProvider"]
                )
        return self._sessions[side]

    def _calibration(self, side: int) -> list[np.ndarray]:
        canvases = self.calibration
        if canvases.ndim != 4 or canvases.shape[1:] != (side, side, 3):
            raise ValueError(
                f"calibration canvases of shape {canvases.shape} cannot calibrate {side} x "
                f"{side} inputs: give uint8 (N, {side}, {side}, 3)"
            )
        return [canvases[start : start + 4] for start in range(0, len(canvases), 4)]


_fastest: dict[tuple, str] = {}


def fastest_runtime(cfg: str, weights: str, side: int, batch: int = 4) -> str:
    """The float runtime that runs a batch of ``side`` x ``side`` images fastest here on one
    thread (measured once per process and network; ONNX only when onnxruntime is installed)."""
    import time

    key = (cfg, weights, side)
    if key not in _fastest:
        try:
            import onnxruntime  # noqa: F401

            candidates = EXACT_RUNTIMES
        except ImportError:
            candidates = EXACT_RUNTIMES[:2]
        import cv2

        threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
        seconds = {}
        try:
            for runtime in candidates:
                runner = DarknetRunner(cfg, weights, runtime, num_threads=1)
                canvas = np.full((batch, side, side, 3), 114, np.uint8)
                runner(canvas)  # warm-up (and the ONNX export)
                start = time.perf_counter()
                runner(canvas)
                seconds[runtime] = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
            cv2.setNumThreads(cv2_threads)
        _fastest[key] = min(seconds, key=seconds.get)
    return _fastest[key]
