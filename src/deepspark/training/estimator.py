"""`Estimator`: train, evaluate, predict, save and load a PyTorch model on Spark DataFrames.

Driver side. Validates everything it can before a job starts, builds a plain `TrainSpec`, runs
one barrier stage per attempt (`launcher.run_barrier_stage`) and re-runs failed attempts from
the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cloudpickle
import pandas as pd
import torch
from torch import nn

from deepspark.training.spec import (
    SPLIT_COLUMN,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    JobKind,
    ResultKind,
    TrainSpec,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["Estimator", "TrainingError"]

_log = logging.getLogger(__name__)

ColumnsArg = str | Sequence[str | Sequence[str]]


class TrainingError(RuntimeError):
    """A training job failed (after its allowed retries); `causes` holds one entry per attempt."""

    def __init__(self, message: str, causes: list[str]):
        super().__init__(message)
        self.causes = causes


class Estimator:
    """A PyTorch model with the means to train it data-parallel inside Spark.

    Build one with `Estimator.from_torch`.

    Attributes
    ----------
    history : pandas.DataFrame
        One row per epoch of the last `fit`; the trained weights are in `get_model()`.
    attempts_ : int
        How many attempts the last job took (1 when nothing failed).
    first_step_s_ : float
        Seconds from the `fit` call to the first training step of its successful attempt.
    job_ports_ : list of int
        The ports the last job listened on (progress channel, rendezvous), for diagnostics.
    """

    def __init__(
        self,
        *,
        model: nn.Module | Callable[[dict[str, Any]], nn.Module],
        optimizer: Any,
        loss: Any,
        metrics: Sequence[Any] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        config: dict[str, Any] | None = None,
        use_gpu: bool = False,
    ):
        self.config = dict(config or {})
        self._model = model if isinstance(model, nn.Module) else model(self.config)
        if not isinstance(self._model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module or a function config -> nn.Module; "
                f"it gave {type(self._model).__name__}"
            )
        self._optimizer_factory = _optimizer_factory(optimizer)
        self.loss = loss
        self.metrics = list(metrics or [])
        self.scheduler = scheduler
        self.use_gpu = use_gpu
        self.history: pd.DataFrame = pd.DataFrame()
        self._feature_cols: ColumnsArg | None = None

    @classmethod
    def from_torch(
        cls,
        model: nn.Module | Callable[[dict[str, Any]], nn.Module],
        optimizer: Any = None,
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        config: dict[str, Any] | None = None,
        use_gpu: bool = False,
    ) -> Estimator:
        """Wrap a PyTorch model for distributed training on Spark.

        Parameters
        ----------
        model : nn.Module or callable
            The network, or a function ``config -> nn.Module``.
        optimizer : callable or torch.optim.Optimizer
            A function ``params -> Optimizer``; an optimizer built on the driver's model is also
            accepted and rebuilt for each replica with the same class and hyperparameters.
        loss : nn.Module or callable
            ``loss(outputs, labels) -> scalar tensor``, mean-reduced over the rows.
        metrics : list, optional
            Names (``"accuracy"``, ``"mse"``, ``"mae"``, ``"rmse"``, ``"auc"``, …) or metric
            objects; reduced exactly across ranks.
        scheduler : callable, optional
            ``optimizer -> LRScheduler``, stepped once per epoch.
        config : dict, optional
            Passed to a model function.
        use_gpu : bool
            Train with CUDA and NCCL on the GPUs Spark assigns to each task.

        Examples
        --------
        >>> import torch, deepspark as ds
        >>> est = ds.Estimator.from_torch(
        ...     model=torch.nn.Linear(4, 2),
        ...     optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        ...     loss=torch.nn.CrossEntropyLoss(),
        ...     metrics=["accuracy"],
        ... )
        >>> type(est.get_model()).__name__
        'Linear'
        """
        if loss is None:
            raise ValueError("from_torch needs loss=, e.g. torch.nn.CrossEntropyLoss()")
        return cls(
            model=model,
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            scheduler=scheduler,
            config=config,
            use_gpu=use_gpu,
        )

    def get_model(self) -> nn.Module:
        """The driver's model; after `fit` it holds the trained weights."""
        return self._model

    # --- fit --------------------------------------------------------------------------------

    def fit(
        self,
        df: DataFrame,
        feature_cols: ColumnsArg,
        label_cols: ColumnsArg,
        epochs: int = 1,
        batch_size: int = 32,
        validation_data: DataFrame | None = None,
        num_workers: int | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1,
        resume: bool = True,
        max_failures: int = 0,
        callbacks: Sequence[Any] | None = None,
        seed: int | None = None,
        *,
        feature_shapes: dict[str, Sequence[int]] | None = None,
        feature_dtypes: dict[str, str] | None = None,
        label_dtypes: dict[str, str] | None = None,
        decoders: dict[str, Callable[[Any], Any]] | None = None,
        step_policy: str = "pad",
        collective_timeout_s: float = 600.0,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Train data-parallel on `df` inside one Spark barrier stage.

        Parameters
        ----------
        df : pyspark.sql.DataFrame
            Training rows.
        feature_cols, label_cols : str or list
            Columns; a nested list of scalar columns stacks them into one tensor.
        epochs : int
        batch_size : int
            The global batch size, split over the workers.
        validation_data : DataFrame, optional
            Evaluated after every epoch, in the same stage, each rank on its share.
        num_workers : int, optional
            Ranks (Spark tasks); default: every free task slot.
        checkpoint_dir : str, optional
            fsspec URL where rank 0 writes a checkpoint every `checkpoint_every` epochs.
        resume : bool
            Continue from the latest checkpoint in `checkpoint_dir` if there is one.
        max_failures : int
            How many times a failed job is re-run from its latest checkpoint.
        callbacks : list of deepspark.training.callbacks.Callback, optional
        seed : int, optional
            Seeds the model's replicas and the per-epoch shuffle.
        feature_shapes, feature_dtypes, label_dtypes, decoders : dict, optional
            Per column: the shape of an array column, tensor dtypes, and decode functions for
            binary or string columns.
        step_policy : {"pad", "drop", "wrap"}
            How ranks with fewer rows keep in step (see docs/data.md).
        collective_timeout_s : float
            Longest wait of any rank on the others before the job fails.
        progress : bool
            Show a live progress bar on the driver.

        Returns
        -------
        pandas.DataFrame
            The history: one row per epoch (train loss and metrics, validation loss and
            metrics, samples/s, seconds); also kept as `history`.
        """
        from deepspark.training.launcher import available_task_slots

        fit_started = time.perf_counter()
        spark = df.sparkSession
        _positive("epochs", epochs)
        _positive("batch_size", batch_size)
        _positive("checkpoint_every", checkpoint_every)
        if max_failures < 0:
            raise ValueError(f"max_failures={max_failures}: give 0 or more")
        slots = available_task_slots(spark)
        if num_workers is None:
            num_workers = slots
        _positive("num_workers", num_workers)
        if num_workers > slots:
            raise ValueError(
                f"num_workers={num_workers} is more than the {slots} task slots this Spark "
                "application has; a barrier stage needs all its tasks at once. Lower "
                "num_workers or add executors/cores"
            )
        if batch_size < num_workers:
            raise ValueError(
                f"batch_size={batch_size} is smaller than num_workers={num_workers}: every "
                "worker needs at least one row per step. Raise batch_size or lower num_workers"
            )
        if self._optimizer_factory is None:
            raise ValueError("fit needs an optimizer: from_torch(optimizer=lambda p: ...)")
        features, labels = self._resolve(
            df, feature_cols, label_cols, feature_shapes, feature_dtypes, label_dtypes, decoders
        )
        if validation_data is not None:
            self._resolve(
                validation_data,
                feature_cols,
                label_cols,
                feature_shapes,
                feature_dtypes,
                label_dtypes,
                decoders,
            )
        self._dry_run(df, features, labels)
        columns = _columns_of(features) + _columns_of(labels)
        data = _with_split(df, columns, TRAIN_SPLIT)
        if validation_data is not None:
            data = data.unionByName(_with_split(validation_data, columns, VALIDATION_SPLIT))
        data = _partitioned(data, num_workers, force=validation_data is not None)
        if seed is not None:
            torch.manual_seed(seed)

        own_checkpoints = None
        if max_failures > 0 and checkpoint_dir is None:
            from deepspark.training.launcher import is_loopback_master

            if not is_loopback_master(spark):
                raise ValueError(
                    "max_failures > 0 needs checkpoint_dir= (a URL every executor can reach, "
                    "e.g. hdfs:// or s3://) so a re-run can resume"
                )
            own_checkpoints = tempfile.mkdtemp(prefix="deepspark-ckpt-")
            checkpoint_dir = own_checkpoints
        spec = self._spec(
            JobKind.FIT,
            features,
            labels,
            num_workers,
            epochs=epochs,
            batch_size=batch_size,
            step_policy=step_policy,
            seed=0 if seed is None else seed,
            has_validation=validation_data is not None,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
            collective_timeout_s=collective_timeout_s,
        )
        from deepspark.training.callbacks import call_driver_hook

        callbacks = list(callbacks or [])
        call_driver_hook(
            callbacks,
            "on_fit_begin",
            {
                "epochs": epochs,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "step_policy": step_policy,
                "seed": seed,
                "checkpoint_dir": checkpoint_dir,
            },
        )
        # pickled after on_fit_begin, so what it set (an MLflow run id) reaches every rank
        spec.callbacks_blob = _pickled("callbacks", callbacks) if callbacks else None
        try:
            results = self._run(
                spark,
                data,
                spec,
                max_failures=max_failures,
                progress=progress,
                started=fit_started,
            )
        except BaseException as error:
            call_driver_hook(callbacks, "on_fit_end", [], error)
            raise
        finally:
            if own_checkpoints is not None:
                shutil.rmtree(own_checkpoints, ignore_errors=True)
        self._load_weights(results)
        history = json.loads(_payload(results, ResultKind.HISTORY))
        self.history = pd.DataFrame(history)
        self._feature_cols = feature_cols
        last = history[-1] if history else {}
        _log.info(
            "fit: %d epochs on %d workers; %s",
            len(history),
            num_workers,
            ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)),
        )
        call_driver_hook(callbacks, "on_fit_end", history, None)
        return self.history

    # --- evaluate / predict -----------------------------------------------------------------

    def evaluate(
        self,
        df: DataFrame,
        feature_cols: ColumnsArg,
        label_cols: ColumnsArg,
        batch_size: int = 256,
        num_workers: int | None = None,
        *,
        feature_shapes: dict[str, Sequence[int]] | None = None,
        feature_dtypes: dict[str, str] | None = None,
        label_dtypes: dict[str, str] | None = None,
        decoders: dict[str, Callable[[Any], Any]] | None = None,
        collective_timeout_s: float = 600.0,
    ) -> dict[str, float]:
        """Loss and metrics of the current model on `df`, computed distributed.

        Returns
        -------
        dict
            ``{"loss": ..., "<metric>": ...}``, exact over every row.
        """
        from deepspark.training.launcher import available_task_slots

        spark = df.sparkSession
        slots = available_task_slots(spark)
        num_workers = min(slots, num_workers or slots)
        _positive("batch_size", batch_size)
        features, labels = self._resolve(
            df, feature_cols, label_cols, feature_shapes, feature_dtypes, label_dtypes, decoders
        )
        columns = _columns_of(features) + _columns_of(labels)
        data = _partitioned(_with_split(df, columns, VALIDATION_SPLIT), num_workers, force=False)
        spec = self._spec(
            JobKind.EVALUATE,
            features,
            labels,
            num_workers,
            epochs=0,
            batch_size=max(batch_size, num_workers),
            collective_timeout_s=collective_timeout_s,
        )
        results = self._run(spark, data, spec, max_failures=0, progress=False)
        return json.loads(_payload(results, ResultKind.METRICS))

    def predict(
        self,
        df: DataFrame,
        feature_cols: ColumnsArg | None = None,
        batch_size: int = 1024,
        output_col: str = "prediction",
        **options: Any,
    ) -> DataFrame:
        """Add the model's output to `df` as `output_col` (see `deepspark.predict`)."""
        from deepspark.inference import predict

        cols = feature_cols if feature_cols is not None else self._feature_cols
        if cols is None:
            raise ValueError("predict needs feature_cols= (fit was not called on this estimator)")
        return predict(
            df,
            self._model,
            feature_cols=cols,
            output_col=output_col,
            batch_size=batch_size,
            **options,
        )

    # --- persistence ------------------------------------------------------------------------

    def save(self, path: str) -> str:
        """Save the model at an fsspec URL: safetensors weights, JSON metadata, pickled code.

        The architecture, loss, optimizer factory and metrics are stored with cloudpickle:
        load only directories you trust, since unpickling runs code.
        """
        from deepspark.training.persistence import save_estimator

        return save_estimator(self, path)

    @classmethod
    def load(cls, path: str) -> Estimator:
        """Load an estimator written by `save` (trusted directories only: it unpickles code)."""
        from deepspark.training.persistence import load_estimator

        return load_estimator(cls, path)

    # --- internals --------------------------------------------------------------------------

    def _resolve(
        self, df, feature_cols, label_cols, shapes, feature_dtypes, label_dtypes, decoders
    ):
        from deepspark.data.validate import resolve_specs

        features = resolve_specs(
            df,
            feature_cols,
            role="feature",
            shapes=shapes,
            dtypes=feature_dtypes,
            decoders=decoders,
        )
        labels = resolve_specs(
            df, label_cols, role="label", shapes=shapes, dtypes=label_dtypes, decoders=decoders
        )
        return features, labels

    def _dry_run(self, df, features, labels) -> None:
        """Run model and loss on a few rows on the driver: shape and label errors surface here."""
        from deepspark.data import batch_to_tensors

        sample = df.select(*(_columns_of(features) + _columns_of(labels))).limit(4).toArrow()
        if sample.num_rows == 0:
            raise ValueError("fit: the training DataFrame has no rows")
        inputs = batch_to_tensors(sample, features)
        targets = batch_to_tensors(sample, labels)
        model = self._model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                try:
                    outputs = model(*inputs)
                except Exception as error:
                    shapes = ", ".join(str(tuple(t.shape[1:])) for t in inputs)
                    raise ValueError(
                        f"the model failed on a sample batch with feature shapes {shapes} "
                        f"(per row): {error}. Check feature_cols and feature_shapes"
                    ) from error
                with warnings.catch_warnings():
                    warnings.simplefilter("error", UserWarning)
                    try:
                        self.loss(outputs, targets[0] if len(targets) == 1 else targets)
                    except Exception as error:
                        raise ValueError(
                            f"the labels do not suit the loss: {type(self.loss).__name__} on "
                            f"outputs of shape {tuple(outputs.shape)} and labels of shape "
                            f"{tuple(targets[0].shape)} and dtype {targets[0].dtype} failed: "
                            f"{error}. Check label_cols, or set label_dtypes (class ids need "
                            "int64; regression targets float32 with the output's shape)"
                        ) from error
        finally:
            model.train(was_training)

    def _spec(self, kind, features, labels, world_size, **values) -> TrainSpec:
        return TrainSpec(
            kind=kind,
            model_blob=_pickled("model", self._model),
            model_is_factory=False,
            loss_blob=_pickled("loss", self.loss),
            optimizer_blob=_pickled("optimizer", self._optimizer_factory),
            scheduler_blob=_pickled("scheduler", self.scheduler) if self.scheduler else None,
            metrics_blob=_pickled("metrics", self.metrics),
            callbacks_blob=None,
            config=self.config,
            features=tuple(features),
            labels=tuple(labels),
            world_size=world_size,
            use_gpu=self.use_gpu,
            job_id=uuid.uuid4().hex[:12],
            rendezvous_host=None,
            **values,
        )

    def _run(
        self,
        spark,
        data,
        spec: TrainSpec,
        *,
        max_failures: int,
        progress: bool,
        started: float | None = None,
    ):
        from deepspark.training.launcher import is_loopback_master, run_barrier_stage
        from deepspark.training.progress import ProgressBar, ProgressServer

        loopback = is_loopback_master(spark)
        spec.rendezvous_host = "127.0.0.1" if loopback else None
        started = time.perf_counter() if started is None else started
        bar = ProgressBar(epochs=spec.epochs) if progress else None
        first_step: list[float] = []

        def sink(event: dict[str, Any]) -> None:
            if event.get("kind") == "step" and not first_step:
                first_step.append(time.perf_counter() - started)
            if bar is not None:
                bar(event)

        causes: list[str] = []
        server = ProgressServer(
            host="127.0.0.1" if loopback else "0.0.0.0",
            advertise_host=None if loopback else _driver_host(spark),
            sink=sink,
        )
        with server:
            spec.progress_address = server.address
            spec.progress_token = server.token
            self.job_ports_ = [server.address[1]]
            try:
                for attempt in range(max_failures + 1):
                    errors_before = len(server.events("error"))
                    try:
                        result = run_barrier_stage(data, spec)
                    except Exception as error:
                        server.wait_for(
                            lambda events, n=errors_before: (
                                sum(1 for e in events if e.get("kind") == "error") > n
                            ),
                            timeout_s=2.0,
                        )
                        cause = _failure_summary(error, server.events("error")[errors_before:])
                        causes.append(cause)
                        if attempt == max_failures:
                            detail = "\n".join(
                                f"  attempt {i + 1}: {text}" for i, text in enumerate(causes)
                            )
                            raise TrainingError(
                                f"{spec.kind.value} failed after {attempt + 1} attempt(s):\n"
                                f"{detail}",
                                causes,
                            ) from error
                        _log.warning(
                            "%s: attempt %d failed (%s); re-running from the latest checkpoint",
                            spec.kind.value,
                            attempt + 1,
                            cause.splitlines()[0],
                        )
                        spec.resume = True
                        continue
                    self.attempts_ = attempt + 1
                    self.first_step_s_ = first_step[0] if first_step else float("nan")
                    for event in server.events("log"):
                        if "rendezvous_port" in event:
                            self.job_ports_.append(int(event["rendezvous_port"]))
                    return result
            finally:
                if bar is not None:
                    bar.close()
        raise AssertionError("unreachable")

    def _load_weights(self, results) -> None:
        from deepspark.training.worker import weights_from_bytes

        rows = [
            (seq, bytes(payload))
            for kind, seq, payload in zip(
                results.column("kind").to_pylist(),
                results.column("seq").to_pylist(),
                results.column("payload").to_pylist(),
                strict=True,
            )
            if kind == ResultKind.WEIGHTS.value
        ]
        if not rows:
            raise RuntimeError("fit: rank 0 sent no weights back")
        blob = b"".join(payload for _, payload in sorted(rows))
        self._model.load_state_dict(weights_from_bytes(blob))


# --- helpers ----------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: give a positive integer")


def _optimizer_factory(optimizer: Any) -> Callable[[Any], torch.optim.Optimizer] | None:
    """Accept `params -> Optimizer`, or an optimizer built on the driver (rebuilt per replica)."""
    if optimizer is None or (
        callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer)
    ):
        return optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer_class = type(optimizer)
        hyperparameters = {
            key: value for key, value in optimizer.defaults.items() if key != "params"
        }
        if len(optimizer.param_groups) > 1:
            warnings.warn(
                "the optimizer has several parameter groups; each replica is rebuilt with the "
                "first group's defaults. Pass optimizer=lambda params: ... to keep the groups",
                stacklevel=3,
            )

        def rebuild(params):
            return optimizer_class(params, **hyperparameters)

        return rebuild
    raise TypeError(
        f"optimizer must be a function params -> Optimizer or a torch.optim.Optimizer, "
        f"not {type(optimizer).__name__}"
    )


def _pickled(what: str, value: Any) -> bytes:
    try:
        return cloudpickle.dumps(value)
    except Exception as error:
        raise ValueError(
            f"the {what} could not be pickled to send to the workers: {error}. Define it at "
            "module level or as a function, and keep open files, locks and sessions out of it"
        ) from error


def _columns_of(specs) -> list[str]:
    names: list[str] = []
    for spec in specs:
        for name in spec.columns:
            if name not in names:
                names.append(name)
    return names


def _with_split(df, columns: list[str], split: int):
    from pyspark.sql import functions as F

    return df.select(*columns, F.lit(split).cast("int").alias(SPLIT_COLUMN))


def _partitioned(df, num_workers: int, *, force: bool):
    """Exactly `num_workers` partitions; kept as they are when they already match."""
    from deepspark.training.launcher import is_connect

    if not force and not is_connect(df.sparkSession):
        with contextlib.suppress(Exception):
            if df.rdd.getNumPartitions() == num_workers:
                return df
    return df.repartition(num_workers)


def _driver_host(spark) -> str:
    from deepspark.training.rendezvous import local_ip

    host = spark.conf.get("spark.driver.host", None)
    return host or local_ip()


def _payload(results, kind: ResultKind) -> bytes:
    rows = [
        (seq, bytes(payload))
        for row_kind, seq, payload in zip(
            results.column("kind").to_pylist(),
            results.column("seq").to_pylist(),
            results.column("payload").to_pylist(),
            strict=True,
        )
        if row_kind == kind.value
    ]
    if not rows:
        raise RuntimeError(f"the job sent no {kind.value} back")
    return b"".join(payload for _, payload in sorted(rows))


_BARRIER_TASK = re.compile(r"barrier task ResultTask\(\d+, (\d+)\)")
_WORKER_CRASH = re.compile(r"(Python worker exited unexpectedly[^\n.]*)")


def _failure_summary(error: Exception, errors: list[dict[str, Any]]) -> str:
    """Which rank failed first and why, then every rank's reported error with its log tail."""
    text = str(error)
    parts = []
    first = _BARRIER_TASK.search(text)
    crash = _WORKER_CRASH.search(text)
    reported = {int(event.get("rank", -1)) for event in errors}
    if first is not None:
        rank = int(first.group(1))
        if crash is not None and rank not in reported:
            parts.append(f"rank {rank} failed first: {crash.group(1).strip()}")
        else:
            parts.append(f"rank {rank} failed first")
    elif crash is not None:
        parts.append(crash.group(1).strip())
    for event in errors:
        tail = "\n".join(str(event.get("traceback", "")).strip().splitlines()[-6:])
        parts.append(f"rank {event.get('rank')}: {event.get('error')}\n{tail}")
    if not parts:
        lines = [line for line in text.strip().splitlines() if "Error" in line]
        parts.append((lines[-1] if lines else text.strip()[-500:] or repr(error))[:2000])
    return "\n".join(parts)
