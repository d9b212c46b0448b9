"""The torchmetrics class deepspark defines itself (worker side; no pyspark).

:class:`CallableMetric` averages a user's function exactly over rows, as torchmetrics'
``MeanMetric`` weighted by each batch's rows. `deepspark.training.rank.metrics` makes it
(``get_metric``) and reduces it. The built-in metrics are torchmetrics' own classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchmetrics.aggregation import MeanMetric

__all__ = ["CallableMetric"]


class CallableMetric(MeanMetric):
    """A metric from a function ``fn(outputs, targets)``, averaged exactly over rows.

    ``fn`` returns either a scalar batch mean (as a ``torch.nn`` loss with the default
    ``reduction="mean"``) or one value per row; both give the mean over every row of every
    rank. The states are torchmetrics' weighted sum and weight, in float64; a ``nan`` from
    ``fn`` makes the mean ``nan`` (it is not dropped).

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
        kwargs.setdefault("nan_strategy", "disable")
        super().__init__(**kwargs)
        self.set_dtype(torch.float64)  # sums stay exact over many rows
        self.fn = fn
        self.name = getattr(fn, "__name__", None) or type(fn).__name__

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:  # type: ignore[override]
        rows = int(outputs.shape[0]) if outputs.dim() > 0 else 1
        if rows == 0:  # the mean of nothing is nan; an empty batch adds nothing
            return
        result = torch.as_tensor(self.fn(outputs, targets)).detach().double()
        # one value per row, each of weight 1 (torchmetrics ignores weights when NaNs are kept)
        if result.numel() == 1:
            super().update(result.reshape(1).expand(rows))
        elif result.dim() >= 1 and result.shape[0] == rows:
            super().update(result.reshape(rows, -1).mean(dim=1))
        else:
            raise ValueError(
                f"metric {self.name!r} returned shape {tuple(result.shape)} for a batch of "
                f"{rows} rows: return a scalar batch mean or one value per row"
            )
