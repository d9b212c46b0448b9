"""Predictors for Keras models and TensorFlow SavedModels.

Worker and driver side; no pyspark here. Used by :mod:`deepspark.inference.model_loading` for the
Keras model kinds; loading and choosing the backend are :mod:`deepspark.persist.keras_files`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from deepspark.inference.runtimes import Predictor, input_leaves
from deepspark.persist.keras_files import import_tensorflow

__all__ = ["KerasPredictor", "SavedModelPredictor"]


def _keras_inputs(model: Any, inputs: tuple[Any, ...], backend: str) -> Any:
    """The model's argument: one input, a list for several, a dict as it came."""

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        return value.numpy() if backend == "tensorflow" else value

    converted = [convert(value) for value in inputs]
    return converted[0] if len(converted) == 1 else converted


def _to_numpy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_to_numpy(item) for item in value)
    if isinstance(value, torch.Tensor):
        return value
    return np.asarray(value)


class KerasPredictor(Predictor):
    """A Keras 3 model, on the torch or TensorFlow backend."""

    runtime = "keras"

    def __init__(self, model: Any, backend: str) -> None:
        super().__init__("cpu")
        self.model = model
        self.backend = backend

    @property
    def nbytes(self) -> int:
        return int(sum(np.prod(weight.shape) * 4 for weight in self.model.weights))

    def input_count(self) -> int | None:
        inputs = getattr(self.model, "inputs", None)
        return len(inputs) if inputs else None

    def expected_inputs(self) -> str:
        inputs = getattr(self.model, "inputs", None) or []
        parts = [f"'{getattr(i, 'name', '?')}' {tuple(i.shape)} {i.dtype}" for i in inputs]
        return "; ".join(parts) or "what the Keras model's first layer takes"

    def _run(self, inputs: tuple[Any, ...], input_names: Sequence[str] | None) -> Any:
        if self.backend == "torch":
            return self.model(_keras_inputs(self.model, inputs, self.backend), training=False)
        return _to_numpy(
            self.model(_keras_inputs(self.model, inputs, self.backend), training=False)
        )


class SavedModelPredictor(Predictor):
    """A TensorFlow SavedModel directory, run through its ``serving_default`` signature."""

    runtime = "tensorflow"

    def __init__(self, path: str) -> None:
        super().__init__("cpu")
        tensorflow = import_tensorflow()
        self.loaded = tensorflow.saved_model.load(path)
        signatures = getattr(self.loaded, "signatures", {})
        if "serving_default" not in signatures:
            raise ValueError(
                f"the SavedModel at {path!r} has no 'serving_default' signature; export it "
                "with Keras's model.export(path) or tf.saved_model.save(..., signatures=...)"
            )
        self.function = signatures["serving_default"]
        _, keywords = self.function.structured_input_signature
        self.input_specs = dict(keywords)
        self._tf = tensorflow

    @property
    def nbytes(self) -> int:
        variables = getattr(self.loaded, "variables", [])
        return int(sum(np.prod(v.shape) * v.dtype.size for v in variables))

    def input_count(self) -> int | None:
        return len(self.input_specs)

    def expected_inputs(self) -> str:
        return "; ".join(
            f"'{name}' {tuple(spec.shape)} {spec.dtype.name}"
            for name, spec in self.input_specs.items()
        )

    def _run(self, inputs: tuple[Any, ...], input_names: Sequence[str] | None) -> Any:
        tensors = [tensor for _, tensor in input_leaves(inputs)]
        names = list(input_names) if input_names else list(self.input_specs)
        feed = {
            name: self._tf.convert_to_tensor(
                tensor.numpy(force=True), dtype=self.input_specs[name].dtype
            )
            for name, tensor in zip(names, tensors, strict=True)
        }
        outputs = self.function(**feed)
        arrays = {name: value.numpy() for name, value in outputs.items()}
        return next(iter(arrays.values())) if len(arrays) == 1 else arrays

    def check_input_names(self, input_names: Sequence[str] | None) -> None:
        if input_names and set(input_names) != set(self.input_specs):
            raise ValueError(
                f"input_names={list(input_names)!r} do not match the SavedModel's inputs: "
                f"{self.expected_inputs()}"
            )
