"""What `TorchEstimator._fit` and `TorchModel._transform` do, as plain functions.

Driver side. `fit_estimator` turns Param values into one `deepspark.Estimator.fit` call (the
training engine: validation, barrier stage, retries); `transform` turns them into one
`deepspark.inference.predict` call (the inference path) plus a few Spark column expressions.
Nothing here captures a Params object in a closure: the engines receive plain values.
"""

from __future__ import annotations

import copy
import functools
import time
import uuid
from typing import TYPE_CHECKING, Any

from deepspark.ml.losses import LossTask, TargetShapedLikeOutputs, loss_task

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from torch import nn

    from deepspark.ml.params import _TorchEstimatorParams, _TorchParams
    from deepspark.training import Estimator

__all__ = ["feature_input", "fit_estimator", "optimizer_factory", "transform"]

# Column names used only inside one transform or fit; never left in a result.
_FEATURES_COLUMN = "__deepspark_features"
_PROBABILITIES_COLUMN = "__deepspark_probabilities"


def optimizer_factory(optimizer: Any, learning_rate: float, kwargs: dict[str, Any]) -> Any:
    """``params -> Optimizer``: the Param values bound, picklable (a `functools.partial`)."""
    from deepspark.ml.params import resolve_dotted

    build = resolve_dotted(optimizer) if isinstance(optimizer, str) else optimizer
    return functools.partial(build, lr=learning_rate, **kwargs)


def check_column(df: DataFrame, param: str, name: str, hint: str) -> None:
    if name not in df.columns:
        raise ValueError(
            f"{param}={name!r} is not a column of the DataFrame (it has {df.columns}); {hint}"
        )


def feature_input(
    df: DataFrame, feature_col: str, feature_shape: list[int] | None
) -> tuple[DataFrame, str, dict[str, tuple[int, ...]] | None]:
    """The frame, column and shapes the engines read the features from.

    Vectors and arrays are read as they are. With `featureShape`, an array column is reshaped
    by the data layer; a vector column is first turned into an ``array<float>`` by Spark
    (``vector_to_array``, in the JVM), since only arrays take a declared shape.
    """
    check_column(
        df,
        "featuresCol",
        feature_col,
        "set featuresCol=, or put a VectorAssembler before this stage",
    )
    if feature_shape is None:
        return df, feature_col, None
    shape = tuple(feature_shape)
    data_type = df.schema[feature_col].dataType
    if hasattr(data_type, "sqlType") and data_type.simpleString() == "vector":
        from pyspark.ml.functions import vector_to_array
        from pyspark.sql import functions as F

        frame = df.withColumn(_FEATURES_COLUMN, vector_to_array(F.col(feature_col), "float32"))
        return frame, _FEATURES_COLUMN, {_FEATURES_COLUMN: shape}
    return df, feature_col, {feature_col: shape}


# --- fit ------------------------------------------------------------------------------------


def fit_estimator(params: _TorchEstimatorParams, dataset: DataFrame) -> Estimator:
    """Train a fresh deep copy of the `model` Param on `dataset`; the fitted engine comes back."""
    from deepspark.training import Estimator

    model = params.getModel()
    if model is None:
        raise ValueError("TorchEstimator needs model=: the torch.nn.Module to train")
    loss = params.getLoss()
    if loss is None:
        raise ValueError("TorchEstimator needs loss=, e.g. torch.nn.CrossEntropyLoss()")
    label_col = params.getLabelCol()
    check_column(
        dataset,
        "labelCol",
        label_col,
        "set labelCol=, or index a string label with StringIndexer first",
    )
    frame, feature_col, shapes = feature_input(
        dataset, params.getFeaturesCol(), params.getFeatureShape()
    )
    task = loss_task(loss)
    label_dtypes = None
    if task is LossTask.CLASSIFICATION:
        label_dtypes = {label_col: "int64"}  # StringIndexer writes class ids as doubles
    elif task in (LossTask.BINARY, LossTask.REGRESSION):
        label_dtypes = {label_col: "float32"}
        loss = TargetShapedLikeOutputs(loss)

    seed = params.getOrDefault(params.seed)
    validation = None
    fraction = params.getValidationFraction()
    if fraction > 0:
        frame, validation = frame.randomSplit([1.0 - fraction, fraction], seed=seed)

    # a deep copy per fit: CrossValidator's folds and grid points never share weights
    estimator = Estimator.from_torch(
        model=copy.deepcopy(model),
        optimizer=optimizer_factory(
            params.getOptimizer(), params.getLearningRate(), params.getOptimizerParams()
        ),
        loss=loss,
        metrics=params.getMetrics(),
    )
    estimator.fit(
        frame,
        feature_cols=feature_col,
        label_cols=label_col,
        epochs=params.getEpochs(),
        batch_size=params.getBatchSize(),
        validation_data=validation,
        num_workers=params.getNumWorkers() or None,
        checkpoint_dir=_run_directory(params.getCheckpointDir()),
        max_failures=params.getMaxFailures(),
        seed=seed,
        feature_shapes=shapes,
        label_dtypes=label_dtypes,
        progress=params.getShowProgress(),
    )
    return estimator


def _run_directory(checkpoint_dir: str | None) -> str | None:
    """A fresh run folder under `checkpointDir` for each fit (each grid point and fold)."""
    if checkpoint_dir is None:
        return None
    return (
        f"{checkpoint_dir.rstrip('/')}/run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    )


# --- transform ------------------------------------------------------------------------------


def transform(params: _TorchParams, module: nn.Module, dataset: DataFrame) -> DataFrame:
    """`dataset` with the prediction column (and the probability column for class outputs)."""
    from pyspark.sql import functions as F

    from deepspark.inference import predict

    prediction_col = params.getPredictionCol()
    kind = params.getOutputKind()
    probability_col = params.getProbabilityCol() if kind == "class" else ""
    for param, name in (("predictionCol", prediction_col), ("probabilityCol", probability_col)):
        if name and name in dataset.columns:
            raise ValueError(
                f"{param}={name!r} already exists in the DataFrame; set {param}= to another "
                "name or drop the column first"
            )
    frame, feature_col, shapes = feature_input(
        dataset, params.getFeaturesCol(), params.getFeatureShape()
    )
    options: dict[str, Any] = {
        "feature_cols": feature_col,
        "batch_size": params.getPredictBatchSize(),
        "passthrough_cols": dataset.columns,
        "feature_shapes": shapes,
    }
    if kind == "class" and probability_col:
        # one model pass: softmax scores, then the class id is their argmax, in the JVM
        scored = predict(
            frame, module, output_col=_PROBABILITIES_COLUMN, output="probabilities", **options
        )
        from pyspark.ml.functions import array_to_vector

        scores = F.col(_PROBABILITIES_COLUMN)
        class_id = (F.array_position(scores, F.array_max(scores)) - 1).cast("double")
        return (
            scored.withColumn(probability_col, array_to_vector(scores))
            .withColumn(prediction_col, class_id)
            .drop(_PROBABILITIES_COLUMN)
        )
    scored = predict(frame, module, output_col=prediction_col, output=kind, **options)
    if kind == "class":
        # Spark ML's evaluators read class ids as doubles
        return scored.withColumn(prediction_col, F.col(prediction_col).cast("double"))
    return scored
