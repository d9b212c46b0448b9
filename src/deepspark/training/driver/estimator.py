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
    optimizer_factory,
    pickled,
)
from deepspark.training.driver.jobs import JobResult, TrainingError, run_job
from deepspark.training.driver.model_io import ModelIO
from deepspark.training.driver.options import (
    ColumnOptions,
    LoopOptions,
    RecoveryOptions,
    StepOptions,
)
from deepspark.training.driver.timeline import fit_timeline
from deepspark.training.job_spec import (
    JobKind,
    ResultKind,
    TrainSpec,
)
from deepspark.training.rank.metric_routing import metric_definitions

if TYPE_CHECKING:
    from deepspark.training.driver.inputs import InputData, Predictions

__all__ = ["Estimator", "TrainingError"]

_log = logging.getLogger(__name__)

ColumnsArg = str | Sequence[str | Sequence[str]] | dict[str, str | Sequence[str]]


class Estimator(ModelIO):
    """A PyTorch model with the means to train it data-parallel inside Spark.

    Build one with `Estimator.from_torch`, or `Estimator.load` a saved one. Its weights and
    optimizer state, exports, `save` and `load` are `model_io.ModelIO`'s.

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
        steps: StepOptions | None = None,
    ):
        self.config = dict(config or {})
        self._model = check_model(model, self.config)
        if loss is not None:
            check_loss(loss)
        self._optimizer_factory = optimizer_factory(optimizer)
        self.loss = loss
        self.metrics = metric_definitions(metrics)
        self.scheduler = scheduler
        self.use_gpu = use_gpu
        self.steps = steps or StepOptions()
        self.steps.check()
        self.step_history: pd.DataFrame = pd.DataFrame()
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
        *,
        train_step: Callable[..., dict[str, Any]] | None = None,
        eval_step: Callable[..., dict[str, Any]] | None = None,
        collate_fn: Callable[[Any, Any], tuple[Any, Any]] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str | None = None,
    ) -> Estimator:
        """Wrap a PyTorch model for distributed training on Spark.

        Parameters
        ----------
        model : nn.Module or callable
            The network, or a function ``config -> nn.Module``.
        optimizer : callable or torch.optim.Optimizer, optional
            A function ``params -> Optimizer``; an optimizer built on the driver's model is also
            accepted and rebuilt for each replica with the same class and hyperparameters. A
            function whose one parameter is named ``model`` gets the module and may return a
            list of optimizers (one per part of the model: a GAN's generator and critic).
            Without one (and without ``loss``) the estimator is for inference: `predict` and
            `evaluate` (metrics only) work, `fit` refuses.
        loss : nn.Module or callable, optional
            ``loss(outputs, labels) -> scalar tensor``, mean-reduced over the rows. The model's
            outputs may be a tensor, or a dict, tuple or list of tensors; the labels are one
            tensor, or a tuple of them for several label columns.
        metrics : list or dict, optional
            Names (``"accuracy"``, ``"top5_accuracy"``, ``"precision"``, ``"recall"``,
            ``"f1"``, ``"auc"``, ``"mse"``, ``"mae"``, ``"rmse"``, ``"r2"``; torchmetrics
            computes them), ``torchmetrics.Metric`` objects or functions
            ``fn(outputs, labels)``; reduced exactly across ranks. For a model with several
            outputs, a dict names the output each reads: ``{"accuracy": "logits"}``, a
            position of a tuple output, or ``(output, label)``.
        scheduler : callable, optional
            ``optimizer -> LRScheduler`` (given the list when there are several optimizers; it
            may return a list), stepped once per epoch, or per optimizer step with
            ``scheduler_interval="step"``. ``ReduceLROnPlateau`` is stepped after each epoch
            with the value named by ``scheduler_monitor`` (default ``val_loss``, or
            ``train_loss`` without validation data).
        config : dict, optional
            Passed to a model function.
        use_gpu : bool
            Train with CUDA and NCCL on the GPUs Spark assigns to each task.
        train_step : callable, optional
            ``train_step(model, batch, optimizers, loss) -> {"loss": ..., ...}`` replaces the
            built-in step (GANs, multi-task, contrastive losses). ``batch`` is ``(features,
            labels)`` of this rank's real rows; ``model`` is the plain module; ``optimizers``
            (one, or a list) average the gradients over the ranks when stepped. The returned
            values are row means; each becomes ``train_<name>`` in the history. Its fits use
            ``step_policy="wrap"`` (every rank has rows at every step).
        eval_step : callable, optional
            ``eval_step(model, batch, loss) -> {"loss": ..., ...}`` for validation and
            `evaluate`; an ``"outputs"`` entry feeds the metrics.
        collate_fn : callable, optional
            ``collate_fn(features, labels) -> (features, labels)`` on each batch inside the
            rank, on its device (padding, masks, augmentation), in `fit` and `evaluate`.
        scheduler_interval : {"epoch", "step"}
        scheduler_monitor : str, optional
            The history value ``ReduceLROnPlateau`` reads, e.g. ``"val_accuracy"``.

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
        if optimizer is not None and loss is None and train_step is None:
            raise ValueError(
                "from_torch got optimizer= but no loss=: pass loss=, e.g. "
                "torch.nn.CrossEntropyLoss(), to train (or a train_step=); without optimizer= "
                "and loss= the estimator is for inference only"
            )
        return cls(
            model=model,
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            scheduler=scheduler,
            config=config,
            use_gpu=use_gpu,
            steps=StepOptions(
                train_step, eval_step, collate_fn, scheduler_interval, scheduler_monitor
            ),
        )

    @classmethod
    def from_keras(
        cls,
        model: Any,
        optimizer: Any = "adam",
        loss: Any = None,
        metrics: Sequence[Any] | dict[str, Any] | None = None,
        *,
        backend: str | None = None,
        loss_weights: Sequence[float] | dict[str, float] | None = None,
        scheduler: Callable[[Any], Any] | None = None,
        config: dict[str, Any] | None = None,
        use_gpu: bool = False,
    ) -> Estimator:
        """Wrap a Keras 3 model for distributed training on Spark, with Keras's compile words.

        Parameters
        ----------
        model : keras.Model or callable
            A built Keras 3 model, or a function ``config -> keras.Model``.
        optimizer : str or keras.optimizers.Optimizer
            ``"adam"``, ``"sgd"``, ``"rmsprop"``, ``"adamw"``, ... (Keras's defaults) or a
            Keras optimizer object; Keras's update rule, schedules and options apply.
        loss : str, keras.losses.Loss, callable, dict or list, optional
            As in ``model.compile``: ``loss(y_true, y_pred)``; a dict by output name or a list
            in output order for a model with several outputs. Without it the estimator is for
            inference (``predict``, ``evaluate`` with metrics).
        metrics : list or dict, optional
            Keras names (``"accuracy"``, ``"mse"``, ``"mae"``, ``"auc"``, ...), computed exactly
            over every rank; a dict by output name for a model with several outputs.
        backend : {"torch", "tensorflow"}, optional
            Default: the imported Keras's backend, else ``KERAS_BACKEND``. The Spark workers
            import Keras with this backend.
        loss_weights : list or dict, optional
            Per output, as in ``model.compile``.
        scheduler : callable, optional
            Torch backend: ``optimizer -> torch LR scheduler``, as in `from_torch`.
        config : dict, optional
            Passed to a model creator.
        use_gpu : bool

        Returns
        -------
        deepspark.keras.KerasEstimator

        Examples
        --------
        >>> import os; os.environ.setdefault("KERAS_BACKEND", "torch")  # doctest: +SKIP
        >>> import keras, deepspark as ds  # doctest: +SKIP
        >>> net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])  # doctest: +SKIP
        >>> est = ds.Estimator.from_keras(net, "adam", "mse", backend="torch")  # doctest: +SKIP
        """
        # The one upward import of the engine: deepspark.keras builds on this class
        # (tests/test_package_layout.py names it).
        from deepspark.keras.keras_estimator import build_keras_estimator

        return build_keras_estimator(
            model,
            optimizer,
            loss,
            metrics,
            backend=backend,
            loss_weights=loss_weights,
            scheduler=scheduler,
            config=config,
            use_gpu=use_gpu,
        )

    # --- fit --------------------------------------------------------------------------------

    def fit(
        self,
        df: InputData,
        feature_cols: ColumnsArg | None = None,
        label_cols: ColumnsArg | None = None,
        epochs: int = 1,
        batch_size: int = 32,
        validation_data: InputData | None = None,
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
        step_policy: str | None = None,
        collective_timeout_s: float = 600.0,
        progress: bool = True,
        stream_first_epoch: bool = True,
        max_steps: int | None = None,
        steps_per_epoch: int | None = None,
        validate_every_steps: int | None = None,
        checkpoint_every_steps: int | None = None,
        accumulate_steps: int = 1,
        clip_grad_norm: float | None = None,
        precision: str = "fp32",
        allow_non_finite: bool = False,
    ) -> pd.DataFrame:
        """Train data-parallel on `df` inside one Spark barrier stage.

        Parameters
        ----------
        df : Spark DataFrame, pandas DataFrame, pandas-on-Spark DataFrame or dict of arrays
            Training rows. A pandas DataFrame or a dict of numpy arrays (``{column: array}``,
            one row per example) is sent to the workers through Arrow, once; a dict value of
            shape ``(N, d1, d2, ...)`` becomes an array column of that per-row shape.
        feature_cols, label_cols : str or list
            Columns; a nested list of scalar columns stacks them into one tensor.
        epochs : int
        batch_size : int
            The global batch size, split over the workers.
        validation_data : same types as `df`, optional
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
        allow_non_finite : bool
            Train on NaN and infinite feature and label values as they are. By default they
            are refused: the driver checks the first rows before any job, and each rank counts
            its whole partition (training and validation rows) and fails naming each column
            and its count.
        step_policy : {"pad", "drop", "wrap"}, optional
            How ranks with fewer rows keep in step (see docs/data.md); default ``"pad"``, or
            ``"wrap"`` with a custom ``train_step``.
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
        max_steps : int, optional
            Stop after this many optimizer-batch steps over the whole fit (mid-epoch if need
            be); ``epochs`` stays an upper bound.
        steps_per_epoch : int, optional
            End each epoch after at most this many steps (the rest of the partition waits for
            a later epoch's new order).
        validate_every_steps : int, optional
            Also validate every N steps (needs ``validation_data``); the results are in
            `step_history`.
        checkpoint_every_steps : int, optional
            Also checkpoint every N steps; a resumed fit continues mid-epoch with the data in
            the order it would have had (the first epoch is then spilled before it starts).
        accumulate_steps : int
            Apply the gradients of this many batches at once (the loss is their mean).
        clip_grad_norm : float, optional
            Clip the gradients' total norm before each optimizer step.
        precision : {"fp32", "bf16", "fp16"}
            ``"bf16"`` runs forward and loss under autocast (CPU or GPU); ``"fp16"`` also
            scales the gradients (GPU only).

        Returns
        -------
        pandas.DataFrame
            The history: one row per epoch (train loss and metrics, validation loss and
            metrics, samples/s, seconds); also kept as `history`.
        """
        from deepspark.training.driver.fit_data import job_data

        started = time.perf_counter()
        started_wall = time.time()
        check_positive("epochs", epochs)
        check_positive("batch_size", batch_size)
        self.steps.check_trainable(self.loss, self._optimizer_factory)
        optimizer_state = self._carried_optimizer_state()  # the last fit's, if it fits
        step_policy = self.steps.policy(step_policy)
        loop = LoopOptions(
            max_steps,
            steps_per_epoch,
            validate_every_steps,
            checkpoint_every_steps,
            accumulate_steps,
            clip_grad_norm,
            precision,
        )
        job = job_data(
            self,
            df,
            validation_data,
            feature_cols,
            label_cols,
            ColumnOptions(
                feature_shapes, feature_dtypes, label_dtypes, decoders, bool(allow_non_finite)
            ),
            num_workers=num_workers,
            batch_size=batch_size,
            training=True,
        )
        spark, num_workers = job.spark, job.num_workers
        recovery = RecoveryOptions(checkpoint_dir, checkpoint_every, resume, max_failures)
        recovery.prepare(spark)
        loop.check(
            has_validation=job.has_validation,
            has_checkpoints=recovery.checkpoint_dir is not None,
            use_gpu=self.use_gpu,
        )
        if seed is not None:
            torch.manual_seed(seed)
        spec = self._spec(
            JobKind.FIT,
            job.features,
            job.labels,
            num_workers,
            epochs=epochs,
            batch_size=batch_size,
            step_policy=step_policy,
            seed=0 if seed is None else seed,
            has_validation=job.has_validation,
            checkpoint_dir=recovery.checkpoint_dir,
            checkpoint_every=recovery.checkpoint_every,
            resume=recovery.resume,
            collective_timeout_s=collective_timeout_s,
            optimizer_state_blob=optimizer_state,
            allow_non_finite=bool(allow_non_finite),
            **{"stream_first_epoch": bool(stream_first_epoch), **loop.spec_values()},
            **job.spec_values,
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
                spark, job.frame, spec, recovery, callbacks, fit_params, started, progress
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
        if result.has(ResultKind.OPTIMIZER):  # for the next fit to continue
            self._optimizer_state = result.payload(ResultKind.OPTIMIZER)
        self.attempts_ = result.attempts
        self.first_step_s_ = result.first_step_s
        self.job_ports_ = result.ports
        history = json.loads(result.payload(ResultKind.HISTORY))
        if result.has(ResultKind.STEP_HISTORY):
            self.step_history = pd.DataFrame(json.loads(result.payload(ResultKind.STEP_HISTORY)))
        else:
            self.step_history = pd.DataFrame()
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
        df: InputData,
        feature_cols: ColumnsArg | None = None,
        label_cols: ColumnsArg | None = None,
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

        `df` takes the same types as in `fit`: a Spark, pandas or pandas-on-Spark DataFrame,
        or a dict of numpy arrays.

        Returns
        -------
        dict
            ``{"loss": ..., "<metric>": ...}``, exact over every row.
        """
        from deepspark.training.driver.fit_data import job_data

        check_positive("batch_size", batch_size)
        job = job_data(
            self,
            df,
            None,
            feature_cols,
            label_cols,
            ColumnOptions(feature_shapes, feature_dtypes, label_dtypes, decoders),
            num_workers=num_workers,
            batch_size=batch_size,
            training=False,
        )
        spark, data, num_workers = job.spark, job.frame, job.num_workers
        spec = self._spec(
            JobKind.EVALUATE,
            job.features,
            job.labels,
            num_workers,
            epochs=0,
            batch_size=max(batch_size, num_workers),
            collective_timeout_s=collective_timeout_s,
            **job.spec_values,
        )
        result = run_job(spark, data, spec, progress=False)
        return json.loads(result.payload(ResultKind.METRICS))

    def predict(
        self,
        df: InputData,
        feature_cols: ColumnsArg | None = None,
        batch_size: int = 1024,
        output_col: str = "prediction",
        **options: Any,
    ) -> Predictions:
        """Add the model's output to `df` as `output_col` (see `deepspark.predict`).

        The result has `df`'s type: a Spark DataFrame; for a pandas DataFrame, a pandas
        DataFrame with its rows, order and index and the prediction column(s) added; for a
        dict of numpy arrays, a numpy array of predictions (a dict of arrays when predict adds
        several columns); for a pandas-on-Spark DataFrame, a pandas-on-Spark DataFrame.
        """
        from deepspark.inference import predict
        from deepspark.training.driver.fit_data import is_creator, predict_creator
        from deepspark.training.driver.inputs import prediction_input

        if is_creator(df):
            return predict_creator(
                self,
                df,
                batch_size=batch_size,
                num_workers=options.pop("num_workers", None),
                feature_cols=feature_cols,
            )
        cols = feature_cols if feature_cols is not None else self._feature_cols
        if cols is None:
            raise ValueError("predict needs feature_cols= (fit was not called on this estimator)")
        source = prediction_input(df, cols, output_col=output_col, options=options)
        result = predict(
            source.frame,
            self._model,
            feature_cols=cols,
            output_col=output_col,
            batch_size=batch_size,
            **source.options,
        )
        return source.restore(result)

    # --- internals --------------------------------------------------------------------------

    def _spec(self, kind, features, labels, world_size, **values) -> TrainSpec:
        factory = self._optimizer_factory
        return TrainSpec(
            kind=kind,
            model_blob=pickled("model", self._model),
            loss_blob=None if self.loss is None else pickled("loss", self.loss),
            optimizer_blob=None if factory is None else pickled("optimizer", factory),
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
            **self.steps.spec_values(),
            **values,
        )
