"""Spark ML Params of `TorchEstimator` and `TorchModel`, declared once.

Two mixins. `_TorchParams` holds what both stages share: the columns, how predictions are
written, and the training settings (a fitted `TorchModel` keeps the values it was trained
with, as Spark's own models do). Every one of them is JSON-ready, so it goes into the
``metadata`` that Spark ML persistence writes. `_TorchEstimatorParams` adds the Python objects
only the estimator needs: the network, the optimizer, the loss and the metrics. Their type
converters check the value's kind and keep the object itself, so ``copy()``,
``ParamGridBuilder`` and ``CrossValidator`` pass them around like any other value;
persistence pickles them (see :mod:`deepspark.ml.stage_io`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasFeaturesCol,
    HasLabelCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasSeed,
)

__all__ = ["OUTPUT_KINDS"]

# The values of `outputKind`: "auto" plus deepspark.inference.OutputKind's values.
OUTPUT_KINDS = ("auto", "class", "double", "array", "probabilities")


# --- type converters: each names its Param in its message -------------------------------------


def _positive_int(name: str) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = TypeConverters.toInt(value)
        if number < 1:
            raise ValueError(f"{name}={value!r}: give a positive integer")
        return number

    return convert


def _non_negative_int(name: str) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = TypeConverters.toInt(value)
        if number < 0:
            raise ValueError(f"{name}={value!r}: give 0 or more")
        return number

    return convert


def _to_learning_rate(value: Any) -> float:
    rate = TypeConverters.toFloat(value)
    if not rate > 0:
        raise ValueError(f"learningRate={value!r}: give a positive number")
    return rate


def _to_fraction(value: Any) -> float:
    fraction = TypeConverters.toFloat(value)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validationFraction={value!r}: give a number in [0, 1)")
    return fraction


def _to_output_kind(value: Any) -> str:
    kind = TypeConverters.toString(getattr(value, "value", value))
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"outputKind={value!r} is not known; use one of {list(OUTPUT_KINDS)}")
    return kind


def _to_feature_shape(value: Any) -> list[int]:
    shape = TypeConverters.toListInt(list(value) if isinstance(value, tuple) else value)
    if not shape or any(size < 1 for size in shape):
        raise ValueError(f"featureShape={value!r}: give a non-empty list of positive integers")
    return shape


def _to_kwargs(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise TypeError(
            f"optimizerParams must be a dict of keyword arguments, e.g. "
            f"{{'weight_decay': 1e-4}}; got {type(value).__name__}"
        )
    if "lr" in value:
        raise ValueError("optimizerParams: set the learning rate with learningRate=, not 'lr'")
    return dict(value)


def _to_module(value: Any) -> Any:
    from torch import nn

    if not isinstance(value, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (the network to train), got "
            f"{type(value).__module__}.{type(value).__qualname__}; build the network first, "
            "e.g. model=MyNet()"
        )
    return value


def resolve_dotted(name: str) -> Any:
    """The object a dotted name such as ``"torch.optim.SGD"`` names."""
    module_name, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(
            f"optimizer={name!r} does not name an importable object; give a class such as "
            "torch.optim.Adam or its dotted name 'torch.optim.Adam'"
        ) from None


def _to_optimizer(value: Any) -> Any:
    if isinstance(value, str):
        if not callable(resolve_dotted(value)):
            raise TypeError(f"optimizer={value!r} names something that cannot be called")
        return value
    import torch

    if isinstance(value, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be an optimizer class such as torch.optim.Adam (built per fit as "
            "optimizer(params, lr=learningRate, **optimizerParams)), not an optimizer instance"
        )
    if not callable(value):
        raise TypeError(
            f"optimizer must be an optimizer class, its dotted name or a callable "
            f"(params, lr, **kwargs) -> Optimizer; got {type(value).__name__}"
        )
    return value


def _to_loss(value: Any) -> Any:
    from deepspark.training.options import check_loss

    check_loss(value)
    return value


def _to_metrics(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(
            f"metrics must be a list of names ('accuracy', 'mse', ...) or metric objects; got "
            f"{type(value).__name__}"
        )
    return list(value)


_Stage = TypeVar("_Stage", bound="_TorchParams")


# --- mixins -----------------------------------------------------------------------------------


class _TorchParams(HasFeaturesCol, HasLabelCol, HasPredictionCol, HasProbabilityCol, HasSeed):
    """Params shared by `TorchEstimator` and `TorchModel`; all JSON-ready."""

    epochs: Param[int] = Param(
        Params._dummy(),
        "epochs",
        "passes over the training data (>= 1).",
        typeConverter=_positive_int("epochs"),
    )
    batchSize: Param[int] = Param(
        Params._dummy(),
        "batchSize",
        "global training batch size, split over the workers (>= numWorkers).",
        typeConverter=_positive_int("batchSize"),
    )
    learningRate: Param[float] = Param(
        Params._dummy(),
        "learningRate",
        "learning rate passed to the optimizer as lr= (> 0).",
        typeConverter=_to_learning_rate,
    )
    optimizerParams: Param[dict[str, Any]] = Param(
        Params._dummy(),
        "optimizerParams",
        "further keyword arguments of the optimizer, e.g. {'weight_decay': 1e-4} (JSON values).",
        typeConverter=_to_kwargs,
    )
    numWorkers: Param[int] = Param(
        Params._dummy(),
        "numWorkers",
        "training processes (Spark tasks of one barrier stage); 0 uses every free task slot.",
        typeConverter=_non_negative_int("numWorkers"),
    )
    validationFraction: Param[float] = Param(
        Params._dummy(),
        "validationFraction",
        "share of the rows held out (randomly, with seed) and evaluated after every epoch; "
        "0 holds none out.",
        typeConverter=_to_fraction,
    )
    checkpointDir: Param[str] = Param(
        Params._dummy(),
        "checkpointDir",
        "fsspec URL every executor can reach; each fit (every grid point and fold under "
        "tuning) writes its checkpoints to its own run-* folder in it (optional; needed for "
        "maxFailures > 0 on a cluster).",
        typeConverter=TypeConverters.toString,
    )
    maxFailures: Param[int] = Param(
        Params._dummy(),
        "maxFailures",
        "how many times a failed training job is re-run from its latest checkpoint (>= 0).",
        typeConverter=_non_negative_int("maxFailures"),
    )
    showProgress: Param[bool] = Param(
        Params._dummy(),
        "showProgress",
        "show a live progress bar on the driver while training.",
        typeConverter=TypeConverters.toBoolean,
    )
    outputKind: Param[str] = Param(
        Params._dummy(),
        "outputKind",
        "what predictionCol holds: 'class' (class id as double), 'double' (one value per row), "
        "'array' (all outputs, array<float>), 'probabilities' (softmax, array<float>) or "
        "'auto': on TorchEstimator, from the loss ('class' for CrossEntropyLoss, NLLLoss and "
        "BCEWithLogitsLoss, 'double' for MSELoss, L1Loss, SmoothL1Loss and HuberLoss); "
        "otherwise 'double' for one output per row, else 'array'.",
        typeConverter=_to_output_kind,
    )
    featureShape: Param[list[int]] = Param(
        Params._dummy(),
        "featureShape",
        "per-row shape of the model's input, e.g. [1, 8, 8] to read a 64-value vector or array "
        "as a one-channel image (optional; default: the column's own length).",
        typeConverter=_to_feature_shape,
    )
    predictBatchSize: Param[int] = Param(
        Params._dummy(),
        "predictBatchSize",
        "rows per model call in transform (>= 1).",
        typeConverter=_positive_int("predictBatchSize"),
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(
            epochs=10,
            batchSize=64,
            learningRate=1e-3,
            optimizerParams={},
            numWorkers=0,
            seed=0,
            validationFraction=0.0,
            maxFailures=0,
            showProgress=False,
            outputKind="auto",
            predictBatchSize=1024,
        )

    # setters of what both stages use in transform; the estimator adds the training ones

    def setFeaturesCol(self: _Stage, value: str) -> _Stage:
        """Set `featuresCol`."""
        return self._set(featuresCol=value)

    def setPredictionCol(self: _Stage, value: str) -> _Stage:
        """Set `predictionCol`."""
        return self._set(predictionCol=value)

    def setProbabilityCol(self: _Stage, value: str) -> _Stage:
        """Set `probabilityCol` (``""`` leaves the column out)."""
        return self._set(probabilityCol=value)

    def setOutputKind(self: _Stage, value: str) -> _Stage:
        """Set `outputKind`."""
        return self._set(outputKind=value)

    def setFeatureShape(self: _Stage, value: list[int]) -> _Stage:
        """Set `featureShape`."""
        return self._set(featureShape=value)

    def setPredictBatchSize(self: _Stage, value: int) -> _Stage:
        """Set `predictBatchSize`."""
        return self._set(predictBatchSize=value)

    def getEpochs(self) -> int:
        """The value of `epochs`."""
        return self.getOrDefault(self.epochs)

    def getBatchSize(self) -> int:
        """The value of `batchSize`."""
        return self.getOrDefault(self.batchSize)

    def getLearningRate(self) -> float:
        """The value of `learningRate`."""
        return self.getOrDefault(self.learningRate)

    def getOptimizerParams(self) -> dict[str, Any]:
        """The value of `optimizerParams`."""
        return dict(self.getOrDefault(self.optimizerParams))

    def getNumWorkers(self) -> int:
        """The value of `numWorkers` (0: every free task slot)."""
        return self.getOrDefault(self.numWorkers)

    def getValidationFraction(self) -> float:
        """The value of `validationFraction`."""
        return self.getOrDefault(self.validationFraction)

    def getCheckpointDir(self) -> str | None:
        """The value of `checkpointDir`, or None when it is not set."""
        return self.getOrDefault(self.checkpointDir) if self.isDefined(self.checkpointDir) else None

    def getMaxFailures(self) -> int:
        """The value of `maxFailures`."""
        return self.getOrDefault(self.maxFailures)

    def getShowProgress(self) -> bool:
        """The value of `showProgress`."""
        return self.getOrDefault(self.showProgress)

    def getOutputKind(self) -> str:
        """The value of `outputKind`."""
        return self.getOrDefault(self.outputKind)

    def getFeatureShape(self) -> list[int] | None:
        """The value of `featureShape`, or None when it is not set."""
        return self.getOrDefault(self.featureShape) if self.isDefined(self.featureShape) else None

    def getPredictBatchSize(self) -> int:
        """The value of `predictBatchSize`."""
        return self.getOrDefault(self.predictBatchSize)


class _TorchEstimatorParams(_TorchParams):
    """`_TorchParams` plus the Python objects a fit needs (held as the objects themselves)."""

    model: Param[Any] = Param(
        Params._dummy(),
        "model",
        "the torch.nn.Module to train; each fit trains a fresh deep copy of it.",
        typeConverter=_to_module,
    )
    optimizer: Param[Any] = Param(
        Params._dummy(),
        "optimizer",
        "optimizer class or its dotted name (or a callable (params, lr, **kwargs) -> "
        "Optimizer), built as optimizer(params, lr=learningRate, **optimizerParams).",
        typeConverter=_to_optimizer,
    )
    loss: Param[Any] = Param(
        Params._dummy(),
        "loss",
        "loss(outputs, labels) -> scalar tensor, mean over the rows, e.g. "
        "torch.nn.CrossEntropyLoss().",
        typeConverter=_to_loss,
    )
    metrics: Param[list[Any]] = Param(
        Params._dummy(),
        "metrics",
        "metrics recorded per epoch in the model's history: names ('accuracy', 'mse', 'mae', "
        "'rmse', 'auc', ...) or metric objects.",
        typeConverter=_to_metrics,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(optimizer="torch.optim.Adam", metrics=[])

    def getModel(self) -> Any:
        """The value of `model` (the untrained network), or None when it is not set."""
        return self.getOrDefault(self.model) if self.isDefined(self.model) else None

    def getOptimizer(self) -> Any:
        """The value of `optimizer`."""
        return self.getOrDefault(self.optimizer)

    def getLoss(self) -> Any:
        """The value of `loss`, or None when it is not set."""
        return self.getOrDefault(self.loss) if self.isDefined(self.loss) else None

    def getMetrics(self) -> list[Any]:
        """The value of `metrics`."""
        return list(self.getOrDefault(self.metrics))
