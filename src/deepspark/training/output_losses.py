"""A loss for models with several outputs: one loss per output, weighted and summed.

Spark-free; it runs inside the ranks as the engine's ``loss(outputs, labels)``. The Keras
capability builds its ``compile``-style losses on it (`deepspark.keras`), and a PyTorch model
with a dict or tuple of heads can use it as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["OutputLosses"]


class OutputLosses:
    """The engine's ``loss(outputs, labels)`` from one loss per model output.

    ``losses`` is a dict by output name, a list in output order, or one loss that applies to
    every output. Labels are matched to outputs by name (a ``label_cols`` dict) or by position
    (a list, in the model's output order). The result is the sum of the outputs' losses, each
    times its weight (``weights``: a dict by output name or a list in output order; 1 when
    left out).

    Parameters
    ----------
    losses : callable, dict or list
        Each ``loss(output, label) -> scalar tensor``, as torch's losses take them.
    output_names : sequence of str, optional
        The model's output names in order: which of a dict output's entries count, in which
        order (default: the dict's own).
    weights : dict or list of float, optional

    Examples
    --------
    >>> import torch
    >>> loss = OutputLosses({"a": torch.nn.MSELoss(), "b": torch.nn.L1Loss()}, weights={"b": 2})
    >>> outputs = {"a": torch.ones(2), "b": torch.zeros(2)}
    >>> float(loss(outputs, {"a": torch.zeros(2), "b": torch.ones(2)}))
    3.0
    """

    def __init__(
        self,
        losses: Any,
        output_names: Sequence[str] = (),
        weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        self.losses = losses
        self.output_names = list(output_names)
        self.loss_weights = weights

    def _losses(self) -> Any:
        """The losses as they are called: a dict, a list or one callable."""
        return self.losses

    def _one_loss(self, loss: Any, output: torch.Tensor, label: Any) -> torch.Tensor:
        return loss(output, label)

    def __call__(self, outputs: Any, labels: Any) -> torch.Tensor:
        losses = self._losses()
        if isinstance(outputs, torch.Tensor):
            if not callable(losses):
                raise ValueError("the model has one output: give one loss, not a dict or list")
            return self._one_loss(losses, outputs, _one_label(labels))
        names = list(outputs) if isinstance(outputs, Mapping) else list(range(len(outputs)))
        if isinstance(outputs, Mapping) and self.output_names:
            names = [name for name in self.output_names if name in outputs] or names
        total: torch.Tensor | None = None
        for position, name in enumerate(names):
            loss = _pick(losses, name, position)
            if loss is None:
                continue
            label = _label_for(labels, name, position)
            value = self._one_loss(loss, outputs[name], label) * self._weight(name, position)
            total = value if total is None else total + value
        if total is None:
            raise ValueError("the loss dict names none of the model's outputs")
        return total

    def _weight(self, name: Any, position: int) -> float:
        weights = self.loss_weights
        if weights is None:
            return 1.0
        if isinstance(weights, Mapping):
            return float(weights.get(name, 1.0))
        return float(weights[position])


def _one_label(labels: Any) -> Any:
    if isinstance(labels, tuple) and len(labels) == 1:
        return labels[0]
    return labels


def _pick(losses: Any, name: Any, position: int) -> Any:
    if isinstance(losses, Mapping):
        return losses.get(name)
    if isinstance(losses, list):
        return losses[position]
    return losses


def _label_for(labels: Any, name: Any, position: int) -> Any:
    if isinstance(labels, torch.Tensor):
        return labels
    if isinstance(labels, Mapping):
        return labels[name] if name in labels else list(labels.values())[position]
    items = list(labels)
    if len(items) == 1 and isinstance(items[0], Mapping):
        return _label_for(items[0], name, position)
    if len(items) == 1:
        return items[0]
    return items[position]
