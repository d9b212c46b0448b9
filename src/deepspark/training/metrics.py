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
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

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


def _distributed(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_device(group: Any = None) -> torch.device:
    """The device a collective of ``group`` needs its tensors on (NCCL only moves GPU memory)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _batch_size(outputs: torch.Tensor) -> int:
    return int(outputs.shape[0]) if outputs.dim() > 0 else 1


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
