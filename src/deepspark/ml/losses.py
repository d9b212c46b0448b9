"""What a loss implies for labels and predictions, and the target-shape adapter.

No pyspark here: `TargetShapedLikeOutputs` is pickled into training tasks and runs there.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import nn

__all__ = ["LossTask", "TargetShapedLikeOutputs", "default_output_kind", "loss_task"]


class LossTask(str, Enum):
    """What a loss says about the labels and the prediction column."""

    CLASSIFICATION = "classification"  # class ids (int64 labels), one logit per class
    BINARY = "binary"  # 0/1 labels as floats, one logit per row
    REGRESSION = "regression"  # float targets shaped like the outputs
    OTHER = "other"  # unknown: the data layer's defaults, inference's 'auto' output


_TASKS: tuple[tuple[type, LossTask], ...] = (
    (nn.CrossEntropyLoss, LossTask.CLASSIFICATION),
    (nn.NLLLoss, LossTask.CLASSIFICATION),
    (nn.BCEWithLogitsLoss, LossTask.BINARY),
    (nn.MSELoss, LossTask.REGRESSION),
    (nn.L1Loss, LossTask.REGRESSION),
    (nn.SmoothL1Loss, LossTask.REGRESSION),
    (nn.HuberLoss, LossTask.REGRESSION),
)


def loss_task(loss: Any) -> LossTask:
    """The task a loss implies (torch's standard losses; anything else is `OTHER`)."""
    for loss_class, task in _TASKS:
        if isinstance(loss, loss_class):
            return task
    return LossTask.OTHER


def default_output_kind(task: LossTask) -> str:
    """What ``outputKind="auto"`` becomes for a model trained with a loss of this task."""
    if task in (LossTask.CLASSIFICATION, LossTask.BINARY):
        return "class"
    if task is LossTask.REGRESSION:
        return "double"
    return "auto"


class TargetShapedLikeOutputs(nn.Module):
    """Runs a loss on targets reshaped from ``(N,)`` to ``(N, 1)`` when the outputs are ``(N, 1)``.

    A scalar label column gives ``(N,)`` targets while a regression or binary network usually
    ends in ``nn.Linear(..., 1)``; ``MSELoss`` would broadcast the two to ``(N, N)``.
    """

    def __init__(self, loss: Any) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if (
            isinstance(outputs, torch.Tensor)
            and isinstance(targets, torch.Tensor)
            and outputs.dim() >= 1
            and outputs.shape[-1] == 1
            and targets.dim() == outputs.dim() - 1
        ):
            targets = targets.unsqueeze(-1)
        return self.loss(outputs, targets)
