"""The optimizer state one `fit` hands to the next, as bytes (worker and driver side; no pyspark).

The bytes are ``torch.save`` of what a checkpoint's ``optimizer.pt`` holds: one optimizer's
``state_dict()``, or, for several optimizers (or one with fp16's gradient scaler), a dict
``{"0": ..., "1": ...}`` of their state dicts in order, the scaler's last. Reading them
unpickles tensors and plain values only (``weights_only=True``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from deepspark.errors import DeepsparkError

__all__ = [
    "OptimizerStateMismatch",
    "check_layout",
    "load_optimizer_state",
    "optimizer_layout",
    "optimizer_state_from_bytes",
    "optimizer_state_layout",
    "optimizer_state_to_bytes",
]

Layout = tuple[tuple[int, ...], ...]
"""Per optimizer, the number of parameters in each of its parameter groups."""

RESET_HINT = "call est.reset_optimizer() to start this fit with fresh optimizers"


class OptimizerStateMismatch(DeepsparkError, ValueError):
    """A saved optimizer state does not fit the optimizers it should be loaded into."""


def optimizer_state_to_bytes(state: Mapping[str, Any]) -> bytes:
    """``torch.save`` of an optimizer state dict (tensors are saved where they are).

    Examples
    --------
    >>> import torch
    >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    >>> data = optimizer_state_to_bytes(optimizer.state_dict())
    >>> optimizer_state_from_bytes(data)["param_groups"][0]["lr"]
    0.1
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def optimizer_state_from_bytes(data: bytes, map_location: Any = "cpu") -> dict[str, Any]:
    """Read bytes of :func:`optimizer_state_to_bytes` (tensors and plain values only).

    ``map_location="meta"`` reads the structure without the tensors' data.
    """
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def _optimizer_parts(state: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The optimizers' state dicts in a saved state (without a gradient scaler's)."""
    if "param_groups" in state:  # one optimizer, saved as itself
        return [state]
    items = [state[str(index)] for index in range(len(state))]
    return [item for item in items if "param_groups" in item]


def optimizer_state_layout(state: Mapping[str, Any]) -> Layout:
    """The layout of a saved state: per optimizer, the parameters of each group.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> optimizer_state_layout(torch.optim.SGD(net.parameters(), lr=0.1).state_dict())
    ((2,),)
    """
    return tuple(
        tuple(len(group["params"]) for group in optimizer["param_groups"])
        for optimizer in _optimizer_parts(state)
    )


def optimizer_layout(optimizers: Sequence[torch.optim.Optimizer]) -> Layout:
    """The layout of live optimizers, to compare with :func:`optimizer_state_layout`."""
    return tuple(
        tuple(len(group["params"]) for group in optimizer.param_groups) for optimizer in optimizers
    )


def _describe_layout(layout: Layout) -> str:
    """``"2 optimizers (parameters per group: 4, 2; 6)"``, for messages."""
    groups = "; ".join(", ".join(str(count) for count in optimizer) for optimizer in layout)
    plural = "s" if len(layout) != 1 else ""
    return f"{len(layout)} optimizer{plural} (parameters per group: {groups})"


def check_layout(found: Layout, expected: Layout) -> None:
    """Raise :class:`OptimizerStateMismatch` naming both layouts when they differ."""
    if found != expected:
        raise OptimizerStateMismatch(
            f"the optimizer state carried over from the last fit has {_describe_layout(found)}, "
            f"but this fit's optimizer factory builds {_describe_layout(expected)}; {RESET_HINT}"
        )


def load_optimizer_state(data: bytes, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Load bytes of :func:`optimizer_state_to_bytes` into freshly built optimizers.

    The optimizers must match the saved ones in number and in parameters per group. A saved
    fp16 gradient scaler's state is left out: each fit starts its scaler afresh, and its scale
    adapts again within a few steps.

    Raises
    ------
    OptimizerStateMismatch
        When the saved state does not fit ``optimizers``.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> first = torch.optim.Adam(net.parameters())
    >>> net(torch.ones(1, 2)).sum().backward()
    >>> first.step()
    >>> second = torch.optim.Adam(net.parameters())
    >>> load_optimizer_state(optimizer_state_to_bytes(first.state_dict()), [second])
    >>> int(second.state_dict()["state"][0]["step"])
    1
    """
    state = optimizer_state_from_bytes(data)
    check_layout(optimizer_state_layout(state), optimizer_layout(optimizers))
    for optimizer, saved in zip(optimizers, _optimizer_parts(state), strict=True):
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as error:
            raise OptimizerStateMismatch(
                f"the optimizer state carried over from the last fit does not load into "
                f"{type(optimizer).__name__}: {error}; {RESET_HINT}"
            ) from error
