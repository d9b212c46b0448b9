"""The trials of one `AutoEstimator.fit` call, as Optuna's worker threads run them.

Driver side. `TrialRuns` is the objective Optuna calls in each of its threads: it draws the
trial's config, builds its estimator, fits it (the trial's barrier job, in a scheduler pool of
its own), scores it and saves its model; and it is the judge the report server asks, after
every epoch of every trial, whether that trial should stop (the trial's pruner decides).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deepspark.automl.reports import ReportServer, TrialReporter
from deepspark.automl.rounds import Rounds
from deepspark.automl.scheduling import trial_scope
from deepspark.automl.space import config_for_storage
from deepspark.automl.study import SearchSettings

if TYPE_CHECKING:
    from deepspark.training import Estimator

__all__ = ["TrialRuns", "record_failure"]

_log = logging.getLogger(__name__)


@dataclass
class TrialRuns:
    """What every trial of one search shares, and the trials running now.

    Attributes
    ----------
    settings : SearchSettings
    build : callable
        ``config -> Estimator``: the trial's estimator.
    data_of : callable
        ``config -> (data, validation_data)``.
    fixed : dict
        ``Estimator.fit``'s arguments that every trial shares (a config's ``epochs`` and
        ``batch_size`` override theirs).
    spark : SparkSession
    num_workers : int
        Ranks of each trial's fit.
    score : {"last", "best"}
        A trial's value: the metric at its last epoch, or at its best.
    seed : int, optional
        Trial n fits with ``seed + n``.
    rounds : Rounds, optional
        With a seed and several trials at once: the rounds they draw their configs in.
    server : ReportServer, optional
        Set once the report server runs: where the trials' rank 0 report each epoch.
    """

    settings: SearchSettings
    build: Callable[[dict[str, Any]], Estimator]
    data_of: Callable[[dict[str, Any]], tuple[Any, Any]]
    fixed: dict[str, Any]
    spark: Any
    num_workers: int
    score: str
    seed: int | None = None
    rounds: Rounds | None = None
    server: ReportServer | None = None
    running: dict[int, Any] = field(default_factory=dict)
    pruned: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def judge(self, number: int, epoch: int, value: float) -> bool:
        """Report trial `number`'s `value` after `epoch` to Optuna; whether to stop it."""
        with self.lock:
            trial = self.running.get(number)
        if trial is None:
            return False
        trial.report(value, epoch)
        if trial.should_prune():
            with self.lock:
                self.pruned.add(number)
            return True
        return False

    def objective(self, trial: Any) -> float:
        """Optuna's objective: one trial, from its config to its saved model."""
        import optuna

        rounds = self.rounds
        try:
            if rounds is not None:
                rounds.before_draw(trial.number)
            with self.lock:  # one trial's draws at a time: a seed gives the same configs
                config = self.settings.space.sample(trial)
                # Built here, not while other trials fit: a model creator that seeds
                # torch's global generator would otherwise race their seeding.
                estimator = self._estimator_for(config, trial)
            if rounds is not None:
                rounds.after_draw(trial.number)
            trial.set_user_attr("config", config_for_storage(config))
            with self.lock:
                self.running[trial.number] = trial
            value = self._run_trial(trial, estimator)
        finally:
            with self.lock:
                self.running.pop(trial.number, None)
        if trial.number in self.pruned:
            raise optuna.TrialPruned(f"pruned at {self.settings.metric}={value:.6g}")
        return value

    def _estimator_for(self, config: dict[str, Any], trial: Any) -> Estimator:
        try:
            return self.build(config)
        except Exception as error:
            record_failure(trial, error)
            raise

    def _run_trial(self, trial: Any, estimator: Estimator) -> float:
        settings, metric = self.settings, self.settings.metric
        assert self.server is not None
        started = time.perf_counter()
        config = estimator.config
        options = dict(self.fixed)
        options["epochs"] = int(config.get("epochs", options["epochs"]))
        options["batch_size"] = int(config.get("batch_size", options["batch_size"]))
        reporter = TrialReporter(self.server.address, self.server.token, trial.number, metric)
        options["callbacks"] = [*options["callbacks"], reporter]
        options.setdefault("progress", False)
        if self.seed is not None:
            options.setdefault("seed", self.seed + trial.number)
        try:
            data, options["validation_data"] = self.data_of(config)
            with trial_scope(self.spark, trial.number):
                history = estimator.fit(data, num_workers=self.num_workers, **options)
        except Exception as error:
            record_failure(trial, error)
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
        if metric not in history.columns:
            raise KeyError(
                f"AutoEstimator(metric={metric!r}) is not in the fit's history "
                f"(columns {list(history.columns)})"
            )
        values = history[metric].reset_index(drop=True)
        if self.score == "best":
            epoch = int(values.idxmin() if settings.direction == "minimize" else values.idxmax())
        else:
            epoch = len(values) - 1
        value = float(values.iloc[epoch])
        trial.set_user_attr("epochs_trained", len(history))
        trial.set_user_attr("best_epoch", epoch)
        if not math.isfinite(value):
            raise ValueError(f"trial {trial.number}: {metric} is {value}")
        path = settings.directory / "trials" / f"trial-{trial.number:05d}"
        estimator.save(str(path))
        trial.set_user_attr("model_path", str(path))
        return value


def record_failure(trial: Any, error: Exception) -> None:
    """Keep a failed trial's error in the study (its ``error`` attribute) and log it."""
    trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
    _log.warning("automl: trial %d failed: %s: %s", trial.number, type(error).__name__, error)
