"""Metrics that reduce exactly across ranks (worker side; no pyspark).

Every metric accumulates *sufficient statistics* batch by batch on its own rank. At the end of
an epoch :func:`reduce_metrics` combines them across ranks with ``torch.distributed`` and
computes the values, so a metric reduced over N ranks equals the same metric computed by one
process over all the data: no averaging of per-rank averages.

Most metrics are :class:`SumMetric` subclasses: their statistics are a few float64 numbers that
add up across ranks (``[correct, count]`` for accuracy), and :func:`reduce_metrics` reduces all of
them with one ``all_reduce``. A metric whose statistics do not add up overrides
:meth:`Metric.reduce`; :class:`AUC` all-gathers every score, so its value is exact.

Built-in names for :func:`get_metric`:

=====================  ============================================================
``"accuracy"``         class accuracy; see :class:`Accuracy` for logits, binary outputs
``"top5_accuracy"``    target among the 5 highest outputs (any ``"top<k>_accuracy"``)
``"mse"``              mean squared error over all output elements
``"mae"``              mean absolute error over all output elements
``"rmse"``             square root of the mean squared error
``"auc"``              exact binary ROC AUC (alias ``"roc_auc"``)
=====================  ============================================================

:func:`get_metric` also accepts a :class:`Metric`, a ``torchmetrics.Metric`` (when torchmetrics is
installed), or a plain callable ``fn(outputs, targets)`` returning a loss-like tensor.

This module is the one to import from. The base classes live in
:mod:`~deepspark.training.rank.metrics_base`, the built-in metrics in
:mod:`~deepspark.training.rank.metrics_classification` and
:mod:`~deepspark.training.rank.metrics_regression`;
the adapters for callables and torchmetrics live here, beside :func:`get_metric` that makes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from deepspark.training.rank.metrics_base import (
    Mean,
    Metric,
    SumMetric,
    _collective_device,
    _distributed,
)
from deepspark.training.rank.metrics_classification import AUC, Accuracy, TopKAccuracy
from deepspark.training.rank.metrics_regression import MAE, MSE, RMSE

__all__ = [
    "AUC",
    "MAE",
    "MSE",
    "RMSE",
    "Accuracy",
    "CallableMetric",
    "Mean",
    "Metric",
    "SumMetric",
    "TopKAccuracy",
    "TorchMetricsMetric",
    "get_metric",
    "metric_names",
    "reduce_metrics",
]


def _batch_size(outputs: torch.Tensor) -> int:
    return int(outputs.shape[0]) if outputs.dim() > 0 else 1


class CallableMetric(SumMetric):
    """A metric from a function ``fn(outputs, targets)``, averaged per sample.

    ``fn`` returns either a scalar batch mean (as a ``torch.nn`` loss with the default
    ``reduction="mean"``) or one value per sample; both give the per-sample mean over all
    ranks.

    Parameters
    ----------
    fn : callable
    name : str, optional
        Defaults to ``fn.__name__`` (or the class name of a callable object).

    Examples
    --------
    >>> import torch
    >>> metric = CallableMetric(torch.nn.functional.l1_loss)
    >>> metric.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    >>> metric.name, metric.compute()
    ('l1_loss', 1.5)
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any], name: str | None = None):
        if name is None:
            name = getattr(fn, "__name__", None) or type(fn).__name__
        super().__init__(name)
        self.fn = fn

    def batch_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = _batch_size(outputs)
        if rows == 0:  # the mean of nothing would be nan; an empty batch adds nothing
            return torch.zeros(2, dtype=torch.float64, device=outputs.device)
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
        return torch.stack([total, torch.tensor(float(rows), dtype=torch.float64).to(total)])


class TorchMetricsMetric(Metric):
    """Adapter for a ``torchmetrics.Metric``, which synchronises itself across ranks.

    torchmetrics gathers its states inside ``compute()`` when a process group is initialised,
    so :meth:`reduce` calls it (collectively) and keeps the value. :meth:`state` is not
    available: torchmetrics states are not flat sums.

    Parameters
    ----------
    metric : torchmetrics.Metric
    name : str, optional
        Defaults to the metric's class name in snake case (``BinaryF1Score`` →
        ``"binary_f1_score"``).

    Examples
    --------
    >>> import torch
    >>> from torchmetrics.classification import BinaryF1Score
    >>> metric = get_metric(BinaryF1Score())
    >>> metric.update(torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1, 0, 0]))
    >>> metric.name, round(metric.compute(), 4)
    ('binary_f1_score', 0.6667)
    """

    def __init__(self, metric: Any, name: str | None = None) -> None:
        if name is None:
            name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(metric).__name__).lower()
        super().__init__(name)
        self.metric = metric
        self._value: float | None = None

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.metric.update(outputs.detach(), targets.detach())
        self._value = None

    def state(self) -> torch.Tensor:
        raise NotImplementedError(
            f"{self.name}: torchmetrics metrics keep their own state; use reduce() and compute()"
        )

    def load_state(self, state: torch.Tensor) -> None:
        raise NotImplementedError(f"{self.name}: torchmetrics metrics keep their own state")

    def reduce(self, group: Any = None) -> None:
        if _distributed(group):
            if group is not None:
                self.metric.process_group = group
            self._value = float(self.metric.compute())

    def compute(self) -> float:
        if self._value is None:
            self._value = float(self.metric.compute())
        return self._value

    def reset(self) -> None:
        self.metric.reset()
        self._value = None


_NAMED: dict[str, Callable[[], Metric]] = {
    "accuracy": Accuracy,
    "mse": MSE,
    "mae": MAE,
    "rmse": RMSE,
    "auc": AUC,
    "roc_auc": AUC,
}
_TOP_K = re.compile(r"top_?(\d+)_accuracy")


def metric_names() -> list[str]:
    """Return the names :func:`get_metric` understands (``top<k>_accuracy`` for any k).

    Examples
    --------
    >>> "accuracy" in metric_names()
    True
    """
    return sorted([*_NAMED, "top5_accuracy"])


def _is_torchmetrics(obj: Any) -> bool:
    return any(cls.__module__.split(".")[0] == "torchmetrics" for cls in type(obj).__mro__)


def get_metric(metric: str | Metric | Callable[..., Any]) -> Metric:
    """Return a :class:`Metric` for a name, a metric object, or a callable.

    Parameters
    ----------
    metric : str, Metric, torchmetrics.Metric or callable
        A built-in name (see :func:`metric_names`; case-insensitive), a :class:`Metric`
        (returned as it is), a ``torchmetrics.Metric`` (wrapped in :class:`TorchMetricsMetric`),
        or ``fn(outputs, targets)`` returning a batch mean or per-row values
        (wrapped in :class:`CallableMetric`).

    Returns
    -------
    Metric

    Raises
    ------
    ValueError
        For an unknown name.
    TypeError
        For anything else.

    Examples
    --------
    >>> get_metric("top3_accuracy").name
    'top3_accuracy'
    >>> get_metric(lambda outputs, targets: (outputs - targets).abs()).name
    '<lambda>'
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        key = metric.strip().lower()
        if key in _NAMED:
            return _NAMED[key]()
        top_k = _TOP_K.fullmatch(key)
        if top_k:
            return TopKAccuracy(int(top_k.group(1)))
        raise ValueError(
            f"unknown metric {metric!r}; built-in metrics are {', '.join(metric_names())} "
            "(or top<k>_accuracy); pass a Metric, a torchmetrics metric or a function "
            "fn(outputs, targets) for others"
        )
    if _is_torchmetrics(metric):
        return TorchMetricsMetric(metric)
    if callable(metric):
        return CallableMetric(metric)
    raise TypeError(
        f"a metric must be a name, a Metric, a torchmetrics metric or a callable, "
        f"got {type(metric).__name__}"
    )


def reduce_metrics(
    metrics: Iterable[Metric], world_size: int | None = None, group: Any = None
) -> dict[str, float]:
    """Reduce metrics across ranks and return their values by name.

    Collective: every rank calls it with the same metrics in the same order. All
    :class:`SumMetric`-style metrics (those keeping :meth:`Metric.reduce`) travel in a single
    ``all_reduce``; others run their own :meth:`Metric.reduce`. Without an initialised process
    group, or with ``world_size == 1``, nothing is communicated and the local values come back.
    Afterwards each metric holds the statistics of all ranks; :meth:`Metric.reset` it before
    the next epoch.

    Parameters
    ----------
    metrics : iterable of Metric
        Metrics with distinct names.
    world_size : int, optional
        The number of ranks the caller expects; when it is above 1 a process group must be
        initialised (a guard against silently reporting one rank's values).
    group : torch.distributed.ProcessGroup, optional

    Returns
    -------
    dict of str to float

    Examples
    --------
    >>> import torch
    >>> loss, accuracy = Mean("loss"), get_metric("accuracy")
    >>> loss.update(torch.tensor(0.5), 2)
    >>> accuracy.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> reduce_metrics([loss, accuracy], world_size=1)
    {'loss': 0.5, 'accuracy': 0.5}
    """
    metrics = list(metrics)
    names = [metric.name for metric in metrics]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"metric names must be distinct, got {duplicates} more than once")
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is not None and world_size > 1 and not initialised:
        raise RuntimeError(
            f"reduce_metrics was told world_size={world_size} but no torch.distributed process "
            "group is initialised; call init_process_group first"
        )
    if initialised and (world_size is None or world_size > 1):
        _reduce_all(metrics, group)
    return {metric.name: metric.compute() for metric in metrics}


def _reduce_all(metrics: Sequence[Metric], group: Any) -> None:
    if not _distributed(group):
        return
    summed = [metric for metric in metrics if type(metric).reduce is Metric.reduce]
    if summed:
        states = [metric.state() for metric in summed]
        packed = torch.cat(states).to(_collective_device(group))
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        for metric, part in zip(
            summed, packed.cpu().split([s.numel() for s in states]), strict=True
        ):
            metric.load_state(part)
    for metric in metrics:
        if type(metric).reduce is not Metric.reduce:
            metric.reduce(group)
