"""Nested batches and model outputs: tensors, or dicts, tuples and lists of them.

A model may return a dict of heads or a tuple, and a batch may carry a dict of feature
tensors; the rank loop moves, slices and counts them through these helpers, so a structure
is treated exactly as one tensor would be. No pyspark here (DESIGN decision 12).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["map_tensors", "num_rows", "select_output", "take_rows", "to_device"]


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor inside ``value``, keeping the structure around them.

    Examples
    --------
    >>> out = map_tensors({"a": torch.ones(2), "b": (torch.zeros(1), 3)}, lambda t: t + 1)
    >>> out["a"].tolist(), out["b"][0].tolist(), out["b"][1]
    ([2.0, 2.0], [1.0], 3)
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(map_tensors(item, fn) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, fn) for item in value)
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` on ``device``; CPU tensors stay where they are on a CPU rank."""
    if device.type == "cpu":
        return value
    return map_tensors(value, lambda tensor: tensor.to(device, non_blocking=True))


def take_rows(value: Any, rows: int) -> Any:
    """The first ``rows`` rows of every tensor in ``value`` (0-d tensors are kept whole).

    Examples
    --------
    >>> take_rows((torch.arange(4), {"k": torch.arange(8).reshape(4, 2)}), 2)[1]["k"].shape
    torch.Size([2, 2])
    """
    return map_tensors(value, lambda tensor: tensor[:rows] if tensor.dim() else tensor)


def num_rows(value: Any) -> int:
    """Rows of the first tensor with a batch dimension inside ``value``.

    Raises
    ------
    ValueError
        When ``value`` holds no tensor with a batch dimension.

    Examples
    --------
    >>> num_rows({"logits": torch.zeros(5, 3), "aux": [torch.zeros(5)]})
    5
    """
    found: list[int] = []

    def visit(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() and not found:
            found.append(int(tensor.shape[0]))
        return tensor

    map_tensors(value, visit)
    if not found:
        raise ValueError(
            f"the model returned {type(value).__name__} with no tensor of rows in it; return a "
            "tensor, or a dict, tuple or list of tensors whose first dimension is the batch"
        )
    return found[0]


def select_output(outputs: Any, key: Any, what: str) -> torch.Tensor:
    """The one tensor of ``outputs`` that ``what`` (a metric, a predict column) reads.

    ``key`` is None for a model with one output tensor; otherwise a dict key or a position.

    Examples
    --------
    >>> select_output({"logits": torch.zeros(2, 3)}, "logits", "accuracy").shape
    torch.Size([2, 3])
    >>> select_output((torch.zeros(2), torch.ones(2)), 1, "mse").tolist()
    [1.0, 1.0]
    """
    if key is None:
        if isinstance(outputs, torch.Tensor):
            return outputs
        if isinstance(outputs, dict) and len(outputs) == 1:
            return next(iter(outputs.values()))
        if isinstance(outputs, (tuple, list)) and len(outputs) == 1:
            return outputs[0]
        names = list(outputs) if isinstance(outputs, dict) else list(range(len(outputs)))
        raise ValueError(
            f"{what} reads one output, but the model returns {type(outputs).__name__} with "
            f"outputs {names}; name the one it reads, e.g. metrics={{{what!r}: {names[0]!r}}}"
        )
    try:
        chosen = outputs[key]
    except (KeyError, IndexError, TypeError):
        names = list(outputs) if isinstance(outputs, dict) else "positions"
        raise ValueError(
            f"{what} reads output {key!r}, which the model's {type(outputs).__name__} output "
            f"does not have (it has {names})"
        ) from None
    if not isinstance(chosen, torch.Tensor):
        raise ValueError(f"{what} reads output {key!r}, a {type(chosen).__name__}, not a tensor")
    return chosen
