"""`TorchEstimator` and `TorchModel`: a PyTorch network as a Spark ML Pipeline stage.

Driver side. ``fit`` runs the training engine (`deepspark.Estimator`), ``transform`` the
inference path (`deepspark.inference.predict`); :mod:`deepspark.ml.core` holds the wiring,
:mod:`deepspark.ml.params` the Params, :mod:`deepspark.ml.stage_io` the readers and writers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyspark import keyword_only
from pyspark.ml import Estimator as SparkEstimator
from pyspark.ml import Model as SparkModel
from pyspark.ml.util import MLReadable, MLWritable

from deepspark.ml import core
from deepspark.ml.losses import default_output_kind, loss_task
from deepspark.ml.params import _TorchEstimatorParams, _TorchParams
from deepspark.ml.stage_io import TorchStageReader, TorchStageWriter, join

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame
    from torch import nn

    from deepspark.training import Estimator

__all__ = ["TorchEstimator", "TorchModel"]


class TorchEstimator(
    SparkEstimator["TorchModel"],
    _TorchEstimatorParams,
    MLWritable,
    MLReadable["TorchEstimator"],
):
    """Train a PyTorch network data-parallel inside Spark, as a Spark ML Estimator.

    ``fit(df)`` trains a fresh deep copy of `model` with the training engine
    (`deepspark.Estimator`: one barrier stage, `torch.distributed` gradient averaging,
    checkpoints and retries) and returns a `TorchModel`. It works as a `Pipeline` stage behind
    `VectorAssembler`, `StandardScaler` or `StringIndexer`, and under `CrossValidator` and
    `TrainValidationSplit` with a `ParamGridBuilder` over any of its Params.

    Parameters
    ----------
    model : torch.nn.Module
        The network. Its input is one row of `featuresCol` (a Spark ML Vector or a numeric
        array; `featureShape` reshapes it).
    loss : callable
        ``loss(outputs, labels)``, e.g. ``torch.nn.CrossEntropyLoss()`` (labels become int64
        class ids), ``torch.nn.MSELoss()`` (float targets shaped like the outputs).
    optimizer : type, str or callable, default "torch.optim.Adam"
        Built per fit as ``optimizer(params, lr=learningRate, **optimizerParams)``.
    metrics : list, optional
        Recorded per epoch in `TorchModel.history` (``"accuracy"``, ``"mse"``, ...).
    featuresCol, labelCol, predictionCol, probabilityCol : str
        Columns. `probabilityCol` (a Vector of softmax scores) is written for class outputs;
        ``""`` leaves it out.
    epochs, batchSize, learningRate, optimizerParams, numWorkers, seed : optional
        Training settings; `batchSize` is the global batch, `numWorkers` 0 takes every free
        task slot.
    validationFraction : float
        Rows held out and evaluated after every epoch (the history's ``val_*`` columns).
    checkpointDir, maxFailures : optional
        Checkpoint URL and how many times a failed training job is re-run from it.
    showProgress : bool
        A live progress bar on the driver.
    outputKind : {"auto", "class", "double", "array", "probabilities"}
        What `predictionCol` holds; "auto" follows the loss ("class" as a double class id
        for classification losses, "double" for regression losses).
    featureShape : list of int, optional
        Per-row input shape, e.g. ``[1, 8, 8]``.
    predictBatchSize : int
        Rows per model call in ``transform``.

    Notes
    -----
    The network, loss, optimizer and metrics are Params holding the Python objects themselves,
    so ``copy()`` and ``ParamGridBuilder`` treat them like other values. Saving pickles them
    with cloudpickle: load only paths you trust.

    Examples
    --------
    >>> import torch
    >>> from deepspark.ml import TorchEstimator
    >>> net = torch.nn.Sequential(
    ...     torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    ... )
    >>> est = TorchEstimator(model=net, loss=torch.nn.CrossEntropyLoss(), epochs=5,
    ...                      learningRate=3e-3, metrics=["accuracy"])
    >>> est.getLearningRate(), est.getBatchSize(), est.getOptimizer()
    (0.003, 64, 'torch.optim.Adam')
    >>> est.setEpochs(3).getEpochs()
    3

    In a Pipeline, with a Spark session ``spark`` and DataFrames of pixel columns and a label:

    >>> from pyspark.ml import Pipeline, PipelineModel
    >>> from pyspark.ml.feature import VectorAssembler, StandardScaler
    >>> pipeline = Pipeline(stages=[
    ...     VectorAssembler(inputCols=[f"p{i}" for i in range(64)], outputCol="raw"),
    ...     StandardScaler(inputCol="raw", outputCol="features"),
    ...     est,
    ... ])
    >>> fitted = pipeline.fit(train_df)  # doctest: +SKIP
    >>> fitted.transform(test_df).select("label", "prediction").show(3)  # doctest: +SKIP
    >>> fitted.write().overwrite().save("/tmp/digits-pipeline")  # doctest: +SKIP
    >>> PipelineModel.load("/tmp/digits-pipeline")  # doctest: +SKIP
    """

    @keyword_only
    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        loss: Any = None,
        optimizer: Any = "torch.optim.Adam",
        metrics: list[Any] | None = None,
        featuresCol: str = "features",
        labelCol: str = "label",
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        epochs: int = 10,
        batchSize: int = 64,
        learningRate: float = 1e-3,
        optimizerParams: dict[str, Any] | None = None,
        numWorkers: int = 0,
        seed: int = 0,
        validationFraction: float = 0.0,
        checkpointDir: str | None = None,
        maxFailures: int = 0,
        showProgress: bool = False,
        outputKind: str = "auto",
        featureShape: list[int] | None = None,
        predictBatchSize: int = 1024,
    ) -> None:
        super().__init__()
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        model: nn.Module | None = None,
        loss: Any = None,
        optimizer: Any = None,
        metrics: list[Any] | None = None,
        featuresCol: str | None = None,
        labelCol: str | None = None,
        predictionCol: str | None = None,
        probabilityCol: str | None = None,
        epochs: int | None = None,
        batchSize: int | None = None,
        learningRate: float | None = None,
        optimizerParams: dict[str, Any] | None = None,
        numWorkers: int | None = None,
        seed: int | None = None,
        validationFraction: float | None = None,
        checkpointDir: str | None = None,
        maxFailures: int | None = None,
        showProgress: bool | None = None,
        outputKind: str | None = None,
        featureShape: list[int] | None = None,
        predictBatchSize: int | None = None,
    ) -> TorchEstimator:
        """Set the given Params (None leaves a Param as it is)."""
        return self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    # --- setters (Spark ML style) ---------------------------------------------------------

    def setModel(self, value: nn.Module) -> TorchEstimator:
        """Set `model`."""
        return self._set(model=value)

    def setLoss(self, value: Any) -> TorchEstimator:
        """Set `loss`."""
        return self._set(loss=value)

    def setOptimizer(self, value: Any) -> TorchEstimator:
        """Set `optimizer`."""
        return self._set(optimizer=value)

    def setMetrics(self, value: list[Any]) -> TorchEstimator:
        """Set `metrics`."""
        return self._set(metrics=value)

    def setLabelCol(self, value: str) -> TorchEstimator:
        """Set `labelCol`."""
        return self._set(labelCol=value)

    def setEpochs(self, value: int) -> TorchEstimator:
        """Set `epochs`."""
        return self._set(epochs=value)

    def setBatchSize(self, value: int) -> TorchEstimator:
        """Set `batchSize`."""
        return self._set(batchSize=value)

    def setLearningRate(self, value: float) -> TorchEstimator:
        """Set `learningRate`."""
        return self._set(learningRate=value)

    def setOptimizerParams(self, value: dict[str, Any]) -> TorchEstimator:
        """Set `optimizerParams`."""
        return self._set(optimizerParams=value)

    def setNumWorkers(self, value: int) -> TorchEstimator:
        """Set `numWorkers`."""
        return self._set(numWorkers=value)

    def setSeed(self, value: int) -> TorchEstimator:
        """Set `seed`."""
        return self._set(seed=value)

    def setValidationFraction(self, value: float) -> TorchEstimator:
        """Set `validationFraction`."""
        return self._set(validationFraction=value)

    def setCheckpointDir(self, value: str) -> TorchEstimator:
        """Set `checkpointDir`."""
        return self._set(checkpointDir=value)

    def setMaxFailures(self, value: int) -> TorchEstimator:
        """Set `maxFailures`."""
        return self._set(maxFailures=value)

    def setShowProgress(self, value: bool) -> TorchEstimator:
        """Set `showProgress`."""
        return self._set(showProgress=value)

    # --- Estimator --------------------------------------------------------------------------

    def _fit(self, dataset: DataFrame) -> TorchModel:
        engine = core.fit_estimator(self, dataset)
        fitted = TorchModel()
        fitted._engine = engine
        self._copyValues(fitted)
        if self.getOutputKind() == "auto":
            # the model records what "auto" meant for this loss, as its default
            fitted._setDefault(outputKind=default_output_kind(loss_task(self.getLoss())))
            fitted.clear(fitted.outputKind)
        return fitted

    # --- persistence ------------------------------------------------------------------------

    def write(self) -> TorchStageWriter:
        """A writer: JSON Params as Spark ML metadata, Python-object Params pickled beside."""
        return TorchStageWriter(self)

    @classmethod
    def read(cls) -> TorchStageReader:
        """A reader for `write()`'s output (unpickles code: trusted paths only)."""
        return TorchStageReader(cls)

    def _save_data(self, path: str) -> None:
        """Everything an estimator holds is a Param: nothing more to write."""

    def _load_data(self, path: str) -> None:
        """Everything an estimator holds is a Param: nothing more to read."""


class TorchModel(SparkModel, _TorchParams, MLWritable, MLReadable["TorchModel"]):
    """A trained PyTorch network as a Spark ML Transformer.

    `TorchEstimator.fit` returns one; it keeps the Params it was trained with. ``transform``
    adds `predictionCol` through `deepspark.inference.predict` (a non-barrier ``mapInArrow``,
    the network loaded once per Python worker) and, for class outputs, `probabilityCol`.
    A network trained elsewhere can be wrapped directly with ``TorchModel(module=net, ...)``.

    Parameters
    ----------
    module : torch.nn.Module, optional
        A trained network to wrap (fit and load set it otherwise).
    featuresCol, predictionCol, probabilityCol : str
        Columns; `probabilityCol` is written for class outputs only, ``""`` leaves it out.
    outputKind : {"auto", "class", "double", "array", "probabilities"}
        What `predictionCol` holds. After a fit its default is what the loss implies; for a
        wrapped module "auto" means "double" for one output per row, else "array".
    featureShape : list of int, optional
        Per-row input shape.
    predictBatchSize : int
        Rows per model call.

    Attributes
    ----------
    module : torch.nn.Module
        The trained network.
    history : pandas.DataFrame
        One row per training epoch (empty for a wrapped module).

    Notes
    -----
    ``write().save(path)`` stores the weights as safetensors and the architecture with
    cloudpickle; ``TorchModel.load`` unpickles it: load only paths you trust.

    Examples
    --------
    >>> import torch
    >>> from deepspark.ml import TorchModel
    >>> model = TorchModel(module=torch.nn.Linear(4, 3), outputKind="class",
    ...                    featuresCol="x", probabilityCol="")
    >>> model.getOutputKind(), model.getFeaturesCol(), type(model.module).__name__
    ('class', 'x', 'Linear')
    >>> df = spark.createDataFrame([([0.5] * 4,)], "x array<float>")
    >>> model.transform(df).columns
    ['x', 'prediction']
    >>> model.write().overwrite().save("/tmp/linear-model")  # doctest: +SKIP
    >>> TorchModel.load("/tmp/linear-model").module  # doctest: +SKIP
    Linear(in_features=4, out_features=3, bias=True)
    """

    @keyword_only
    def __init__(
        self,
        *,
        module: nn.Module | None = None,
        featuresCol: str = "features",
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        outputKind: str = "auto",
        featureShape: list[int] | None = None,
        predictBatchSize: int = 1024,
    ) -> None:
        super().__init__()
        kwargs = dict(self._input_kwargs)
        module = kwargs.pop("module", None)
        self._engine: Estimator | None = None
        if module is not None:
            self._engine = _wrapped(module)
        self._set(**{k: v for k, v in kwargs.items() if v is not None})

    @property
    def module(self) -> nn.Module:
        """The trained network."""
        return self._checked_engine().get_model()

    @property
    def history(self) -> pd.DataFrame:
        """The training history: one row per epoch (loss, metrics, samples/s, seconds)."""
        return self._checked_engine().history

    def _transform(self, dataset: DataFrame) -> DataFrame:
        return core.transform(self, self.module, dataset)

    def _checked_engine(self) -> Estimator:
        if self._engine is None:
            raise ValueError(
                "this TorchModel holds no network: get one from TorchEstimator.fit, "
                "TorchModel.load, or TorchModel(module=trained_net)"
            )
        return self._engine

    # --- persistence ------------------------------------------------------------------------

    def write(self) -> TorchStageWriter:
        """A writer: JSON Params as Spark ML metadata, the network as safetensors + pickle."""
        return TorchStageWriter(self)

    @classmethod
    def read(cls) -> TorchStageReader:
        """A reader for `write()`'s output (unpickles code: trusted paths only)."""
        return TorchStageReader(cls)

    def _save_data(self, path: str) -> None:
        self._checked_engine().save(join(path, "estimator"))

    def _load_data(self, path: str) -> None:
        from deepspark.training import Estimator

        self._engine = Estimator.load(join(path, "estimator"))


def _wrapped(module: Any) -> Estimator:
    """A training-engine Estimator around an already trained network (for persistence)."""
    from torch import nn

    from deepspark.training import Estimator

    if not isinstance(module, nn.Module):
        raise TypeError(
            f"module must be a torch.nn.Module, got {type(module).__module__}."
            f"{type(module).__qualname__}"
        )
    return Estimator(model=module, optimizer=None, loss=None)
