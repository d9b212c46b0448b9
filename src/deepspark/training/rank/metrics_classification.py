"""Classification metrics: accuracy, top-k accuracy and exact binary ROC AUC (worker side; no
pyspark).

:class:`Accuracy` and :class:`TopKAccuracy` keep two sums (correct, count); :class:`AUC` keeps
every score and all-gathers them, so its value across ranks is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from deepspark.training.rank.metrics_base import Metric, SumMetric, _collective_device, _distributed

__all__ = ["AUC", "Accuracy", "TopKAccuracy"]


def _class_predictions(outputs: torch.Tensor) -> torch.Tensor:
    # Classes sit in dimension 1, as for torch.nn.CrossEntropyLoss: (N, C) or (N, C, d1, ...).
    return outputs.argmax(dim=1)


def _class_targets(targets: torch.Tensor, predicted_shape: torch.Size, num_classes: int):
    if targets.shape == predicted_shape:
        return targets.long()
    if targets.dim() == len(predicted_shape) + 1 and targets.shape[1] == num_classes:
        return targets.argmax(dim=1)  # one-hot or class probabilities
    if targets.numel() == math.prod(predicted_shape):
        return targets.reshape(predicted_shape).long()  # (N, 1) class indices
    raise ValueError(
        f"targets of shape {tuple(targets.shape)} do not match outputs with {num_classes} "
        f"classes and predictions of shape {tuple(predicted_shape)}: pass class indices "
        "shaped like the predictions, or one-hot targets shaped like the outputs"
    )


class Accuracy(SumMetric):
    """Fraction of correct predictions.

    *Multi-class* outputs have classes in dimension 1 (``(N, C)``, or ``(N, C, d1, ...)`` as for
    ``CrossEntropyLoss``) and are logits or probabilities alike: the prediction is the argmax.
    Targets are class indices shaped like the predictions, or one-hot rows.

    *Binary* outputs are 1-D or one column, ``(N,)`` or ``(N, 1)``; the prediction is
    ``outputs > threshold``. The default threshold 0 suits logits, the outputs paired with
    ``BCEWithLogitsLoss``; for probabilities (a sigmoid layer and ``BCELoss``) use
    ``Accuracy(threshold=0.5)``. Targets are 0/1 (any dtype) or booleans.

    Parameters
    ----------
    threshold : float, default 0.0
        Decision threshold for binary outputs.
    name : str, optional
        Defaults to ``"accuracy"``.

    Examples
    --------
    >>> import torch
    >>> metric = Accuracy()
    >>> metric.update(torch.tensor([-1.5, 0.3, 2.0]), torch.tensor([0.0, 0.0, 1.0]))
    >>> round(metric.compute(), 4)
    0.6667
    """

    name = "accuracy"

    def __init__(self, threshold: float = 0.0, name: str | None = None) -> None:
        super().__init__(name)
        self.threshold = float(threshold)

    def batch_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() <= 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
            if targets.numel() != outputs.numel():
                raise ValueError(
                    f"binary outputs of shape {tuple(outputs.shape)} need one target per row, "
                    f"got targets of shape {tuple(targets.shape)}"
                )
            predicted = outputs.reshape(-1) > self.threshold
            correct = predicted == (targets.reshape(-1).double() > 0.5)
        else:
            predicted = _class_predictions(outputs)
            wanted = _class_targets(targets, predicted.shape, outputs.shape[1])
            correct = predicted == wanted
        return torch.stack(
            [
                correct.sum().double(),
                torch.tensor(correct.numel(), dtype=torch.float64, device=correct.device),
            ]
        )


class TopKAccuracy(SumMetric):
    """Fraction of rows whose target is among the ``k`` highest outputs.

    Outputs are ``(N, C)`` scores, targets ``(N,)`` class indices. With ``k >= C`` every row
    counts as correct, as in scikit-learn's ``top_k_accuracy_score``.

    Parameters
    ----------
    k : int, default 5
    name : str, optional
        Defaults to ``"top<k>_accuracy"``.

    Examples
    --------
    >>> import torch
    >>> metric = TopKAccuracy(k=2)
    >>> metric.update(torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]]), torch.tensor([2, 2]))
    >>> metric.compute()
    0.5
    """

    def __init__(self, k: int = 5, name: str | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        super().__init__(name or f"top{k}_accuracy")
        self.k = int(k)

    def batch_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() != 2:
            raise ValueError(f"{self.name} needs (N, C) outputs, got shape {tuple(outputs.shape)}")
        wanted = _class_targets(targets, outputs.shape[:1], outputs.shape[1])
        top = outputs.topk(min(self.k, outputs.shape[1]), dim=1).indices
        correct = (top == wanted.unsqueeze(1)).any(dim=1)
        return torch.stack(
            [
                correct.sum().double(),
                torch.tensor(correct.numel(), dtype=torch.float64, device=correct.device),
            ]
        )


def _binary_scores(outputs: torch.Tensor, name: str) -> torch.Tensor:
    if outputs.dim() <= 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        return outputs.reshape(-1)
    if outputs.dim() == 2 and outputs.shape[1] == 2:
        # The logit margin ranks rows exactly as the softmax probability of class 1 does.
        return outputs[:, 1] - outputs[:, 0]
    raise ValueError(
        f"{name} is binary ROC AUC: outputs must be (N,), (N, 1) or (N, 2), got "
        f"{tuple(outputs.shape)}; for more classes pass a torchmetrics metric"
    )


class AUC(Metric):
    """Exact binary ROC AUC (``sklearn.metrics.roc_auc_score``), ties counted half.

    Outputs are scores for class 1: ``(N,)`` or ``(N, 1)`` logits or probabilities (AUC only
    depends on their order), or ``(N, 2)`` two-class logits, scored by their margin. Targets are
    0/1. The metric keeps every score, 16 bytes a row, and :meth:`reduce` all-gathers them, so
    the value across ranks is exact. ``nan`` when only one class was seen.

    Examples
    --------
    >>> import torch
    >>> metric = AUC()
    >>> metric.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    >>> metric.compute()
    0.75
    """

    name = "auc"

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        scores = _binary_scores(outputs.detach(), self.name).to("cpu", torch.float64)
        labels = targets.detach().reshape(-1).to("cpu", torch.float64)
        if labels.numel() != scores.numel():
            raise ValueError(f"{self.name}: {scores.numel()} scores but {labels.numel()} targets")
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError(f"{self.name} needs 0/1 targets, got other values")
        self._scores.append(scores)
        self._labels.append(labels)

    def _pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.zeros(0, dtype=torch.float64)
        scores = torch.cat(self._scores) if self._scores else empty
        labels = torch.cat(self._labels) if self._labels else empty
        return scores, labels

    def state(self) -> torch.Tensor:
        """Return all scores followed by all labels (not additive; see :meth:`reduce`)."""
        scores, labels = self._pairs()
        return torch.cat([scores, labels])

    def load_state(self, state: torch.Tensor) -> None:
        if state.numel() % 2:
            raise ValueError(f"{self.name}: a state holds scores and labels, got an odd length")
        scores, labels = state.detach().to("cpu", torch.float64).reshape(2, -1)
        self._scores, self._labels = [scores.clone()], [labels.clone()]

    def reduce(self, group: Any = None) -> None:
        """All-gather every rank's scores and labels (collective; ranks may hold different
        numbers of rows, none included)."""
        if not _distributed(group):
            return
        device = _collective_device(group)
        ranks = dist.get_world_size(group)
        local = self.state().reshape(2, -1).to(device)
        size = torch.tensor([local.shape[1]], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(ranks)]
        dist.all_gather(sizes, size, group=group)
        counts = [int(count.item()) for count in sizes]
        if max(counts) == 0:
            return  # no rank saw a row: nothing to gather
        padded = torch.zeros(2, max(counts), dtype=torch.float64, device=device)
        padded[:, : local.shape[1]] = local
        gathered = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(gathered, padded, group=group)
        combined = torch.cat(
            [part[:, :count] for part, count in zip(gathered, counts, strict=True)], dim=1
        )
        self.load_state(combined.reshape(-1).cpu())

    def compute(self) -> float:
        scores, labels = self._pairs()
        positives = labels == 1
        num_positive = int(positives.sum())
        num_negative = labels.numel() - num_positive
        if num_positive == 0 or num_negative == 0:
            return math.nan
        # Mann-Whitney U: the AUC is the normalised rank sum of the positives, ties averaged.
        order = scores.argsort()
        _, tie_group, tie_sizes = torch.unique_consecutive(
            scores[order], return_inverse=True, return_counts=True
        )
        last_rank = tie_sizes.cumsum(0).double()
        mean_rank = last_rank - (tie_sizes.double() - 1) / 2
        ranks = mean_rank[tie_group]
        positive_rank_sum = ranks[positives[order]].sum().item()
        u_statistic = positive_rank_sum - num_positive * (num_positive + 1) / 2
        return u_statistic / (num_positive * num_negative)

    def reset(self) -> None:
        self._scores, self._labels = [], []
