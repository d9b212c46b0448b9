"""The base classes of :mod:`deepspark.training.rank.metrics` (worker side; no pyspark).

:class:`Metric` is the protocol every metric follows: accumulate sufficient statistics on this
rank, reduce them across ranks, compute the value. :class:`SumMetric` is the usual case, whose
statistics are float64 sums that one ``all_reduce`` combines; :class:`Mean` is the simplest
such metric, a weighted mean of reported values such as the loss. Import them from
:mod:`deepspark.training.rank.metrics`, which re-exports them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Mean", "Metric", "SumMetric"]


def _distributed(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_device(group: Any = None) -> torch.device:
    """The device a collective of ``group`` needs its tensors on (NCCL only moves GPU memory)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Metric:
    """Base class of a metric whose value is exact across ranks.

    A metric accumulates sufficient statistics with :meth:`update`, combines them across ranks
    with :meth:`reduce` (collectively: every rank calls it), and turns them into a number with
    :meth:`compute`. :meth:`state` and :meth:`load_state` expose the statistics as one flat
    float64 tensor; the default :meth:`reduce` sums that tensor over the ranks, so a subclass
    whose statistics add up only implements the five abstract methods.

    Parameters
    ----------
    name : str, optional
        The key under which the value is reported; defaults to the class's ``name``.

    Examples
    --------
    >>> import torch
    >>> from deepspark.training.rank.metrics import get_metric
    >>> metric = get_metric("accuracy")
    >>> metric.update(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    >>> metric.compute()
    0.5
    """

    name: str = "metric"

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch of model outputs and targets to the statistics."""
        raise NotImplementedError

    def state(self) -> torch.Tensor:
        """Return the statistics as a flat float64 CPU tensor."""
        raise NotImplementedError

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the statistics with ``state``, a tensor shaped like :meth:`state`'s."""
        raise NotImplementedError

    def compute(self) -> float:
        """Return the metric's value over everything added (and reduced) so far."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget all statistics, ready for a new epoch."""
        raise NotImplementedError

    def reduce(self, group: Any = None) -> None:
        """Replace this rank's statistics with those of all ranks together.

        Collective: every rank of ``group`` must call it, in the same order for all metrics.
        A no-op without an initialised process group of more than one rank. Calling it twice
        without :meth:`reset` counts the other ranks' data twice.

        Parameters
        ----------
        group : torch.distributed.ProcessGroup, optional
            The ranks to reduce over; the default group when omitted.
        """
        if not _distributed(group):
            return
        total = self.state().to(_collective_device(group))
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        self.load_state(total.cpu())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class SumMetric(Metric):
    """A metric whose sufficient statistics are a fixed number of float64 sums.

    Subclasses implement :meth:`batch_stats` (the statistics of one batch) and, unless the
    metric is a total over a count, :meth:`value` (the metric from the summed statistics) and
    ``num_stats``. The sums stay on the device of the outputs, so updating does not wait for a
    GPU.

    Examples
    --------
    >>> import torch
    >>> class MeanBias(SumMetric):
    ...     name, num_stats = "bias", 2
    ...     def batch_stats(self, outputs, targets):
    ...         difference = (outputs - targets).double()
    ...         return torch.stack([difference.sum(), torch.tensor(difference.numel())])
    >>> metric = MeanBias()
    >>> metric.update(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))
    >>> metric.compute()
    2.0
    """

    num_stats: int = 2

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._stats: torch.Tensor | None = None

    def batch_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the ``num_stats`` statistics of one batch as a float64 tensor."""
        raise NotImplementedError

    def value(self, stats: list[float]) -> float:
        """Return the metric from the summed statistics (plain floats).

        The default is the ratio ``stats[0] / stats[1]`` (a total over a count), ``nan``
        when the count is 0.
        """
        total, count = stats[0], stats[1]
        return total / count if count else math.nan

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.no_grad():
            stats = self.batch_stats(outputs.detach(), targets.detach()).to(torch.float64)
        if self._stats is None:
            self._stats = stats.clone()
        else:
            self._stats += stats.to(self._stats.device)

    def state(self) -> torch.Tensor:
        if self._stats is None:
            return torch.zeros(self.num_stats, dtype=torch.float64)
        return self._stats.detach().to("cpu", torch.float64).clone()

    def load_state(self, state: torch.Tensor) -> None:
        if state.numel() != self.num_stats:
            raise ValueError(
                f"metric {self.name!r} has {self.num_stats} statistics, got a state of "
                f"{state.numel()}"
            )
        self._stats = state.detach().to("cpu", torch.float64).reshape(-1).clone()

    def compute(self) -> float:
        return float(self.value(self.state().tolist()))

    def reset(self) -> None:
        self._stats = None


class Mean(SumMetric):
    """Weighted mean of reported values, for the loss.

    ``update(values, weights)``: a scalar ``values`` is one batch mean (the usual loss) and
    counts ``weights`` times (the batch size; 1 when omitted); a 1-D ``values`` are individual
    samples, each counted once or with its own weight.

    Examples
    --------
    >>> import torch
    >>> loss = Mean("loss")
    >>> loss.update(torch.tensor(1.0), 3)
    >>> loss.update(torch.tensor(2.0), 1)
    >>> loss.compute()
    1.25
    """

    name = "mean"

    def update(self, values: torch.Tensor | float, weights: Any = None) -> None:  # type: ignore[override]
        values = torch.as_tensor(values).detach().double()
        if weights is None:
            weights = torch.ones_like(values)
        weights = torch.as_tensor(weights, dtype=torch.float64).to(values.device)
        weights = weights.expand_as(values)
        # A zero weight (an empty batch, whose mean loss is nan) contributes nothing.
        weighted = torch.where(weights == 0, torch.zeros_like(values), values * weights)
        stats = torch.stack([weighted.sum(), weights.sum()])
        if self._stats is None:
            self._stats = stats
        else:
            self._stats += stats.to(self._stats.device)
