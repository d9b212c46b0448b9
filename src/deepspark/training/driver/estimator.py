"""`Estimator`: train, evaluate, predict, save and load a PyTorch model on Spark DataFrames.

Driver side. Validates everything it can before a job starts, builds a plain `TrainSpec`, runs
one barrier stage per attempt (`stage.run_barrier_stage`) and re-runs failed attempts from
the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from deepspark.training.driver.checks import (
    check_loss,
    check_model,
    check_positive,
    columns_of,
    dry_run,
    fit_workers,
    optimizer_factory,
    pickled,
    resolve_columns,
)
from deepspark.training.driver.jobs import JobResult, TrainingError, job_input, run_job
from deepspark.training.driver.options import ColumnOptions, RecoveryOptions
from deepspark.training.driver.timeline import fit_timeline
from deepspark.training.job_spec import (
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


class Estimator:
    """A PyTorch model with the means to train it data-parallel inside Spark.

    Build one with `Estimator.from_torch`.

    Attributes
    ----------
    history : pandas.DataFrame
        One row per epoch of the last `fit`; the trained weights are in `get_model()`.
    attempts_ : int
        How many attempts the last job took (1 when nothing failed). The history's
        ``attempt`` column says which attempt trained each epoch: after a resume, the epochs
        restored from a checkpoint keep the attempt that trained them.
    first_step_s_ : float
        Seconds from the `fit` call to the first training step of its successful attempt.
    timings_ : dict of str to float
        Where the last `fit`'s wall time went, in seconds, in order: ``driver_checks``,
        ``job_submit``, ``worker_start`` (Spark schedules the tasks and starts their Python
        workers), ``rendezvous`` (until every rank has met the others and the process group
        exists), ``model_setup`` (model, DDP, optimizer), ``first_step`` (the first window of
        rows and the first step), ``epochs``, ``validation``, ``weights_return``,
        ``load_weights``, and ``total``, their sum. Two more spans run alongside those, on the
        rank's input thread: ``first_batch`` (from the task's start until the first Arrow batch
        arrived) and ``input_read`` (until the whole partition had arrived and was spilled).
        The ranks' moments come from rank 0's clock: on a cluster, clock skew between machines
        shifts the spans around ``worker_start``.
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
        self._model = check_model(model, self.config)
        if loss is not None:
            check_loss(loss)
        self._optimizer_factory = optimizer_factory(optimizer)
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
            Names (``"accuracy"``, ``"top5_accuracy"``, ``"precision"``, ``"recall"``,
            ``"f1"``, ``"auc"``, ``"mse"``, ``"mae"``, ``"rmse"``, ``"r2"``; torchmetrics
            computes them), ``torchmetrics.Metric`` objects or functions
            ``fn(outputs, labels)``; reduced exactly across ranks.
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
        resume: bool = False,
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
        stream_first_epoch: bool = True,
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
            Continue the run whose checkpoints are in `checkpoint_dir`. Without it, a
            `checkpoint_dir` that already holds checkpoints is refused (a second `fit` never
            silently continues an old run); give a new directory to start afresh.
        max_failures : int
            How many times a failed job is re-run; a re-run always resumes from the latest
            checkpoint of this `fit`.
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
        stream_first_epoch : bool
            Train the first epoch while the partitions arrive (the default): the first step
            waits for one batch of rows, not the whole partition. Its rows are shuffled within
            each window of arrived rows; every later epoch shuffles the whole spilled
            partition. ``False`` spills the partition before the first step, so the first
            epoch is shuffled like the others (for data sorted by label, say).
            ``step_policy="wrap"`` always spills first.

        Returns
        -------
        pandas.DataFrame
            The history: one row per epoch (train loss and metrics, validation loss and
            metrics, samples/s, seconds); also kept as `history`.
        """
        started = time.perf_counter()
        started_wall = time.time()
        spark = df.sparkSession
        check_positive("epochs", epochs)
        check_positive("batch_size", batch_size)
        if self._optimizer_factory is None:
            raise ValueError("fit needs an optimizer: from_torch(optimizer=lambda p: ...)")
        num_workers = fit_workers(spark, num_workers, batch_size)
        columns = ColumnOptions(feature_shapes, feature_dtypes, label_dtypes, decoders)
        features, labels, sample = resolve_columns(df, feature_cols, label_cols, columns)
        if validation_data is not None:
            resolve_columns(validation_data, feature_cols, label_cols, columns)
        dry_run(
            self._model,
            self.loss,
            self._optimizer_factory,
            df,
            features,
            labels,
            sample=sample,
            metrics=self.metrics,
        )
        recovery = RecoveryOptions(checkpoint_dir, checkpoint_every, resume, max_failures)
        recovery.prepare(spark)
        data = job_input(
            df,
            columns_of(features) + columns_of(labels),
            num_workers,
            split=TRAIN_SPLIT,
            validation=validation_data,
            validation_split=VALIDATION_SPLIT,
        )
        if seed is not None:
            torch.manual_seed(seed)
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
            checkpoint_dir=recovery.checkpoint_dir,
            checkpoint_every=recovery.checkpoint_every,
            resume=recovery.resume,
            collective_timeout_s=collective_timeout_s,
            stream_first_epoch=bool(stream_first_epoch),
        )
        fit_params = {
            "epochs": epochs,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "step_policy": step_policy,
            "seed": seed,
            "checkpoint_dir": recovery.checkpoint_dir,
        }
        checks_done = time.time()
        try:
            result = self._run_fit(
                spark, data, spec, recovery, callbacks, fit_params, started, progress
            )
        finally:
            recovery.release()
        self._feature_cols = feature_cols
        history = self._take_fit_result(result, num_workers, callbacks)
        self.timings_ = fit_timeline(result.marks, started_wall, checks_done, time.time())
        _log.debug("fit timeline: %s", ", ".join(f"{k}={v:.3f}s" for k, v in self.timings_.items()))
        return history

    def _run_fit(self, spark, data, spec, recovery, callbacks, fit_params, started, progress):
        """The fit job with the callbacks' driver hooks around it."""
        from deepspark.training.callbacks import call_driver_hook

        callbacks = list(callbacks or [])
        call_driver_hook(callbacks, "on_fit_begin", fit_params)
        # pickled after on_fit_begin, so what it set (an MLflow run id) reaches every rank
        spec.callbacks_blob = pickled("callbacks", callbacks) if callbacks else None
        try:
            return run_job(
                spark,
                data,
                spec,
                max_failures=recovery.max_failures,
                progress=progress,
                started=started,
            )
        except BaseException as error:
            call_driver_hook(callbacks, "on_fit_end", [], error)
            raise

    def _take_fit_result(self, result: JobResult, num_workers: int, callbacks) -> pd.DataFrame:
        """Load the trained weights and the history; the end of a successful fit."""
        from deepspark.persist.weights import weights_from_bytes
        from deepspark.training.callbacks import call_driver_hook

        self._model.load_state_dict(weights_from_bytes(result.payload(ResultKind.WEIGHTS)))
        self.attempts_ = result.attempts
        self.first_step_s_ = result.first_step_s
        self.job_ports_ = result.ports
        history = json.loads(result.payload(ResultKind.HISTORY))
        for record in history:
            record["attempt"] = result.epoch_attempts.get(int(record["epoch"]), 1)
        self.history = pd.DataFrame(history)
        last = history[-1] if history else {}
        _log.info(
            "fit: %d epochs on %d workers; %s",
            len(history),
            num_workers,
            ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)),
        )
        call_driver_hook(list(callbacks or []), "on_fit_end", history, None)
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
        from deepspark.training.driver.stage import available_task_slots

        spark = df.sparkSession
        slots = available_task_slots(spark)
        num_workers = min(slots, num_workers or slots)
        check_positive("batch_size", batch_size)
        columns = ColumnOptions(feature_shapes, feature_dtypes, label_dtypes, decoders)
        features, labels, _ = resolve_columns(df, feature_cols, label_cols, columns)
        columns = columns_of(features) + columns_of(labels)
        data = job_input(df, columns, num_workers, split=VALIDATION_SPLIT)
        spec = self._spec(
            JobKind.EVALUATE,
            features,
            labels,
            num_workers,
            epochs=0,
            batch_size=max(batch_size, num_workers),
            collective_timeout_s=collective_timeout_s,
        )
        result = run_job(spark, data, spec, progress=False)
        return json.loads(result.payload(ResultKind.METRICS))

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

    # --- export -----------------------------------------------------------------------------

    def export_onnx(self, path: str, sample: Any, **options: Any) -> str:
        """Export the model to ONNX and check it in onnxruntime against torch on `sample`.

        See `deepspark.inference.export_onnx` for the options (input names, dynamic batch,
        tolerance). Needs the ``onnx`` extra: ``pip install deepspark[onnx]``.
        """
        from deepspark.inference import export_onnx

        return export_onnx(self._model, path, sample, **options)

    def export_torchscript(self, path: str, sample: Any, **options: Any) -> str:
        """Export the model to TorchScript and check the file against torch on `sample`."""
        from deepspark.inference import export_torchscript

        return export_torchscript(self._model, path, sample, **options)

    def export_program(self, path: str, sample: Any, **options: Any) -> str:
        """Export the model as a `torch.export` program (``.pt2``), checked against torch."""
        from deepspark.inference import export_program

        return export_program(self._model, path, sample, **options)

    # --- persistence ------------------------------------------------------------------------

    def save(self, path: str) -> str:
        """Save the model at an fsspec URL: safetensors weights, JSON metadata, pickled code.

        The architecture, loss, optimizer factory and metrics are stored with cloudpickle:
        load only directories you trust, since unpickling runs code.
        """
        from deepspark.persist.estimator_dir import save_estimator

        return save_estimator(self, path)

    @classmethod
    def load(cls, path: str) -> Estimator:
        """Load an estimator written by `save` (trusted directories only: it unpickles code)."""
        from deepspark.persist.estimator_dir import load_estimator

        return load_estimator(cls, path)

    # --- internals --------------------------------------------------------------------------

    def _spec(self, kind, features, labels, world_size, **values) -> TrainSpec:
        return TrainSpec(
            kind=kind,
            model_blob=pickled("model", self._model),
            loss_blob=pickled("loss", self.loss),
            optimizer_blob=pickled("optimizer", self._optimizer_factory),
            scheduler_blob=pickled("scheduler", self.scheduler) if self.scheduler else None,
            metrics_blob=pickled("metrics", self.metrics),
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
