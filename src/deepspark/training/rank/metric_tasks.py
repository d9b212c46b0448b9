"""The task a built-in metric measures, inferred from a batch, and the built-in metrics.

Worker side; no pyspark. `deepspark.training.rank.metrics` (whose docstring states the rules
for users) makes an `EpochMetric` from a name in `CLASSIFICATION_METRICS`,
`REGRESSION_METRICS` or `TOP_K_NAME`; at its first batch the metric's `Task` (binary,
multiclass, multilabel, regression; logits or probabilities) is inferred here, and each batch
is shaped for the torchmetrics class of that task (`prepared_batch`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchmetrics
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr

__all__ = [
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "TASK_KINDS",
    "TOP_K_NAME",
    "Task",
    "batch_rows",
    "classification_task",
    "empty_batch",
    "prepared_batch",
    "reads_raw_outputs",
    "regression_task",
    "top_k_accuracy",
    "whole_targets",
]

TASK_KINDS = ("binary", "multiclass", "multilabel", "regression")


@dataclass(frozen=True)
class Task:
    """What a built-in metric measures, inferred from its first batch (rules: `metrics`).

    ``kind`` is ``"binary"``, ``"multiclass"``, ``"multilabel"`` or ``"regression"``; ``width``
    the number of classes, labels or regression outputs (1 for binary); ``logits`` whether the
    outputs are logits rather than probabilities.
    """

    kind: str
    width: int
    logits: bool = False

    def encoded(self) -> list[int]:
        return [TASK_KINDS.index(self.kind) + 1, self.width, int(self.logits)]


def batch_rows(outputs: torch.Tensor) -> int:
    return int(outputs.shape[0]) if outputs.dim() > 0 else 1


def classification_task(
    outputs: torch.Tensor, targets: torch.Tensor, name: str, logits: bool | None = None
) -> Task:
    """The batch's task; ``logits`` when already known (no look at the values then). Values
    outside [0, 1] are logits, and so are multiclass scores whose classes do not sum to 1."""
    if logits is None:
        logits = bool(((outputs < 0) | (outputs > 1)).any())
    if outputs.dim() <= 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        if targets.numel() == batch_rows(outputs):
            return Task("binary", 1, logits)
    elif targets.shape == outputs.shape:
        return Task("multilabel", int(outputs.shape[1]), logits)
    elif targets.numel() * outputs.shape[1] == outputs.numel():
        if not logits:  # probabilities sum to 1 over the classes (dim 1), to the dtype's rounding
            tolerance = 1e-2 if outputs.element_size() < 4 else 1e-4
            logits = bool(((outputs.double().sum(dim=1) - 1).abs() > tolerance).any())
        return Task("multiclass", int(outputs.shape[1]), logits)
    raise ValueError(
        f"{name}: outputs of shape {tuple(outputs.shape)} do not match targets of shape "
        f"{tuple(targets.shape)}: binary outputs are (N,) or (N, 1) with one 0/1 target per "
        "row; (N, C) outputs take one class index per row (multiclass) or (N, C) 0/1 targets "
        "(multilabel)"
    )


def regression_task(outputs: torch.Tensor, targets: torch.Tensor, name: str) -> Task:
    if outputs.numel() != targets.numel():
        raise ValueError(
            f"{name}: outputs of shape {tuple(outputs.shape)} and targets of shape "
            f"{tuple(targets.shape)} have different sizes"
        )
    rows = batch_rows(outputs)
    return Task("regression", outputs.numel() // rows if rows else 1)


def whole_targets(targets: torch.Tensor, name: str) -> torch.Tensor:
    if targets.is_floating_point() and not bool((targets == targets.round()).all()):
        raise ValueError(f"{name}: class targets must be whole numbers, got fractions")
    return targets.long()


def prepared_batch(
    task: Task, outputs: torch.Tensor, targets: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape and type the batch as the torchmetrics class of ``task`` expects it; logits become
    probabilities here, so torchmetrics never decides batch by batch."""
    scores = outputs.double()  # float64 keeps large logits apart after the sigmoid
    rows = batch_rows(outputs)
    if task.kind == "regression":
        shape = (rows,) if task.width == 1 else (rows, task.width)
        return scores.reshape(shape), targets.double().reshape(shape)
    if task.logits:
        scores = scores.softmax(dim=1) if task.kind == "multiclass" else scores.sigmoid()
    labels = whole_targets(targets, name)
    if task.kind == "binary":
        return scores.reshape(-1), labels.reshape(-1)
    if task.kind == "multiclass":
        return scores, labels.reshape(rows, *outputs.shape[2:])
    return scores, labels


def empty_batch(task: Task, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of no rows shaped for ``task``: a rank without data joins the sync with it, so
    list states have the same number of dimensions and dtype on every rank."""
    width = () if task.kind == "binary" or task.width == 1 else (task.width,)
    scores = torch.zeros(0, *width, dtype=torch.float64, device=device)
    if task.kind == "regression":
        return scores, scores.clone()
    labels = () if task.kind != "multilabel" else (task.width,)
    return scores, torch.zeros(0, *labels, dtype=torch.long, device=device)


def _accuracy(task: Task) -> torchmetrics.Metric:
    if task.kind == "multilabel":
        return tmc.MultilabelExactMatch(num_labels=task.width)
    if task.kind == "multiclass":
        return _multiclass_accuracy(task, top_k=1)
    return tmc.BinaryAccuracy()


def _multiclass_accuracy(task: Task, top_k: int) -> torchmetrics.Metric:
    """The share of positions whose target is among the ``top_k`` largest outputs (micro).

    It reads the outputs as they are (`reads_raw_outputs`): the order of logits, of
    probabilities and of their softmax is the same, so no softmax and no float64 copy is made
    per batch, and targets are not checked against the classes (no host sync per batch).
    """
    return tmc.MulticlassAccuracy(
        num_classes=task.width,
        top_k=min(top_k, task.width),
        average="micro",
        multidim_average="global",
        validate_args=False,
    )


def reads_raw_outputs(metric: torchmetrics.Metric | None) -> bool:
    return isinstance(metric, tmc.MulticlassAccuracy)


def top_k_accuracy(k: int) -> Callable[[Task], torchmetrics.Metric]:
    def build(task: Task) -> torchmetrics.Metric:
        if task.kind != "multiclass":
            raise ValueError(
                f"top{k}_accuracy needs multiclass outputs (N, C) with class-index targets, "
                f"got a {task.kind} task"
            )
        return _multiclass_accuracy(task, top_k=k)

    return build


def _averaged(binary: type, multiclass: type, multilabel: type) -> Callable[[Task], Any]:
    def build(task: Task) -> torchmetrics.Metric:
        if task.kind == "multiclass":
            return multiclass(num_classes=task.width, average="macro")
        if task.kind == "multilabel":
            return multilabel(num_labels=task.width, average="macro")
        return binary()

    return build


CLASSIFICATION_METRICS: dict[str, Callable[[Task], torchmetrics.Metric]] = {
    "accuracy": _accuracy,
    "precision": _averaged(tmc.BinaryPrecision, tmc.MulticlassPrecision, tmc.MultilabelPrecision),
    "recall": _averaged(tmc.BinaryRecall, tmc.MulticlassRecall, tmc.MultilabelRecall),
    "f1": _averaged(tmc.BinaryF1Score, tmc.MulticlassF1Score, tmc.MultilabelF1Score),
    "auc": _averaged(tmc.BinaryAUROC, tmc.MulticlassAUROC, tmc.MultilabelAUROC),
}
CLASSIFICATION_METRICS["roc_auc"] = CLASSIFICATION_METRICS["auc"]
REGRESSION_METRICS: dict[str, Callable[[Task], torchmetrics.Metric]] = {
    "mse": lambda task: tmr.MeanSquaredError(),
    "mae": lambda task: tmr.MeanAbsoluteError(),
    "rmse": lambda task: tmr.MeanSquaredError(squared=False),
    "r2": lambda task: tmr.R2Score(),
}
TOP_K_NAME = re.compile(r"top_?(\d+)_accuracy")
