"""Metrics for the epoch loop, built on torchmetrics (worker side; no pyspark).

Every metric is a ``torchmetrics.Metric`` wrapped in an :class:`EpochMetric`, which carries the
name its value is reported under. :func:`reduce_metrics` combines the metrics of all ranks with
torchmetrics' own distributed sync (sum states are summed, list states such as AUC's scores are
all-gathered), so a metric reduced over N ranks equals the same metric computed by one process
over all the data: no averaging of per-rank averages.

Built-in names for :func:`get_metric` (case-insensitive): ``accuracy``, ``top<k>_accuracy``,
``precision``, ``recall``, ``f1`` (class 1 for binary outputs, macro averages otherwise),
``auc``/``roc_auc`` (exact; macro one-vs-rest for several classes), ``mse``, ``mae``, ``rmse``
and ``r2``. A classification metric infers its :class:`Task` from the first batch's shapes:
outputs ``(N,)`` or ``(N, 1)`` with 0/1 targets are binary; ``(N, C)`` outputs with class
indices are multiclass (argmax; ``(N, C, d1, ...)`` counts every position); ``(N, C)`` outputs
with targets of the same shape are multilabel, so one-hot targets mean multilabel. Outputs in
``[0, 1]`` are probabilities, thresholded at 0.5; any value outside makes them logits, passed
through a sigmoid or softmax first (torchmetrics' rule). The choice is made on the first batch
and kept: a batch of logits after probabilities raises instead of being scored differently.
Float targets must be whole numbers. Regression metrics compare element by element; ``(N, 1)``
outputs match ``(N,)`` targets. docs/training.md ("Metrics") says the same for users.

:func:`get_metric` also accepts a ``torchmetrics.Metric`` (used as it is; it receives the
outputs and targets unchanged) and a plain function ``fn(outputs, targets)`` returning a batch
mean or one value per row (averaged exactly over rows by :class:`CallableMetric`).

Models with several outputs or labels. Each metric reads one output tensor and one label
tensor. ``metrics=["accuracy"]`` reads the model's one output and the first label. A dict
names what each metric reads: ``{"accuracy": "logits"}`` reads the dict output ``"logits"``,
``{"mse": 1}`` position 1 of a tuple output, ``{"accuracy": ("logits", 1)}`` that output and
label 1 (a position among ``label_cols``, or a key of a ``label_cols`` dict), and
``{"accuracy": ["logits", "parity"]}`` makes one metric per output, reported as
``logits_accuracy`` and ``parity_accuracy`` (``output_1_mse`` for a position). The keys are
what a list holds: names, torchmetrics metrics or functions.
`deepspark.training.rank.metric_routing` makes the metrics from either form
(``build_metrics``) and feeds them one batch (``update_metrics``).

Examples
--------
>>> import torch
>>> metric = get_metric("accuracy")
>>> metric.update(torch.tensor([[0.9], [0.2], [0.6]]), torch.tensor([[1.0], [1.0], [0.0]]))
>>> reduce_metrics([metric], world_size=1)
{'accuracy': 0.3333333333333333}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torchmetrics

from deepspark.training.rank.metric_classes import CallableMetric
from deepspark.training.rank.metric_tasks import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    TASK_KINDS,
    TOP_K_NAME,
    Task,
    batch_rows,
    classification_task,
    empty_batch,
    prepared_batch,
    reads_raw_outputs,
    regression_task,
    top_k_accuracy,
    whole_targets,
)

__all__ = [
    "CallableMetric",
    "EpochMetric",
    "get_metric",
    "metric_names",
    "reduce_metrics",
]

OutputKey = str | int | None
"""Which model output a metric reads: a dict key, a tuple position, or None for the only one."""
LabelKey = str | int | None
"""Which label a metric reads: a position among the labels, a label dict key, None: the first."""


class EpochMetric:
    """A ``torchmetrics.Metric`` and the name its value is reported under.

    A built-in metric is made at the first :meth:`update`, once its :class:`Task` is known
    (see the module docstring); a ``torchmetrics.Metric`` or :class:`CallableMetric` given by
    the user is used from the start. Make them with :func:`get_metric`.

    Parameters
    ----------
    name : str
    metric : torchmetrics.Metric, optional
        The metric itself, when it does not depend on the task.
    build : callable, optional
        ``build(task) -> torchmetrics.Metric`` for a built-in metric.
    regression : bool
        Whether ``build`` is a regression metric (elementwise) rather than a classification
        metric (whose task is inferred).
    output : str, int or None
        The model output it reads (see :func:`update_metrics`); None for the only one.
    label : str, int or None
        The label it reads; None for the first.
    """

    def __init__(
        self,
        name: str,
        metric: torchmetrics.Metric | None = None,
        build: Callable[[Task], torchmetrics.Metric] | None = None,
        regression: bool = False,
        *,
        output: OutputKey = None,
        label: LabelKey = None,
    ) -> None:
        if (metric is None) == (build is None):
            raise ValueError("pass exactly one of metric and build")
        self.name = name
        self.output = output
        self.label = label
        self.metric = metric
        self.task: Task | None = None
        self._build = build
        self._regression = regression
        self._device = torch.device("cpu")
        self._updated = False  # since the last reset: a rank without rows joins with no rows
        self._value: float | None = None

    def to(self, device: torch.device | str) -> EpochMetric:
        """Keep the states on ``device`` (the model's); returns ``self``."""
        self._device = torch.device(device)
        if self.metric is not None:
            self.metric.to(self._device)
        return self

    def _set_task(self, task: Task) -> None:
        if self.task is None:
            assert self._build is not None
            # float64 states: sums stay exact over many rows, values come back unrounded
            self.metric = self._build(task).set_dtype(torch.float64).to(self._device)
            self.task = task
        elif replace(task, logits=self.task.logits) != self.task:
            raise ValueError(
                f"{self.name}: a batch looks like {task} but earlier batches like {self.task}"
            )
        elif task.logits and not self.task.logits:
            raise ValueError(
                f"{self.name}: earlier outputs were probabilities in [0, 1], now some lie outside "
                "(logits?); give the metric the same kind of outputs in every batch and on "
                "every rank"
            )

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch of model outputs and targets (real rows only; none is a no-op)."""
        if batch_rows(outputs) == 0:
            return
        outputs = outputs.detach().to(self._device)
        targets = targets.detach().to(self._device)
        self._value = None
        if self._build is None:
            assert self.metric is not None
            self.metric.update(outputs, targets)
        else:
            if self._regression:
                self._set_task(regression_task(outputs, targets, self.name))
            else:  # once outputs were logits, later batches' values cannot change the task
                known = True if self.task is not None and self.task.logits else None
                self._set_task(classification_task(outputs, targets, self.name, known))
            assert self.metric is not None and self.task is not None
            if reads_raw_outputs(self.metric):
                labels = whole_targets(targets, self.name)
                self.metric.update(outputs, labels.reshape(batch_rows(outputs), *outputs.shape[2:]))
            else:
                self.metric.update(*prepared_batch(self.task, outputs, targets, self.name))
        self._updated = True

    def compute(self) -> float:
        """The value after :func:`reduce_metrics`; before it, this rank's own value (which
        torchmetrics syncs, collectively, when a process group is initialised)."""
        if self._value is None:
            self._value = math.nan if self.metric is None else _scalar(self, self.metric.compute())
        return self._value

    def reset(self) -> None:
        """Forget all statistics, ready for a new epoch (the task stays)."""
        if self.metric is not None:
            self.metric.reset()
        self._updated = False
        self._value = None

    def __repr__(self) -> str:
        reads = "" if self.output is None else f", output={self.output!r}"
        reads += "" if self.label is None else f", label={self.label!r}"
        return f"EpochMetric(name={self.name!r}, metric={self.metric!r}{reads})"


def _scalar(metric: EpochMetric, value: Any) -> float:
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(
            f"metric {metric.name!r} computed a tensor of shape {tuple(value.shape)}; the "
            "training loop reports one number per metric (use an averaged torchmetrics metric)"
        )
    return float(value)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def metric_names() -> list[str]:
    """Return the names :func:`get_metric` understands (``top<k>_accuracy`` for any k).

    Examples
    --------
    >>> "accuracy" in metric_names()
    True
    """
    return sorted([*CLASSIFICATION_METRICS, *REGRESSION_METRICS, "top5_accuracy"])


def get_metric(
    metric: str | torchmetrics.Metric | Callable[..., Any],
    output: OutputKey = None,
    label: LabelKey = None,
) -> EpochMetric:
    """Return an :class:`EpochMetric` for a name, a torchmetrics metric, or a function.

    Parameters
    ----------
    metric : str, torchmetrics.Metric, EpochMetric or callable
        A built-in name (see the module docstring; case-insensitive), a ``torchmetrics.Metric``
        (named after its class in snake case: ``BinaryF1Score`` → ``"binary_f1_score"``), an
        :class:`EpochMetric` (returned as it is, reading ``output`` and ``label`` when they
        are given) or ``fn(outputs, targets)`` returning a batch mean or per-row values
        (wrapped in :class:`CallableMetric`, named after ``fn``).
    output : str, int or None
        The model output the metric reads: a dict key or a tuple position; None for a model
        with one output.
    label : str, int or None
        The label the metric reads: a position among the labels or a key of a label dict;
        None for the first.

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
    >>> get_metric("accuracy", output="logits").output
    'logits'
    """
    _check_key("output", output, metric)
    _check_key("label", label, metric)
    built = _make_metric(metric)
    if output is not None:
        built.output = output
    if label is not None:
        built.label = label
    return built


def _check_key(what: str, key: Any, metric: Any) -> None:
    if key is None or isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return
    raise TypeError(
        f"metrics: {metric!r} reads {what} {key!r}; name the {what} by its dict key (a str) or "
        "its position (an int)"
    )


def _make_metric(metric: Any) -> EpochMetric:
    if isinstance(metric, EpochMetric):
        return metric
    if isinstance(metric, str):
        key = metric.strip().lower()
        if key in CLASSIFICATION_METRICS:
            return EpochMetric(key, build=CLASSIFICATION_METRICS[key])
        if key in REGRESSION_METRICS:
            return EpochMetric(key, build=REGRESSION_METRICS[key], regression=True)
        top_k = TOP_K_NAME.fullmatch(key)
        if top_k and int(top_k.group(1)) >= 1:
            k = int(top_k.group(1))
            return EpochMetric(f"top{k}_accuracy", build=top_k_accuracy(k))
        raise ValueError(
            f"unknown metric {metric!r}; built-in metrics are {', '.join(metric_names())} "
            "(or top<k>_accuracy); pass a torchmetrics metric or a function "
            "fn(outputs, targets) for others"
        )
    if isinstance(metric, CallableMetric):
        return EpochMetric(metric.name, metric=metric)
    if isinstance(metric, torchmetrics.Metric):
        return EpochMetric(_snake_case(type(metric).__name__), metric=metric)
    if callable(metric):
        wrapped = CallableMetric(metric)
        return EpochMetric(wrapped.name, metric=wrapped)
    raise TypeError(
        "a metric must be a name, a torchmetrics metric or a function fn(outputs, targets), "
        f"got {type(metric).__name__}"
    )


def _collective_device(group: Any = None) -> torch.device:
    """The device a collective of ``group`` needs its tensors on (NCCL only moves GPU memory)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_on_tasks(metrics: list[EpochMetric], group: Any, device: torch.device) -> None:
    """Give every rank the task the others inferred, so a rank without rows can join the sync,
    and refuse ranks that read their outputs differently."""
    lazy = [metric for metric in metrics if metric._build is not None]
    if not lazy:
        return
    local = torch.tensor(
        [metric.task.encoded() if metric.task else [0, 0, 0] for metric in lazy],
        dtype=torch.int64,
        device=device,
    )
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    per_rank = torch.stack(gathered).cpu().tolist()  # [rank][metric] = Task.encoded()
    for index, metric in enumerate(lazy):
        seen = {
            Task(TASK_KINDS[kind - 1], width, bool(logits))
            for kind, width, logits in (ranks[index] for ranks in per_rank)
            if kind > 0
        }
        if len(seen) > 1:
            raise ValueError(f"{metric.name}: the ranks read their outputs differently: {seen}")
        if seen and metric.task is None:
            metric._set_task(seen.pop())


def reduce_metrics(
    metrics: Iterable[EpochMetric], world_size: int | None = None, group: Any = None
) -> dict[str, float]:
    """Reduce metrics across ranks and return their values by name.

    Collective: every rank calls it with the same metrics in the same order. Each metric is
    synchronised by torchmetrics (states summed or all-gathered) on the device the backend
    needs, and its value is kept until :meth:`EpochMetric.reset`. Without an initialised process
    group, or with ``world_size == 1``, nothing is communicated. A built-in metric that no rank
    updated is ``nan``.

    Parameters
    ----------
    metrics : iterable of EpochMetric
        Metrics with distinct names.
    world_size : int, optional
        The number of ranks the caller expects; above 1 a process group must be initialised
        (a guard against silently reporting one rank's values).
    group : torch.distributed.ProcessGroup, optional

    Examples
    --------
    >>> import torch
    >>> accuracy = get_metric("accuracy")
    >>> accuracy.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> reduce_metrics([accuracy], world_size=1)
    {'accuracy': 0.5}
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
    distributed = initialised and (world_size is None or world_size > 1)
    if distributed and dist.get_world_size(group) > 1:
        device = _collective_device(group)
        _agree_on_tasks(metrics, group, device)
        for metric in metrics:
            if metric.metric is None:
                continue  # no rank saw a row: nan everywhere, nothing to sync
            metric.to(device)
            states = metric.metric.metric_state.values()
            if metric.task and not metric._updated and any(isinstance(s, list) for s in states):
                # torchmetrics would stand in a 1-D float tensor for this rank's empty list
                metric.metric.update(*empty_batch(metric.task, device))
            metric.metric.process_group = group
            metric._value = None
    return {metric.name: metric.compute() for metric in metrics}
