"""Keras variables as the state dicts that the engine's checkpoints store (TensorFlow loop).

Rank side, inside the TensorFlow worker process; no pyspark, and no TensorFlow import here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["VariablesState"]


class VariablesState:
    """Keras variables seen as the ``state_dict`` / ``load_state_dict`` that the checkpoint
    files of `deepspark.training.rank.checkpoint` store (by position: names can repeat)."""

    def __init__(self, variables: list[Any]) -> None:
        self.variables = list(variables)

    def state_dict(self) -> dict[str, Any]:
        import torch

        return {
            f"{index:05d}": torch.from_numpy(np.array(variable.numpy()))
            for index, variable in enumerate(self.variables)
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        if len(state) != len(self.variables):
            raise ValueError(
                f"the checkpoint holds {len(state)} values, the model has "
                f"{len(self.variables)} variables: it is another model's checkpoint"
            )
        for index, variable in enumerate(self.variables):
            value = state[f"{index:05d}"].numpy()
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"checkpoint value {index} has shape {tuple(value.shape)}, the variable "
                    f"{variable.path} has {tuple(variable.shape)}: another model's checkpoint"
                )
            variable.assign(value)
