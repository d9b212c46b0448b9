"""Regression metrics: mean squared, root mean squared and mean absolute error (worker side;
no pyspark).

Each keeps two sums over all output elements (the total error and the element count), so the
value reduced across ranks is exact.
"""

from __future__ import annotations

import math

import torch

from deepspark.training.rank.metrics_base import SumMetric

__all__ = ["MAE", "MSE", "RMSE"]


def _aligned(outputs: torch.Tensor, targets: torch.Tensor, name: str):
    # (N, 1) outputs against (N,) targets would broadcast to (N, N): align them explicitly.
    if outputs.shape != targets.shape:
        if outputs.numel() != targets.numel():
            raise ValueError(
                f"{name}: outputs of shape {tuple(outputs.shape)} and targets of shape "
                f"{tuple(targets.shape)} have different sizes"
            )
        targets = targets.reshape(outputs.shape)
    return outputs.double(), targets.double()


class MSE(SumMetric):
    """Mean squared error over all output elements (``sklearn.metrics.mean_squared_error``).

    Examples
    --------
    >>> import torch
    >>> metric = MSE()
    >>> metric.update(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))
    >>> metric.compute()
    2.5
    """

    name = "mse"

    def batch_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs, targets = _aligned(outputs, targets, self.name)
        squared = (outputs - targets).square()
        return torch.stack(
            [squared.sum(), torch.tensor(squared.numel(), dtype=torch.float64).to(squared)]
        )


class RMSE(MSE):
    """Root mean squared error: the square root of the reduced :class:`MSE`.

    Examples
    --------
    >>> import torch
    >>> metric = RMSE()
    >>> metric.update(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]))
    >>> round(metric.compute(), 4)
    3.5355
    """

    name = "rmse"

    def value(self, stats: list[float]) -> float:
        return math.sqrt(super().value(stats))


class MAE(SumMetric):
    """Mean absolute error over all output elements (``sklearn.metrics.mean_absolute_error``).

    Examples
    --------
    >>> import torch
    >>> metric = MAE()
    >>> metric.update(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]))
    >>> metric.compute()
    1.5
    """

    name = "mae"

    def batch_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs, targets = _aligned(outputs, targets, self.name)
        absolute = (outputs - targets).abs()
        return torch.stack(
            [absolute.sum(), torch.tensor(absolute.numel(), dtype=torch.float64).to(absolute)]
        )
