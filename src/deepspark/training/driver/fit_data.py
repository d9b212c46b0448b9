"""What a fit or evaluate job reads: a DataFrame's rows, or the user's data creator.

Driver side. `job_data` turns the first argument of `fit`/`evaluate` (a Spark, pandas or
pandas-on-Spark DataFrame, a dict of arrays, or a data creator) into the job's input, its
tensor specs and the `TrainSpec` values they need, after every check that can run on the
driver (columns, the dry run of model and loss on the first rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deepspark.context.spark_versions import collect_arrow

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from deepspark.training.driver.options import ColumnOptions

__all__ = ["JobData", "is_creator", "job_data", "predict_creator"]


@dataclass
class JobData:
    """The job's input and what the ranks need to read it."""

    spark: SparkSession
    num_workers: int
    frame: DataFrame  # what the barrier stage maps over: rows, or one row per rank
    features: tuple[Any, ...] = ()
    labels: tuple[Any, ...] = ()
    has_validation: bool = False
    spec_values: dict[str, Any] = field(default_factory=dict)


def is_creator(data: Any) -> bool:
    """Whether `data` is a data creator ``(config, batch_size) -> DataLoader``."""
    return callable(data) and not hasattr(data, "columns")


def job_data(
    estimator,
    data: Any,
    validation: Any,
    feature_cols: Any,
    label_cols: Any,
    columns: ColumnOptions,
    *,
    num_workers: int | None,
    batch_size: int,
    training: bool,
) -> JobData:
    """The input of a fit (``training``) or an evaluate job, checked on the driver."""
    from deepspark.training.driver.checks import (
        check_finite_sample,
        check_validation_like_training,
        columns_of,
        dry_run,
        fit_workers,
        resolve_columns,
    )
    from deepspark.training.driver.inputs import training_frames
    from deepspark.training.driver.jobs import job_input
    from deepspark.training.job_spec import TRAIN_SPLIT, VALIDATION_SPLIT

    if is_creator(data):
        return _creator_data(data, validation, feature_cols, label_cols, num_workers, batch_size)
    for name, value in (("feature_cols", feature_cols), ("label_cols", label_cols)):
        if value is None:
            raise ValueError(f"{name}= is needed: name the DataFrame's columns to read")
    df, validation, shapes = training_frames(
        data,
        validation,
        feature_cols,
        label_cols,
        num_workers=num_workers,
        feature_shapes=columns.feature_shapes,
    )
    columns = dataclasses.replace(columns, feature_shapes=shapes)
    spark = df.sparkSession
    if training:
        num_workers = fit_workers(spark, num_workers, batch_size)
    else:
        from deepspark.context.topology import task_slots

        slots = task_slots(spark)
        num_workers = min(slots, num_workers or slots)
    features, labels, sample = resolve_columns(df, feature_cols, label_cols, columns)
    refuse_non_finite = training and not columns.allow_non_finite
    if refuse_non_finite:
        check_finite_sample(sample, features, labels, "df")
    if validation is not None:
        validation_sample = check_validation_like_training(
            validation, df, feature_cols, label_cols, columns, (*features, *labels)
        )
        if refuse_non_finite:
            check_finite_sample(validation_sample, features, labels, "validation_data")
    if training and estimator.steps.train_step is None:  # a custom step uses the model its way
        dry_run(
            estimator.get_model(),
            estimator.loss,
            estimator._optimizer_factory,
            df,
            features,
            labels,
            sample=sample,
            metrics=estimator.metrics,
            collate=estimator.steps.collate_fn,
        )
    needed = columns_of(features) + columns_of(labels)
    if training:
        frame = job_input(
            df,
            needed,
            num_workers,
            split=TRAIN_SPLIT,
            validation=validation,
            validation_split=VALIDATION_SPLIT,
        )
    else:
        frame = job_input(df, needed, num_workers, split=VALIDATION_SPLIT)
    return JobData(spark, num_workers, frame, features, labels, validation is not None)


def _creator_data(
    creator: Callable[..., Any],
    validation: Any,
    feature_cols: Any,
    label_cols: Any,
    num_workers: int | None,
    batch_size: int,
) -> JobData:
    """A job whose ranks build their own batches: one row per rank says which rank it is."""
    from deepspark.training.driver.checks import fit_workers, pickled
    from deepspark.training.job_spec import TRAIN_SPLIT, VALIDATION_SPLIT

    if validation is not None and not is_creator(validation):
        raise TypeError(
            "validation_data= must be a data creator too when the training data is one: "
            f"a function (config, batch_size) -> DataLoader, not {type(validation).__name__}"
        )
    spark = _session()
    num_workers = fit_workers(spark, num_workers, batch_size)
    blobs = {TRAIN_SPLIT: pickled("data creator", creator)}
    if validation is not None:
        blobs[VALIDATION_SPLIT] = pickled("validation data creator", validation)
    keys = (_keys(feature_cols), _keys(label_cols))
    frame = spark.range(0, num_workers, 1, num_workers)
    values = {"creator_blobs": blobs, "creator_keys": keys if keys != (None, None) else None}
    return JobData(spark, num_workers, frame, (), (), validation is not None, values)


def _session() -> SparkSession:
    from pyspark.sql import SparkSession

    from deepspark.context.session import current_session

    spark = current_session() or SparkSession.getActiveSession()
    if spark is None:
        raise RuntimeError(
            "a data creator runs inside Spark tasks, and no Spark session is running; start "
            "one first with ds.init_context() (import deepspark as ds)"
        )
    return spark


def _keys(cols: Any) -> list[str] | None:
    if cols is None:
        return None
    return [cols] if isinstance(cols, str) else list(cols)


def predict_creator(
    estimator, creator: Any, *, batch_size: int, num_workers: int | None, feature_cols: Any
) -> Any:
    """`Estimator.predict` on a data creator: the outputs as numpy, in the data's order.

    One task per worker runs the creator and the model on its share; the outputs come back to
    the driver (they are what the caller asked for: numpy arrays in memory).
    """
    import io

    import cloudpickle
    import numpy as np
    import torch

    from deepspark.context.topology import task_slots
    from deepspark.training.driver.checks import check_positive, pickled

    spark = _session()
    tasks = task_slots(spark) if num_workers is None else num_workers
    check_positive("num_workers", tasks)
    model_blob = pickled("model", estimator.get_model())
    creator_blob = pickled("data creator", creator)
    config = dict(estimator.config)
    keys = (_keys(feature_cols), None) if feature_cols is not None else None

    def task(batches):
        from pyspark import TaskContext

        from deepspark.training.rank.sources import predict_share

        for _ in batches:
            pass
        yield from predict_share(
            cloudpickle.loads(model_blob),
            cloudpickle.loads(creator_blob),
            rank=TaskContext.get().partitionId(),
            world_size=tasks,
            batch_size=batch_size,
            config=config,
            keys=keys,
        )

    frame = spark.range(0, tasks, 1, tasks)
    table = collect_arrow(frame.mapInArrow(task, "order long, payload binary")).sort_by("order")
    parts = [
        torch.load(io.BytesIO(payload), weights_only=True)
        for payload in table.column("payload").to_pylist()
    ]
    if not parts:
        return np.empty((0,), dtype=np.float32)
    return _concatenate(parts)


def _concatenate(parts: list[Any]) -> Any:
    """One numpy array per output over every batch (a dict, tuple or list of them)."""
    import numpy as np
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts).numpy()
    if isinstance(first, dict):
        return {key: _concatenate([part[key] for part in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(
            _concatenate([part[index] for part in parts]) for index in range(len(first))
        )
    return np.asarray(parts)
