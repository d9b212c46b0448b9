"""`Estimator`: train, evaluate, predict, save and load a PyTorch model on Spark DataFrames.

Driver side. A facade over the engine (`deepspark.training.engine`): `fit` and `evaluate` turn
their keyword arguments into the engine's options, hand the estimator's model to it as a
`TorchBackend`, and keep what comes back (weights, optimizer state, history, timings).

`from_torch` and `fit` run past 80 lines for their docstrings alone: they are the reference of
the arguments users pass; their code is short.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from deepspark.deprecation import keyword_only_after
from deepspark.training import engine
from deepspark.training.backend import Backend
from deepspark.training.driver.checks import check_model, optimizer_factory
from deepspark.training.driver.jobs import TrainingError
from deepspark.training.driver.model_io import ModelIO
from deepspark.training.driver.torch_job import TorchBackend
from deepspark.training.options import EvaluateOptions, FitOptions, StepOptions, check_loss
from deepspark.training.rank.metric_routing import metric_definitions

if TYPE_CHECKING:
    from deepspark.training.driver.inputs import InputData
    from deepspark.training.driver.prediction_input import Predictions

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

    # size: long for its docstring, the reference of every argument; the body alone
    # is under 80 lines.
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
        from deepspark.training.model_families import model_family

        # deepspark.keras builds it (a KerasEstimator, a subclass of this class)
        return model_family("keras").build(
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

    # --- fit ----------------------------------------------------------------------------------

    def fit(
        self,
        df: InputData,
        feature_cols: ColumnsArg | None = None,
        label_cols: ColumnsArg | None = None,
        *,
        validation_data: InputData | None = None,
        callbacks: Sequence[Any] | None = None,
        options: FitOptions | None = None,
        **keywords: Any,
    ) -> pd.DataFrame:
        """Train data-parallel on `df` inside one Spark barrier stage.

        Runs `deepspark.training.engine.fit` with the torch loop. The options are the fields
        of `deepspark.training.options.FitOptions`, given as flat keyword arguments, or
        whole as ``options=`` (keywords then change it).

        Parameters
        ----------
        df : Spark DataFrame, pandas DataFrame, pandas-on-Spark DataFrame, dict of arrays or
             data creator
            Training rows. A pandas DataFrame or a dict of numpy arrays (``{column: array}``,
            one row per example) is sent to the workers through Arrow, once; a dict value of
            shape ``(N, d1, d2, ...)`` becomes an array column of that per-row shape. A data
            creator ``(config, batch_size) -> DataLoader`` runs in every rank.
        feature_cols, label_cols : str or list
            Columns; a nested list of scalar columns stacks them into one tensor.
        validation_data : same types as `df`, optional
            Evaluated after every epoch, in the same stage, each rank on its share.
        callbacks : list of deepspark.training.callbacks.Callback, optional
        options : FitOptions, optional
        **keywords
            Any field of the option groups: `DataOptions` (``batch_size`` (the global batch
            size, split over the workers; 32), ``feature_shapes``, ``feature_dtypes``,
            ``label_dtypes``, ``decoders``, ``step_policy``, ``stream_first_epoch``,
            ``allow_non_finite`` (train on NaN / inf instead of refusing them)),
            `LoopOptions` (``epochs`` (1), ``seed``, ``max_steps``, ``steps_per_epoch``,
            ``validate_every_steps``, ``checkpoint_every_steps``, ``accumulate_steps``,
            ``clip_grad_norm``, ``precision``), `RecoveryOptions` (``checkpoint_dir``,
            ``checkpoint_every``, ``resume``, ``max_failures``) and `RunOptions`
            (``num_workers``, ``collective_timeout_s``, ``progress``); each class's docstring
            says what its fields do.

        Returns
        -------
        pandas.DataFrame
            The history: one row per epoch (train loss and metrics, validation loss and
            metrics, samples/s, seconds); also kept as `history`.

        Examples
        --------
        >>> import numpy as np, torch, deepspark as ds
        >>> est = ds.Estimator.from_torch(
        ...     torch.nn.Linear(2, 1), lambda p: torch.optim.SGD(p, 0.1), torch.nn.MSELoss()
        ... )
        >>> est.fit({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "x", "y", epochs=0)
        Traceback (most recent call last):
        ...
        ValueError: epochs=0: give a positive integer
        """
        options = FitOptions.from_keywords(
            options,
            feature_cols=feature_cols,
            label_cols=label_cols,
            callbacks=callbacks,
            **keywords,
        )
        backend = self._backend(optimizer_state=self._carried_optimizer_state())
        result = engine.fit(backend, df, options, validation_data=validation_data)
        backend.load_weights(result.weights)
        if result.optimizer_state is not None:  # for the next fit to continue
            self._optimizer_state = result.optimizer_state
        self._feature_cols = options.data.feature_cols
        self.history, self.step_history = result.history, result.step_history
        self.attempts_ = result.attempts
        self.first_step_s_ = result.first_step_s
        self.job_ports_ = result.ports
        self.timings_ = result.timings()
        _log.debug("fit timeline: %s", ", ".join(f"{k}={v:.3f}s" for k, v in self.timings_.items()))
        return self.history

    # --- evaluate / predict -----------------------------------------------------------------

    def evaluate(
        self,
        df: InputData,
        feature_cols: ColumnsArg | None = None,
        label_cols: ColumnsArg | None = None,
        *,
        options: EvaluateOptions | None = None,
        **keywords: Any,
    ) -> dict[str, float]:
        """Loss and metrics of the current model on `df`, computed distributed.

        `df` takes the same types as in `fit`. The options are those of
        `deepspark.training.options.EvaluateOptions`: `DataOptions`'s fields (``batch_size``
        256 by default) and `RunOptions`'s (``num_workers``, ``collective_timeout_s``).

        Returns
        -------
        dict
            ``{"loss": ..., "<metric>": ...}``, exact over every row.
        """
        options = EvaluateOptions.from_keywords(
            options, feature_cols=feature_cols, label_cols=label_cols, **keywords
        )
        return engine.evaluate(self._backend(), df, options)

    # Before 0.2 batch_size and output_col followed feature_cols by position, in the reverse of
    # deepspark.predict's order; old positional calls keep their meaning, with a warning.
    @keyword_only_after(3, ("batch_size", "output_col"))
    def predict(
        self,
        df: InputData,
        feature_cols: ColumnsArg | None = None,
        *,
        output_col: str = "prediction",
        batch_size: int = 1024,
        num_workers: int | None = None,
        **options: Any,
    ) -> Predictions:
        """Add the model's output to `df` as `output_col` (see `deepspark.predict`).

        The arguments after `feature_cols` are keyword-only and mean what they mean in
        `deepspark.predict`: ``num_workers`` is how many Spark tasks at most run the model
        (for a data creator: how many tasks run it, default every task slot); the other
        keywords (``output``, ``passthrough_cols``, ``feature_shapes``, ...) go to it as well.

        The result has `df`'s type: a Spark DataFrame; for a pandas DataFrame, a pandas
        DataFrame with its rows, order and index and the prediction column(s) added; for a
        dict of numpy arrays, a numpy array of predictions (a dict of arrays when predict adds
        several columns); for a pandas-on-Spark DataFrame, a pandas-on-Spark DataFrame.
        """
        from deepspark.inference import predict
        from deepspark.training.driver.fit_data import is_creator, predict_creator
        from deepspark.training.driver.prediction_input import prediction_input

        if is_creator(df):
            return predict_creator(
                self,
                df,
                batch_size=batch_size,
                num_workers=num_workers,
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
            num_workers=num_workers,
            **source.options,
        )
        return source.restore(result)

    # --- internals --------------------------------------------------------------------------

    def _backend(self, optimizer_state: bytes | None = None) -> Backend:
        """This estimator's model and training parts, as the engine's torch loop runs them."""
        return TorchBackend(
            model=self._model,
            loss=self.loss,
            optimizer_factory=self._optimizer_factory,
            scheduler=self.scheduler,
            metrics=self.metrics,
            steps=self.steps,
            config=self.config,
            use_gpu=self.use_gpu,
            optimizer_state=optimizer_state,
        )
