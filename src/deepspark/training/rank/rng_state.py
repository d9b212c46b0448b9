"""The state of every random number generator training touches (worker side; no pyspark).

:func:`get_rng_state` captures the torch, CUDA, numpy and Python generators as tensors and
plain values only, so a checkpoint holding it loads with ``torch.load(..., weights_only=True)``;
:func:`set_rng_state` puts them back, and training resumed from a checkpoint draws the same
numbers as training that never stopped.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_state", "seed_generators", "set_rng_state"]


def seed_generators(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` with ``seed``.

    Examples
    --------
    >>> import random
    >>> seed_generators(7); first = random.random()
    >>> seed_generators(7); random.random() == first
    True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Return the torch, CUDA (when initialised), numpy and Python RNG states.

    Returns
    -------
    dict
        Tensors and plain values only: ``torch.save`` it and load it with ``weights_only=True``.

    Examples
    --------
    >>> import random
    >>> state = get_rng_state()
    >>> first = random.random()
    >>> set_rng_state(state)
    >>> random.random() == first
    True
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states :func:`get_rng_state` returned.

    CUDA states are restored for the devices this process has (the first ones saved), and
    skipped without CUDA.

    Parameters
    ----------
    state : dict
        What :func:`get_rng_state` returned, possibly through ``torch.save`` and ``torch.load``.

    Examples
    --------
    >>> import torch
    >>> state = get_rng_state()
    >>> first = torch.rand(1)
    >>> set_rng_state(state)
    >>> bool(torch.rand(1) == first)
    True
    """
    torch.set_rng_state(state["torch"])
    saved_numpy = state["numpy"]
    np.random.set_state(
        (
            saved_numpy["kind"],
            saved_numpy["keys"].numpy().astype(np.uint32),
            saved_numpy["position"],
            saved_numpy["has_gauss"],
            saved_numpy["cached_gaussian"],
        )
    )
    saved_python = state["python"]
    random.setstate(
        (
            saved_python["version"],
            tuple(int(value) for value in saved_python["state"].tolist()),
            saved_python["gauss_next"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for device, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, device)
