"""The torchmetrics classes deepspark defines itself (worker side; no pyspark).

:class:`CallableMetric` averages a user's function exactly over rows;
:class:`MulticlassArgmaxAccuracy` is the built-in multiclass ``accuracy``, counted from the raw
outputs' argmax. Both keep two float64 sums, which torchmetrics sums over the ranks.
`deepspark.training.rank.metrics` makes them (``get_metric``) and reduces them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torchmetrics

__all__ = ["CallableMetric", "MulticlassArgmaxAccuracy"]


class CallableMetric(torchmetrics.Metric):
    """A metric from a function ``fn(outputs, targets)``, averaged exactly over rows.

    ``fn`` returns either a scalar batch mean (as a ``torch.nn`` loss with the default
    ``reduction="mean"``) or one value per row; both give the mean over every row of every
    rank. The states are two float64 sums.

    Examples
    --------
    >>> import torch
    >>> metric = CallableMetric(torch.nn.functional.l1_loss)
    >>> metric.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    >>> float(metric.compute())
    1.5
    """

    full_state_update = False

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fn = fn
        self.name = getattr(fn, "__name__", None) or type(fn).__name__
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        rows = int(outputs.shape[0]) if outputs.dim() > 0 else 1
        if rows == 0:  # the mean of nothing is nan; an empty batch adds nothing
            return
        result = torch.as_tensor(self.fn(outputs, targets)).detach().double()
        if result.numel() == 1:
            total = result.reshape(()) * rows
        elif result.dim() >= 1 and result.shape[0] == rows:
            total = result.reshape(rows, -1).mean(dim=1).sum()
        else:
            raise ValueError(
                f"metric {self.name!r} returned shape {tuple(result.shape)} for a batch of "
                f"{rows} rows: return a scalar batch mean or one value per row"
            )
        self.total += total.to(self.total.device)
        self.rows += rows

    def compute(self) -> torch.Tensor:
        return self.total / self.rows if self.rows > 0 else torch.tensor(math.nan)


class MulticlassArgmaxAccuracy(torchmetrics.Metric):
    """The share of positions whose largest output is the target class (micro average).

    It reads the model's outputs as they are: the argmax of logits, of probabilities and of
    their softmax is the same class, so no softmax and no float64 copy are made per batch.
    Outputs are ``(N, C)`` or ``(N, C, d1, ...)``; targets hold class indices, ``(N,)`` or
    ``(N, d1, ...)``. The counts stay on the outputs' device: no host sync per batch.

    Examples
    --------
    >>> import torch
    >>> metric = MulticlassArgmaxAccuracy()
    >>> metric.update(torch.tensor([[2.0, -1.0], [0.1, 0.3]]), torch.tensor([0, 0]))
    >>> float(metric.compute())
    0.5
    """

    full_state_update = False
    reads_raw_outputs = True  # EpochMetric hands it the outputs unconverted

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        predicted = outputs.argmax(dim=1)
        hits = predicted == targets.reshape(predicted.shape)
        self.correct += hits.sum().to(self.correct.device)
        self.total += hits.numel()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total if self.total > 0 else torch.tensor(math.nan)
