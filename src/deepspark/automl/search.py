"""`AutoEstimator`: an Optuna study whose every trial is a deepspark distributed fit.

Driver side. Trials run in Optuna's own worker threads (``study.optimize(n_jobs=...)``); each
submits its barrier job from its thread, in a Spark scheduler pool of its own, so as many trials
train at once as the application has free slots for. Rank 0 of each trial reports the chosen
metric after every epoch through `deepspark.automl.reports`; the driver feeds it to the trial's
pruner and answers whether to stop.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepspark.automl.reports import ReportServer
from deepspark.automl.rounds import RoundPruner, Rounds
from deepspark.automl.space import SearchSpace, grid_of, optimizer_for_config
from deepspark.automl.study import (
    SearchSettings,
    default_direction,
    open_study,
    raise_if_all_failed,
    trials_still_to_run,
)
from deepspark.automl.trial_runs import TrialRuns
from deepspark.context.topology import driver_address
from deepspark.deprecation import RENAMED_SEARCH_OPTIONS, renamed_attribute, renamed_keywords

if TYPE_CHECKING:
    import pandas as pd

    from deepspark.training import Estimator

__all__ = ["AutoEstimator"]

_log = logging.getLogger(__name__)
_FRAMEWORKS = ("torch", "keras")


class AutoEstimator:
    """Hyperparameter search over an Optuna study; each trial a distributed `Estimator.fit`.

    Build it with :meth:`from_torch` or :meth:`from_keras`; the arguments mirror
    ``Estimator.from_torch`` / ``from_keras``, with a config-taking model creator.

    Parameters
    ----------
    model : callable
        ``config -> model`` (``nn.Module`` or ``keras.Model``).
    search_space : dict or callable
        ``{name: optuna distribution | list of choices | fixed value}`` or ``trial -> config``.
        Config keys ``epochs`` and ``batch_size`` override `fit`'s arguments per trial.
    optimizer : callable or str
        Torch: ``(params, config) -> Optimizer`` (or ``params -> Optimizer``). Keras: an
        optimizer name or ``config -> keras optimizer``.
    loss, metrics :
        As in ``Estimator.from_torch`` / ``from_keras``.
    metric : str
        The epoch-log value the search optimises and prunes on: ``"val_loss"`` (default),
        ``"val_accuracy"``, ``"train_loss"``, ...
    direction : {"minimize", "maximize"}, optional
        Default: ``"minimize"`` for losses and errors (``loss``, ``mse``, ``mae``, ``rmse``
        in the name), ``"maximize"`` otherwise.
    score : {"last", "best"}
        A trial's value: `metric` at its last epoch (default), or at its best epoch (for
        trials that keep their best epoch's weights, e.g. with
        ``EarlyStopping(restore_best_weights=True)``); the epoch is kept as the trial's
        ``best_epoch`` attribute (0-based).
    num_workers : int
        Ranks of each trial's fit (``workers_per_trial`` is its deprecated old name).
    max_concurrent : int, optional
        Trials training at once; default: the application's free task slots divided by
        `num_workers`.
    sampler : {"tpe", "random", "grid"} or optuna sampler
    pruner : {"median", "successive_halving", "hyperband", "none"} or optuna pruner
    study_name : str, optional
        Name of the study in the storage; give the same name (and storage) to resume a
        search. Default: a new name from the time.
    storage : str, optional
        An SQLAlchemy URL (``sqlite:///path.db``, ``postgresql://...``). Default: an SQLite
        file ``study.db`` in `checkpoint_dir`.
    checkpoint_dir : str, optional
        What the search resumes from: the default database and each completed trial's saved
        model. Default: ``~/.deepspark/automl/<study_name>`` (``directory`` is its deprecated
        old name).
    seed : int, optional
        Seeds the sampler and every trial's fit (trial n with ``seed + n``). With a seed,
        trials that train at once run in rounds (`deepspark.automl.rounds`): each draws its
        config, and is pruned, knowing only the earlier rounds, so the same seed gives the
        same configs, trials and scores whatever order they finish in.

    Examples
    --------
    See ``docs/automl.md``: a search on digits, its trials table, the best model and plots.
    """

    workers_per_trial = renamed_attribute("num_workers")
    directory = renamed_attribute("checkpoint_dir")

    @renamed_keywords(**RENAMED_SEARCH_OPTIONS)
    def __init__(
        self,
        model: Callable[[dict[str, Any]], Any],
        search_space: Mapping[str, Any] | Callable[[Any], dict[str, Any]],
        *,
        optimizer: Any = None,
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
        framework: str = "torch",
        metric: str = "val_loss",
        direction: str | None = None,
        score: str = "last",
        num_workers: int = 1,
        max_concurrent: int | None = None,
        sampler: Any = "tpe",
        pruner: Any = "median",
        study_name: str | None = None,
        storage: str | None = None,
        checkpoint_dir: str | None = None,
        seed: int | None = None,
        estimator_options: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.search_space = search_space
        self.optimizer = optimizer
        self.loss = loss
        self.metrics = metrics
        self.framework = framework
        self.metric = metric
        self.direction = direction
        self.score = score
        self.num_workers = num_workers
        self.max_concurrent = max_concurrent
        self.sampler = sampler
        self.pruner = pruner
        self.study_name = study_name
        self.storage = storage
        self.checkpoint_dir = checkpoint_dir
        self.seed = seed
        self.estimator_options = dict(estimator_options or {})
        self.study_: Any = None
        self.settings_: SearchSettings | None = None

    @classmethod
    @renamed_keywords(**RENAMED_SEARCH_OPTIONS)
    def from_torch(
        cls,
        model: Callable[[dict[str, Any]], Any],
        search_space: Mapping[str, Any] | Callable[[Any], dict[str, Any]],
        optimizer: Any = None,
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
        **options: Any,
    ) -> AutoEstimator:
        """A search over PyTorch models: ``model(config) -> nn.Module``."""
        return cls(model, search_space, optimizer=optimizer, loss=loss, metrics=metrics, **options)

    @classmethod
    @renamed_keywords(**RENAMED_SEARCH_OPTIONS)
    def from_keras(
        cls,
        model: Callable[[dict[str, Any]], Any],
        search_space: Mapping[str, Any] | Callable[[Any], dict[str, Any]],
        optimizer: Any = "adam",
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
        **options: Any,
    ) -> AutoEstimator:
        """A search over Keras 3 models: ``model(config) -> keras.Model`` (torch backend)."""
        return cls(
            model,
            search_space,
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            framework="keras",
            **options,
        )

    # ------------------------------------------------------------------------------ search

    def fit(
        self,
        data: Any,
        *,
        n_trials: int,
        feature_cols: Any = None,
        label_cols: Any = None,
        epochs: int = 1,
        batch_size: int = 32,
        validation_data: Any = None,
        timeout_s: float | None = None,
        callbacks: Sequence[Any] | None = None,
        data_for_config: Callable[[dict[str, Any]], tuple[Any, Any]] | None = None,
        **fit_options: Any,
    ) -> pd.DataFrame:
        """Run the search until the study holds `n_trials` finished trials.

        `data`, `validation_data` and ``**fit_options`` are what ``Estimator.fit`` takes
        (Spark or pandas DataFrames, dicts of arrays, data creators). A resumed study (same
        `study_name` and `storage`) counts the trials it already finished; a trial that was
        running when its driver died is marked failed and its config tried again.

        Parameters
        ----------
        n_trials : int
            Finished trials (complete, pruned or failed) the study should hold in the end.
        timeout_s : float, optional
            Start no new trial after this many seconds.
        data_for_config : callable, optional
            ``config -> (data, validation_data)`` for searches whose data depends on the
            config (a time series' lookback, an image size); then pass ``data=None``. Keep
            what it builds (cached DataFrames, say) for configs that share it.

        Returns
        -------
        pandas.DataFrame
            :attr:`trials`.
        """
        settings = self._settings(n_trials)
        if (data is None) == (data_for_config is None):
            raise ValueError(
                "AutoEstimator.fit: give the training data, or data_for_config (a function "
                "config -> (data, validation_data)), not both or neither"
            )
        spark, concurrent = self._spark_and_concurrency(data)
        study = open_study(settings, self.sampler, self.pruner, grid=self._grid)
        self.study_ = study
        remaining = trials_still_to_run(study, n_trials)
        first_new = len(study.get_trials(deepcopy=False))
        if remaining == 0:
            _log.info(
                "automl: study %r already holds %d finished trials", study.study_name, n_trials
            )
            return self.trials
        runs = TrialRuns(
            settings=settings,
            build=self._build_estimator,
            data_of=(lambda config: (data, validation_data))
            if data_for_config is None
            else data_for_config,
            fixed=dict(
                feature_cols=feature_cols,
                label_cols=label_cols,
                epochs=epochs,
                batch_size=batch_size,
                callbacks=list(callbacks or []),
                **fit_options,
            ),
            spark=spark,
            num_workers=self.num_workers,
            score=self.score,
            seed=self.seed,
        )
        # Seeded and concurrent: trials in rounds, so what each sees does not hang on timing.
        if self.seed is not None and concurrent > 1:
            runs.rounds = Rounds(first_new, concurrent, remaining, timeout_s)
            study.pruner = RoundPruner(study.pruner, runs.rounds)
        self._optimize(study, runs, remaining, concurrent, timeout_s)
        raise_if_all_failed(study, started_before=first_new)
        return self.trials

    def _spark_and_concurrency(self, data: Any) -> tuple[Any, int]:
        """The running session, and how many trials train at once: refused when the
        application has fewer free task slots than one trial's workers."""
        from deepspark.context.session import current_session
        from deepspark.context.topology import free_task_slots

        spark = current_session()
        if spark is None and not hasattr(data, "sparkSession"):
            raise RuntimeError(
                "AutoEstimator.fit needs a running Spark session: call deepspark.init_context() "
                "first"
            )
        spark = spark or data.sparkSession
        slots, held = free_task_slots(spark)
        if self.num_workers > slots:
            holding = "".join(f"; {holder} holds {count}" for holder, count in held.items())
            raise ValueError(
                f"AutoEstimator(num_workers={self.num_workers}): the application "
                f"has {slots} free task slot(s){holding}; use at most {slots} workers per "
                "trial, or free or add slots"
            )
        return spark, self.max_concurrent or max(1, slots // self.num_workers)

    def _optimize(
        self, study: Any, runs: TrialRuns, trials: int, concurrent: int, timeout_s: float | None
    ) -> None:
        """Run `trials` trials, `concurrent` at once, with the report server open."""
        import optuna

        rounds = runs.rounds
        driver = driver_address(runs.spark)
        with ReportServer(runs.judge, host=driver.bind, advertise_host=driver.advertise) as server:
            runs.server = server
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(
                    runs.objective,
                    n_trials=trials,
                    n_jobs=concurrent,
                    timeout=timeout_s,
                    catch=(Exception,),
                    gc_after_trial=False,
                    # once Optuna has stored the trial's state, the next round may draw
                    callbacks=[] if rounds is None else [lambda _, t: rounds.finished(t.number)],
                )

    def _build_estimator(self, config: dict[str, Any]) -> Estimator:
        from deepspark.training import Estimator

        if self.framework == "keras":
            optimizer = self.optimizer(config) if callable(self.optimizer) else self.optimizer
            return Estimator.from_keras(
                self.model,
                optimizer=optimizer,
                loss=self.loss,
                metrics=self.metrics,
                config=config,
                **self.estimator_options,
            )
        return Estimator.from_torch(
            self.model,
            optimizer=optimizer_for_config(self.optimizer, config),
            loss=self.loss,
            metrics=self.metrics,
            config=config,
            **self.estimator_options,
        )

    def _grid(self) -> dict[str, list[Any]]:
        assert self.settings_ is not None
        return grid_of(self.settings_.space)

    def _settings(self, n_trials: int) -> SearchSettings:
        if self.framework not in _FRAMEWORKS:
            raise ValueError(
                f"AutoEstimator(framework={self.framework!r}): use one of {_FRAMEWORKS}"
            )
        if not callable(self.model) or hasattr(self.model, "parameters"):
            raise TypeError(
                "AutoEstimator(model=...) takes a function config -> model, so that each trial "
                f"builds its own; got {type(self.model).__name__}"
            )
        if self.loss is None or self.optimizer is None:
            missing = "loss" if self.loss is None else "optimizer"
            raise ValueError(f"AutoEstimator({missing}=...) is required: trials train")
        if not isinstance(n_trials, int) or n_trials < 1:
            raise ValueError(f"fit(n_trials={n_trials!r}): give a positive number of trials")
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"AutoEstimator(num_workers={self.num_workers!r}): at least 1")
        if self.max_concurrent is not None and (
            not isinstance(self.max_concurrent, int) or self.max_concurrent < 1
        ):
            raise ValueError(f"AutoEstimator(max_concurrent={self.max_concurrent!r}): at least 1")
        if self.score not in ("last", "best"):
            raise ValueError(f"AutoEstimator(score={self.score!r}): use 'last' or 'best'")
        direction = self.direction or default_direction(self.metric)
        if direction not in ("minimize", "maximize"):
            raise ValueError(
                f"AutoEstimator(direction={direction!r}): use 'minimize' or 'maximize'"
            )
        name = self.study_name or time.strftime("automl-%Y%m%d-%H%M%S")
        if self.checkpoint_dir:
            directory = Path(self.checkpoint_dir)
        else:
            directory = Path.home() / ".deepspark" / "automl" / re.sub(r"[^\w.-]", "_", name)
        directory.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{directory / 'study.db'}"
        self.settings_ = SearchSettings(
            space=SearchSpace(self.search_space),
            study_name=name,
            storage=storage,
            directory=directory,
            direction=direction,
            metric=self.metric,
            seed=self.seed,
        )
        return self.settings_

    # ----------------------------------------------------------------------------- results

    def _require_study(self) -> Any:
        if self.study_ is None:
            raise RuntimeError("the search has not run: call AutoEstimator.fit first")
        return self.study_

    @property
    def trials(self) -> pd.DataFrame:
        """One row per trial: number, state, value, seconds, epochs trained, params, error."""
        from deepspark.automl.results import trials_frame

        return trials_frame(self._require_study())

    def _best_trial(self) -> Any:
        from deepspark.automl.results import best_trial

        return best_trial(self._require_study())

    @property
    def best_config(self) -> dict[str, Any]:
        """The best complete trial's whole config: searched and fixed values, or what a
        ``trial -> config`` function returned."""
        from deepspark.automl.results import trial_config

        return trial_config(self._best_trial(), self._fixed())

    @property
    def best_epoch(self) -> int:
        """The epoch (0-based) whose metric is the best trial's value (see `score`)."""
        from deepspark.automl.results import trial_best_epoch

        return trial_best_epoch(self._best_trial())

    def top_trials(self, count: int | None) -> list[dict[str, Any]]:
        """The `count` best complete trials (None: all), best first: dicts of number, value, config,
        best_epoch and model_path (the trial's saved `Estimator`)."""
        from deepspark.automl.results import ranked_trials

        self._best_trial()  # a clear error when no trial is complete
        return ranked_trials(self._require_study(), count, self._fixed())

    def _fixed(self) -> dict[str, Any]:
        return {} if self.settings_ is None else dict(self.settings_.space.fixed)

    @property
    def best_value(self) -> float:
        return float(self._best_trial().value)

    @property
    def best_estimator(self) -> Estimator:
        """The best trial's fitted `Estimator`, loaded from where that trial saved it."""
        from deepspark.automl.results import saved_estimator

        best = self._best_trial()
        return saved_estimator(best.number, best.user_attrs.get("model_path"), self.metrics)

    def plot(self, directory: str) -> list[str]:
        """Write optimisation history, parameter importances and parallel coordinates as PNG.

        Returns the paths written (importances need two or more complete trials).
        """
        from deepspark.automl.results import write_plots

        return write_plots(self._require_study(), directory, self.metric)
