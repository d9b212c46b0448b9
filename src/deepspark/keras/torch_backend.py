"""Keras 3 on its torch backend, through deepspark's torch engine: the model, loss, optimizer and
metrics as the engine takes them.

Runs on the driver and inside the ranks; no pyspark here. On the torch backend a Keras model is
an ``nn.Module`` whose parameters are its variables' tensors, so DistributedDataParallel trains
it as it is. What the engine needs besides:

* :class:`KerasModule` calls the model the Keras way (one input, a list for several, a dict;
  ``training=`` from the module's mode), names its weights by position (Keras's own parameter
  names change when a model is saved and loaded again), and travels to the ranks as a ``.keras``
  file's bytes that it loads after setting ``KERAS_BACKEND``, before Keras is imported there.
* :class:`KerasLoss` turns Keras's ``loss(y_true, y_pred)`` (a name, a Keras loss, a dict or a
  list per output) into the engine's ``loss(outputs, labels)``.
* :class:`KerasOptimizer` is a ``torch.optim.Optimizer`` that applies a Keras optimizer to the
  gradients DDP averaged, so Keras's own update rules, learning-rate schedules and options hold;
  its ``state_dict`` carries the Keras optimizer's variables through checkpoints and retries.
* :func:`engine_metrics` maps Keras metric names to the engine's exact, cross-rank metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deepspark.persist.keras_files import (
    import_keras,
    keras_from_bytes,
    keras_to_bytes,
    portable_keras_objects,
    portable_keras_optimizer,
    restored_keras_objects,
    without_tensorflow,
)
from deepspark.training.output_losses import OutputLosses

__all__ = [
    "KerasLoss",
    "KerasModule",
    "KerasOptimizer",
    "KerasOptimizerFactory",
    "engine_metric_name",
    "engine_metrics",
]

BACKEND = "torch"


def _rebuild_module(data: bytes, output_names: list[str] | None) -> KerasModule:
    """Unpickling a `KerasModule`: Keras is imported here, with the torch backend. (The rank
    has seeded Python's random by then, from which Keras seeds its layers.)"""
    return KerasModule(keras_from_bytes(data, BACKEND), output_names)


class KerasModule(nn.Module):
    """A Keras model (torch backend) as the ``nn.Module`` deepspark's engine trains.

    ``forward(*inputs)`` calls the model with one input, a list of several (in the order of
    ``feature_cols``, as Keras takes a list for a model with several inputs) or the dict of a
    ``feature_cols`` dict, and ``training=self.training``. Its state dict names each of
    ``keras_model.weights`` by its position (``"0003.kernel"``): Keras's parameter paths change
    when a model is saved and loaded, positions do not.
    """

    def __init__(self, keras_model: Any, output_names: list[str] | None = None) -> None:
        super().__init__()
        self.keras_model = keras_model
        names = output_names or list(getattr(keras_model, "output_names", None) or [])
        self.output_names = list(names)

    def forward(self, *inputs: Any) -> Any:
        arguments = inputs[0] if len(inputs) == 1 else list(inputs)
        return self.keras_model(arguments, training=self.training)

    def __reduce__(self):
        data = keras_to_bytes(self.keras_model)
        return (_rebuild_module, (data, self.output_names))

    # --- weights by position ------------------------------------------------------------------

    def _weight_names(self) -> list[str]:
        return [
            f"{index:04d}.{weight.name}" for index, weight in enumerate(self.keras_model.weights)
        ]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {
            name: weight.value.detach()
            for name, weight in zip(self._weight_names(), self.keras_model.weights, strict=True)
        }

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):  # type: ignore[override]
        names = self._weight_names()
        missing = [name for name in names if name not in state_dict]
        unexpected = [name for name in state_dict if name not in set(names)]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"the weights do not fit this Keras model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]} (weights are named by their position in model.weights)"
            )
        with torch.no_grad():
            for name, weight in zip(names, self.keras_model.weights, strict=True):
                if name in state_dict:
                    value = torch.as_tensor(state_dict[name])
                    weight.value.copy_(value.to(weight.value.device, weight.value.dtype))
        return nn.modules.module._IncompatibleKeys(missing, unexpected)


# ---------------------------------------------------------------------------------------------
# The loss.


def _checked_loss(item: Any) -> Any:
    if item is None or isinstance(item, str) or callable(item):
        return item
    raise TypeError(
        f'loss={item!r}: give a Keras loss name ("sparse_categorical_crossentropy"), a '
        "keras.losses.Loss object or a function loss(y_true, y_pred)"
    )


def _resolved(item: Any) -> Any:
    """A callable ``(y_true, y_pred) -> mean loss``: Keras's names resolve to per-row functions,
    which Keras's ``compile`` averages over the rows; so is a function of the user's."""
    keras = import_keras(BACKEND)
    item = restored_keras_objects(item, keras)
    if isinstance(item, str):
        item = keras.losses.get(item)
    if item is None or isinstance(item, keras.losses.Loss):
        return item
    return _FunctionLoss(item)


class _FunctionLoss:
    """A per-row loss function as ``compile`` uses it: labels cast to the outputs' dtype and
    matched in rank (``(N,)`` labels for ``(N, 1)`` outputs), the mean over the rows."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def __call__(self, y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        if y_pred.is_floating_point():
            y_true = y_true.to(y_pred.dtype)
        if y_true.dim() == y_pred.dim() - 1 and y_pred.shape[-1] == 1:
            y_true = y_true.unsqueeze(-1)
        elif y_true.dim() == y_pred.dim() + 1 and y_true.shape[-1] == 1:
            y_true = y_true.squeeze(-1)
        return torch.as_tensor(self.function(y_true, y_pred)).mean()


class KerasLoss(OutputLosses):
    """Keras's ``loss`` (and ``loss_weights``) as the engine's ``loss(outputs, labels)``.

    ``loss`` is a name, a Keras loss or a function ``(y_true, y_pred)``; for a model with
    several outputs also a dict by output name or a list in output order (one loss alone
    applies to every output, as in Keras). Outputs, labels and weights are matched as
    `deepspark.training.output_losses.OutputLosses` matches them; each loss is a mean over the rows.
    """

    def __init__(
        self,
        loss: Any,
        output_names: Sequence[str] = (),
        loss_weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        several = isinstance(loss, (Mapping, list, tuple))
        for item in (loss.values() if isinstance(loss, Mapping) else loss) if several else [loss]:
            _checked_loss(item)
        # a dict by output name, a list in output order, or one loss; Keras objects as configs
        spec = portable_keras_objects(list(loss) if isinstance(loss, tuple) else loss, "loss")
        super().__init__(spec, output_names, loss_weights)
        self._built: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_built"] = None
        return state

    def _losses(self) -> Any:
        if self._built is None:
            if isinstance(self.losses, dict):  # one per output
                self._built = {name: _resolved(item) for name, item in self.losses.items()}
            elif isinstance(self.losses, list):
                self._built = [_resolved(item) for item in self.losses]
            else:
                self._built = _resolved(self.losses)
        return self._built

    def _one_loss(self, loss: Any, output: torch.Tensor, label: Any) -> torch.Tensor:
        return loss(label, output)  # Keras's order: (y_true, y_pred)


# ---------------------------------------------------------------------------------------------
# The optimizer.


class KerasOptimizerFactory:
    """``model -> KerasOptimizer``: a fresh Keras optimizer for each rank's model.

    ``optimizer`` is a Keras optimizer name or object; it travels as its name or config.
    """

    def __init__(self, optimizer: Any) -> None:
        self.config = portable_keras_optimizer(optimizer, import_keras(BACKEND))

    def __call__(self, model: nn.Module) -> KerasOptimizer:
        keras = import_keras(BACKEND)
        with without_tensorflow(keras):
            optimizer = keras.optimizers.get(self.config)
        return KerasOptimizer(_keras_model_of(model), optimizer)


def _keras_model_of(model: nn.Module) -> Any:
    while not isinstance(model, KerasModule):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"a Keras optimizer needs a KerasModule, got {type(model).__name__}")
        model = inner
    return model.keras_model


class KerasOptimizer(torch.optim.Optimizer):
    """A Keras optimizer as a ``torch.optim.Optimizer`` over a Keras model's trainable weights.

    ``step()`` hands the gradients (DDP has averaged them) to ``keras_optimizer.apply``;
    ``zero_grad()`` is torch's. The one parameter group's ``lr`` shows the Keras optimizer's
    current learning rate; a torch scheduler that changes it sets the Keras one (unless the Keras
    optimizer runs its own schedule). ``state_dict()`` holds the Keras optimizer's variables
    (iterations, moments, ...) as tensors, in Keras's order.
    """

    def __init__(self, keras_model: Any, keras_optimizer: Any) -> None:
        self.keras_model = keras_model
        self.keras_optimizer = keras_optimizer
        self.variables = list(keras_model.trainable_variables)
        keras_optimizer.build(self.variables)
        params = [variable.value for variable in self.variables]
        super().__init__(params, {"lr": self._keras_lr()})
        self._lr_seen = self.param_groups[0]["lr"]

    def _has_schedule(self) -> bool:
        return not hasattr(self.keras_optimizer._learning_rate, "assign")

    def _keras_lr(self) -> float:
        return float(self.keras_optimizer.learning_rate)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        if group["lr"] != self._lr_seen and not self._has_schedule():
            self.keras_optimizer.learning_rate = group["lr"]  # a torch scheduler moved it
        grads = [
            variable.value.grad
            if variable.value.grad is not None
            else torch.zeros_like(variable.value)
            for variable in self.variables
        ]
        self.keras_optimizer.apply(grads, self.variables)
        group["lr"] = self._lr_seen = self._keras_lr()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "state": {},
            "param_groups": [
                {"lr": self.param_groups[0]["lr"], "params": list(range(len(self.variables)))}
            ],
            "keras_class": type(self.keras_optimizer).__name__,
            "keras_variables": [
                torch.as_tensor(variable.value).detach().cpu().clone()
                for variable in self.keras_optimizer.variables
            ],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        saved = list(state_dict.get("keras_variables", []))
        mine = list(self.keras_optimizer.variables)
        name = type(self.keras_optimizer).__name__
        if state_dict.get("keras_class") != name or len(saved) != len(mine):
            raise ValueError(
                f"the saved optimizer state is a {state_dict.get('keras_class')} with "
                f"{len(saved)} variables; this fit's optimizer is a {name} with {len(mine)}"
            )
        for variable, value in zip(mine, saved, strict=True):
            variable.assign(value.to(torch.as_tensor(variable.value).device))
        self.param_groups[0]["lr"] = self._lr_seen = self._keras_lr()


# ---------------------------------------------------------------------------------------------
# Metrics.

# Keras metric names and the engine's metric that computes the same value.
_METRICS = {
    "accuracy": "accuracy",
    "acc": "accuracy",
    "sparse_categorical_accuracy": "accuracy",
    "binary_accuracy": "accuracy",
    "sparse_top_k_categorical_accuracy": "top5_accuracy",
    "auc": "auc",
    "precision": "precision",
    "recall": "recall",
    "mse": "mse",
    "mean_squared_error": "mse",
    "mae": "mae",
    "mean_absolute_error": "mae",
    "rmse": "rmse",
    "root_mean_squared_error": "rmse",
    "r2_score": "r2",
    "f1_score": "f1",
}
_KERAS_CLASSES = {
    "Accuracy": "accuracy",
    "SparseCategoricalAccuracy": "accuracy",
    "BinaryAccuracy": "accuracy",
    "AUC": "auc",
    "Precision": "precision",
    "Recall": "recall",
    "MeanSquaredError": "mse",
    "MeanAbsoluteError": "mae",
    "RootMeanSquaredError": "rmse",
    "R2Score": "r2",
}


def engine_metric_name(name: str) -> str:
    """The engine's name for a Keras metric name (``"acc"`` is ``"accuracy"``); others as given."""
    return _METRICS.get(name.lower(), name)


def _engine_metric(metric: Any) -> Any:
    if isinstance(metric, str):
        name = metric.lower()
        if name in _METRICS:
            return _METRICS[name]
        raise ValueError(
            f"metrics: {metric!r} has no exact distributed equivalent here; use one of "
            f"{', '.join(sorted(_METRICS))}, a torchmetrics.Metric or a function "
            "fn(outputs, labels)"
        )
    if type(metric).__module__.split(".")[0] == "keras":
        name = type(metric).__name__
        if name in _KERAS_CLASSES:
            return _KERAS_CLASSES[name]
        raise ValueError(
            f"metrics: keras.metrics.{name} is not supported on the torch backend; use one of "
            f"{', '.join(sorted(_KERAS_CLASSES))}, a name, or a torchmetrics.Metric"
        )
    return metric  # a torchmetrics metric or a function: the engine's own


def engine_metrics(metrics: Any, output_names: Sequence[str]) -> Any:
    """Keras's ``metrics=`` as the engine's: names mapped, a dict by output made a dict by metric.

    Examples
    --------
    >>> engine_metrics(["accuracy"], [])
    ['accuracy']
    >>> engine_metrics({"digit": ["accuracy"], "parity": "acc"}, ["digit", "parity"])
    {'accuracy': [('digit', 0), ('parity', 1)]}
    """
    if metrics is None:
        return []
    if isinstance(metrics, Mapping):
        by_metric: dict[Any, list[Any]] = {}
        for output, items in metrics.items():
            position = list(output_names).index(output) if output in output_names else 0
            for item in items if isinstance(items, (list, tuple)) else [items]:
                by_metric.setdefault(_engine_metric(item), []).append((output, position))
        return by_metric
    if isinstance(metrics, str):
        metrics = [metrics]
    mapped = [_engine_metric(item) for item in metrics]
    if len(output_names) > 1 and mapped:
        raise ValueError(
            f"metrics={list(metrics)!r} on a model with outputs {list(output_names)}: give a "
            "dict by output, e.g. {" + repr(output_names[0]) + ": ['accuracy']}"
        )
    return mapped
