"""The module a Forecaster trains: a network from `build_network` behind flat windows.

Rolled windows travel as flat float arrays (one Spark array column each for inputs and
labels), so the training engine, `deepspark.predict` and ONNX Runtime all see one 2-D input
``(batch, lookback * input_size)`` and one 2-D output ``(batch, horizon * output_size)``.
Torch only: this module runs inside Spark tasks and on machines without Java.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

LOSSES = {"mse": nn.MSELoss, "mae": nn.L1Loss, "huber": nn.HuberLoss}


class FlatWindowModel(nn.Module):
    """Reshape flat windows to ``(batch, lookback, input_size)``, run `network`, flatten its
    ``(batch, horizon, output_size)`` forecast again."""

    def __init__(
        self, network: nn.Module, lookback: int, input_size: int, horizon: int, output_size: int
    ) -> None:
        super().__init__()
        self.network = network
        self.lookback, self.input_size = lookback, input_size
        self.horizon, self.output_size = horizon, output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = x.reshape(-1, self.lookback, self.input_size)
        return self.network(windows).reshape(-1, self.horizon * self.output_size)


def make_loss(loss: str) -> nn.Module:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: choose from {sorted(LOSSES)}")
    return LOSSES[loss]()


def run_torch(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """The model's flat forecasts of flat windows `x` (rows, lookback * input_size)."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            outputs.append(model(batch.float()).numpy())
    width = getattr(model, "horizon", 0) * getattr(model, "output_size", 0)
    return np.concatenate(outputs) if outputs else np.zeros((0, width), "float32")


def run_onnx(path: str, x: np.ndarray) -> np.ndarray:
    """The same forecasts from an exported ONNX file, through ONNX Runtime."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "ONNX inference needs onnxruntime: pip install 'deepspark[onnx]'"
        ) from error
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype="float32")})[0]
