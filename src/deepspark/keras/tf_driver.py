"""Keras 3 on the TensorFlow backend: the driver side of ``fit`` and ``evaluate``.

Driver side (pyspark is imported here, lazily). `KerasEstimator` calls `fit` and `evaluate`
for ``backend="tensorflow"``. They check the arguments and columns as the torch engine does,
reuse its job input, progress channel, progress bar and attempts (`training.driver.jobs.run_job`
with `deepspark.keras.tf_rank.run_tf_rank` as each barrier task's work), and load what rank 0
sent back into the estimator's Keras model.

Each task runs one worker of ``tf.distribute.MultiWorkerMirroredStrategy`` in a process of its
own (see `deepspark.keras.tf_worker`), fed from the same Arrow spill as the torch engine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import cloudpickle
import pandas as pd

__all__ = ["evaluate", "fit"]

# fit arguments of the torch engine that the TensorFlow backend has no use for, with their
# defaults: another value is refused with what to do instead
_UNSUPPORTED = {
    "max_steps": None,
    "steps_per_epoch": None,
    "validate_every_steps": None,
    "checkpoint_every_steps": None,
    "accumulate_steps": 1,
    "clip_grad_norm": None,
    "precision": "fp32",
}


def fit(
    estimator: Any,
    df: Any,
    feature_cols: Any = None,
    label_cols: Any = None,
    epochs: int = 1,
    batch_size: int = 32,
    validation_data: Any = None,
    num_workers: int | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    max_failures: int = 0,
    callbacks: Sequence[Any] | None = None,
    seed: int | None = None,
    *,
    feature_shapes: dict[str, Sequence[int]] | None = None,
    feature_dtypes: dict[str, str] | None = None,
    label_dtypes: dict[str, str] | None = None,
    decoders: dict[str, Any] | None = None,
    step_policy: str | None = None,
    collective_timeout_s: float = 600.0,
    progress: bool = True,
    stream_first_epoch: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """Train ``estimator.keras_model`` under ``MultiWorkerMirroredStrategy``, one worker per
    Spark task; the arguments are `Estimator.fit`'s.

    The whole partition is spilled before the first step (``stream_first_epoch`` has no effect
    here). Returns the history (also ``estimator.history``); the trained weights are set on
    ``estimator.keras_model``.
    """
    from deepspark.keras.tf_rank import run_tf_rank
    from deepspark.training.callbacks import call_driver_hook
    from deepspark.training.driver.checks import check_positive, pickled
    from deepspark.training.driver.jobs import run_job
    from deepspark.training.driver.options import RecoveryOptions
    from deepspark.training.driver.timeline import fit_timeline
    from deepspark.training.job_spec import JobKind, ResultKind

    del stream_first_epoch  # the TensorFlow path always spills first
    started, started_wall = time.perf_counter(), time.time()
    _refuse_unsupported(options)
    check_positive("epochs", epochs)
    check_positive("batch_size", batch_size)
    if estimator.keras_loss is None or estimator.keras_optimizer is None:
        raise ValueError(
            "fit needs a loss and an optimizer: Estimator.from_keras(model, optimizer='adam', "
            "loss='sparse_categorical_crossentropy', ...)"
        )
    job = _job_data(
        df,
        validation_data,
        feature_cols,
        label_cols,
        (feature_shapes, feature_dtypes, label_dtypes, decoders),
        num_workers=num_workers,
        batch_size=batch_size,
        training=True,
    )
    recovery = RecoveryOptions(checkpoint_dir, checkpoint_every, resume, max_failures)
    recovery.prepare(job.spark)
    policy = step_policy or "pad"
    if policy not in ("pad", "drop", "wrap"):
        raise ValueError(f'step_policy={step_policy!r}: use "pad", "drop" or "wrap"')
    callbacks = list(callbacks or [])
    fit_params = {
        "epochs": epochs,
        "batch_size": batch_size,
        "num_workers": job.num_workers,
        "step_policy": policy,
        "seed": seed,
        "checkpoint_dir": recovery.checkpoint_dir,
    }
    call_driver_hook(callbacks, "on_fit_begin", fit_params)
    spec = _spec(
        estimator,
        JobKind.FIT,
        job,
        epochs=epochs,
        batch_size=batch_size,
        step_policy=policy,
        seed=0 if seed is None else int(seed),
        has_validation=job.has_validation,
        checkpoint_dir=recovery.checkpoint_dir,
        checkpoint_every=recovery.checkpoint_every,
        resume=recovery.resume,
        collective_timeout_s=collective_timeout_s,
        # pickled after on_fit_begin, so what it set reaches every rank
        callbacks_blob=pickled("callbacks", callbacks) if callbacks else None,
    )
    checks_done = time.time()
    try:
        result = run_job(
            job.spark,
            job.frame,
            spec,
            max_failures=recovery.max_failures,
            progress=progress,
            started=started,
            rank_entry=run_tf_rank,
        )
    except BaseException as error:
        call_driver_hook(callbacks, "on_fit_end", [], error)
        raise
    finally:
        recovery.release()
    _set_weights(estimator.keras_model, result.payload(ResultKind.WEIGHTS))
    history = json.loads(result.payload(ResultKind.HISTORY))
    for record in history:
        record["attempt"] = result.epoch_attempts.get(int(record["epoch"]), 1)
    estimator.history = pd.DataFrame(history)
    estimator.attempts_ = result.attempts
    estimator.first_step_s_ = result.first_step_s
    estimator.job_ports_ = result.ports
    estimator.timings_ = fit_timeline(result.marks, started_wall, checks_done, time.time())
    call_driver_hook(callbacks, "on_fit_end", history, None)
    return estimator.history


def evaluate(
    estimator: Any,
    df: Any,
    feature_cols: Any = None,
    label_cols: Any = None,
    batch_size: int = 256,
    num_workers: int | None = None,
    *,
    feature_shapes: dict[str, Sequence[int]] | None = None,
    feature_dtypes: dict[str, str] | None = None,
    label_dtypes: dict[str, str] | None = None,
    decoders: dict[str, Any] | None = None,
    collective_timeout_s: float = 600.0,
) -> dict[str, float]:
    """Loss and metrics of ``estimator.keras_model`` over every row of `df`, computed by
    the workers of a ``MultiWorkerMirroredStrategy``; ``{"loss": ..., "<metric>": ...}``."""
    from deepspark.keras.tf_rank import run_tf_rank
    from deepspark.training.driver.checks import check_positive
    from deepspark.training.driver.jobs import run_job
    from deepspark.training.job_spec import JobKind, ResultKind

    check_positive("batch_size", batch_size)
    job = _job_data(
        df,
        None,
        feature_cols,
        label_cols,
        (feature_shapes, feature_dtypes, label_dtypes, decoders),
        num_workers=num_workers,
        batch_size=batch_size,
        training=False,
    )
    spec = _spec(
        estimator,
        JobKind.EVALUATE,
        job,
        epochs=0,
        batch_size=max(batch_size, job.num_workers),
        collective_timeout_s=collective_timeout_s,
    )
    result = run_job(job.spark, job.frame, spec, progress=False, rank_entry=run_tf_rank)
    return json.loads(result.payload(ResultKind.METRICS))


def _refuse_unsupported(options: dict[str, Any]) -> None:
    for name, value in options.items():
        if name not in _UNSUPPORTED:
            raise TypeError(f"fit() got an unexpected keyword argument {name!r}")
        if value != _UNSUPPORTED[name]:
            raise ValueError(
                f"{name}={value!r} is not supported on Keras's TensorFlow backend; leave it out, "
                'or train on the torch backend (Estimator.from_keras(..., backend="torch"))'
            )


def _job_data(
    df: Any,
    validation: Any,
    feature_cols: Any,
    label_cols: Any,
    column_options: tuple[Any, Any, Any, Any],
    *,
    num_workers: int | None,
    batch_size: int,
    training: bool,
):
    """The job's input, checked on the driver as the torch engine checks it (columns, types,
    worker count), without its torch dry run."""
    from deepspark.context.topology import task_slots
    from deepspark.training.driver.checks import columns_of, fit_workers, resolve_columns
    from deepspark.training.driver.fit_data import JobData, is_creator
    from deepspark.training.driver.inputs import training_frames
    from deepspark.training.driver.jobs import job_input
    from deepspark.training.driver.options import ColumnOptions
    from deepspark.training.job_spec import TRAIN_SPLIT, VALIDATION_SPLIT

    if is_creator(df):
        raise TypeError(
            "Keras's TensorFlow backend trains on DataFrames (Spark, pandas, pandas-on-Spark) "
            "or dicts of arrays, not on a data creator"
        )
    for name, value in (("feature_cols", feature_cols), ("label_cols", label_cols)):
        if value is None:
            raise ValueError(f"{name}= is needed: name the DataFrame's columns to read")
    shapes, feature_dtypes, label_dtypes, decoders = column_options
    df, validation, shapes = training_frames(
        df, validation, feature_cols, label_cols, num_workers=num_workers, feature_shapes=shapes
    )
    columns = ColumnOptions(shapes, feature_dtypes, label_dtypes, decoders)
    spark = df.sparkSession
    if training:
        num_workers = fit_workers(spark, num_workers, batch_size)
    else:
        slots = task_slots(spark)
        num_workers = min(slots, num_workers or slots)
    features, labels, _ = resolve_columns(df, feature_cols, label_cols, columns)
    if validation is not None:
        resolve_columns(validation, feature_cols, label_cols, columns)
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


def _spec(estimator: Any, kind: Any, job: Any, **values: Any):
    """The job's `TrainSpec`: the Keras model as ``.keras`` bytes, and the compile arguments
    with Keras objects as their configs (their variables belong to the driver's backend)."""
    from deepspark.inference.keras_runtime import keras_to_bytes
    from deepspark.training.driver.checks import pickled
    from deepspark.training.job_spec import TrainSpec

    optimizer = estimator.keras_optimizer
    if optimizer is not None and not isinstance(optimizer, str):
        import keras

        optimizer = keras.optimizers.serialize(optimizer)
    loss = _portable(estimator.keras_loss, "loss")
    loss_weights = getattr(estimator, "keras_loss_weights", None)
    return TrainSpec(
        kind=kind,
        model_blob=cloudpickle.dumps(("keras-file", keras_to_bytes(estimator.keras_model))),
        loss_blob=pickled("loss", (loss, loss_weights)),
        optimizer_blob=None if optimizer is None else pickled("optimizer", optimizer),
        scheduler_blob=None,
        metrics_blob=pickled("metrics", _portable(estimator.keras_metrics, "metric")),
        callbacks_blob=values.pop("callbacks_blob", None),
        config=dict(estimator.config),
        features=tuple(job.features),
        labels=tuple(job.labels),
        world_size=job.num_workers,
        job_id=uuid.uuid4().hex[:12],
        rendezvous_host=None,
        **values,
    )


def _portable(value: Any, kind: str) -> Any:
    """Keras loss and metric objects as ``("keras-object", kind, config)``; names and
    functions as they are (see `tf_loop.restore_portable`)."""
    if isinstance(value, dict):
        return {key: _portable(item, kind) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(item, kind) for item in value)
    module = type(value).__module__.split(".")[0]
    if module == "keras" and hasattr(value, "get_config"):
        import keras

        serialize = keras.losses.serialize if kind == "loss" else keras.metrics.serialize
        return ("keras-object", kind, serialize(value))
    return value


def _set_weights(model: Any, blob: bytes) -> None:
    """Rank 0's weights (safetensors, by position) into the driver's Keras model."""
    from deepspark.persist.weights import weights_from_bytes

    state = weights_from_bytes(blob)
    values = [state[name].numpy() for name in sorted(state)]
    if len(values) != len(model.weights):
        raise RuntimeError(
            f"the job sent {len(values)} weights back for a model of {len(model.weights)}"
        )
    model.set_weights(values)
