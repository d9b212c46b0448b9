"""Which output and label each metric reads, for models with several of either.

``metrics=`` is a list (every metric reads the model's one output and the first label) or a
dict metric -> what it reads (see `deepspark.training.rank.metrics` for the forms).
:func:`metric_definitions` checks the argument on the driver, :func:`build_metrics` makes the
rank's metrics from it, and :func:`update_metrics` feeds them one batch: the loop's one call per
batch. Worker side; no pyspark.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from deepspark.training.rank.metrics import (
    EpochMetric,
    LabelKey,
    OutputKey,
    get_metric,
)
from deepspark.training.rank.structure import select_output

__all__ = ["MetricsArg", "build_metrics", "metric_definitions", "update_metrics"]

MetricsArg = Sequence[Any] | Mapping[Any, Any] | None
"""``metrics=``: a list of metrics, or a dict metric -> what it reads (module docstring)."""


def metric_definitions(metrics: MetricsArg) -> list[Any] | dict[Any, Any]:
    """A ``metrics=`` argument as a list or a dict (a copy), its form checked.

    Cheap, for a constructor: the metrics themselves (unknown names, outputs the model does
    not have) are checked by building and updating them on sample rows, as the driver's dry
    run does. The result is what travels to the ranks (pickled), where :func:`build_metrics`
    makes fresh metrics from it.

    Raises
    ------
    TypeError, ValueError
        Neither a list nor a dict, or a dict value that names no output.

    Examples
    --------
    >>> metric_definitions({"accuracy": ["logits", "parity"]})
    {'accuracy': ['logits', 'parity']}
    >>> metric_definitions(None)
    []
    """
    if isinstance(metrics, Mapping):
        definitions: list[Any] | dict[Any, Any] = dict(metrics)
        for metric, value in definitions.items():
            _reads(metric, value)
        return definitions
    if isinstance(metrics, (str, bytes)) or not isinstance(metrics, Iterable | None):
        raise TypeError(
            f"metrics={metrics!r}: give a list, e.g. ['accuracy'], or a dict metric -> the "
            "output it reads, e.g. {'accuracy': 'logits'}"
        )
    return list(metrics or [])


def build_metrics(metrics: MetricsArg, device: torch.device | str = "cpu") -> list[EpochMetric]:
    """Fresh :class:`EpochMetric` objects for a ``metrics=`` argument (list or dict).

    Each call deep-copies the definitions, so the training and validation metrics (and the
    user's own metric objects) never share state.

    Parameters
    ----------
    metrics : list, dict or None
        As ``Estimator(metrics=...)`` takes it; see the module docstring.
    device : torch.device or str
        Where the metrics keep their states (the model's device).

    Examples
    --------
    >>> [(m.name, m.output, m.label) for m in build_metrics({"accuracy": ("logits", 1),
    ...                                                      "mse": [0, 1]})]
    [('accuracy', 'logits', 1), ('output_0_mse', 0, None), ('output_1_mse', 1, None)]
    """
    definitions = metric_definitions(metrics)
    if isinstance(definitions, dict):
        reads = [(metric, _reads(metric, value)) for metric, value in definitions.items()]
    else:
        reads = [(metric, [(None, None)]) for metric in definitions]
    built = []
    for metric, pairs in reads:
        for output, label in pairs:
            made = get_metric(copy.deepcopy(metric), output, label)
            if len(pairs) > 1:
                prefix = output if isinstance(output, str) else f"output_{output}"
                made.name = f"{prefix}_{made.name}"
            built.append(made.to(device))
    names = [metric.name for metric in built]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"metrics: {duplicates} would be reported more than once; give each metric its own "
            "name (a list of outputs as the dict value prefixes the names with the output)"
        )
    return built


def _reads(metric: Any, value: Any) -> list[tuple[OutputKey, LabelKey]]:
    """The (output, label) pairs a dict value names."""
    if isinstance(value, list):
        if not value:
            raise ValueError(f"metrics: {metric!r} reads an empty list of outputs")
        pairs = [_pair(metric, item) for item in value]
        if any(pair in pairs[:position] for position, pair in enumerate(pairs)):
            raise ValueError(f"metrics: {metric!r} names the same output twice: {value!r}")
        return pairs
    return [_pair(metric, value)]


def _pair(metric: Any, value: Any) -> tuple[OutputKey, LabelKey]:
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(
                f"metrics: {metric!r} reads {value!r}; a tuple names (output, label), e.g. "
                "('logits', 0)"
            )
        output, label = value
    else:
        output, label = value, None
    return output, label  # get_metric checks their types


def update_metrics(metrics: Iterable[EpochMetric], outputs: Any, labels: Any) -> None:
    """Feed one batch to every metric: each reads its output and its label.

    Parameters
    ----------
    metrics : iterable of EpochMetric
        From :func:`build_metrics`.
    outputs : Tensor, dict, tuple or list
        The model's output on the batch's real rows.
    labels : Tensor, tuple or dict
        The batch's labels (real rows): a tensor, a tuple with one tensor per label spec, or
        a dict of them (a tuple holding one dict, as ``Batch.labels`` has it, is read as the
        dict).

    Raises
    ------
    ValueError
        A metric without an output named on a model with several, an output or label that
        does not exist; both name the metric.

    Examples
    --------
    >>> import torch
    >>> metrics = build_metrics({"accuracy": "logits"})
    >>> outputs = {"logits": torch.tensor([[2.0, 0.0], [0.0, 2.0]]), "aux": torch.zeros(2)}
    >>> update_metrics(metrics, outputs, (torch.tensor([0, 0]),))
    >>> from deepspark.training.rank.metrics import reduce_metrics
    >>> reduce_metrics(metrics, world_size=1)
    {'accuracy': 0.5}
    """
    for metric in metrics:
        chosen = select_output(outputs, metric.output, metric.name)
        metric.update(chosen, _select_label(labels, metric.label, metric.name))


def _select_label(labels: Any, label: LabelKey, name: str) -> torch.Tensor:
    """The label tensor a metric reads."""
    if isinstance(labels, torch.Tensor):
        items: list[tuple[str | None, Any]] = [(None, labels)]
    elif isinstance(labels, Mapping):
        items = list(labels.items())
    else:
        items = []
        for value in labels:
            items.extend(value.items() if isinstance(value, Mapping) else [(None, value)])
    if not items:
        raise ValueError(f"metric {name!r} needs labels: pass label_cols")
    keys = [key for key, _ in items if key is not None]
    if label is None:
        chosen = items[0][1]
    elif isinstance(label, str):
        found = [value for key, value in items if key == label]
        if not found:
            raise ValueError(
                f"metric {name!r} reads label {label!r}, but the labels are "
                f"{keys or f'{len(items)} unnamed tensors'}; name a label_cols dict key"
            )
        chosen = found[0]
    else:
        if not -len(items) <= label < len(items):
            raise ValueError(
                f"metric {name!r} reads label {label}, but there are {len(items)} labels"
            )
        chosen = items[label][1]
    if not isinstance(chosen, torch.Tensor):
        raise ValueError(
            f"metric {name!r} reads a label that is a {type(chosen).__name__}, not a tensor "
            "(a struct label column: name one of its fields' labels instead)"
        )
    return chosen
