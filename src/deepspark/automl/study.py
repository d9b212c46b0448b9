"""The Optuna study behind a search: created or resumed in its storage, samplers and pruners.

A study is driven by one driver at a time. When a search resumes, trials its storage still
shows as running belong to a driver that died: they are marked failed (``interrupted``) and
their configs queued again, and the trials already finished are counted, never retrained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspark.automl.space import SearchSpace

__all__ = [
    "SearchSettings",
    "default_direction",
    "open_study",
    "raise_if_all_failed",
    "trials_still_to_run",
]

_log = logging.getLogger(__name__)
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class SearchSettings:
    """What one `AutoEstimator.fit` resolved its arguments to."""

    space: SearchSpace
    study_name: str
    storage: str
    directory: Path
    direction: str
    metric: str
    seed: int | None


def open_study(
    settings: SearchSettings,
    sampler: Any,
    pruner: Any,
    grid: Callable[[], dict[str, list[Any]]],
) -> Any:
    """Create the study, or load it and requeue the trials of a driver that died."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(settings.storage)
    study = optuna.create_study(
        storage=storage,
        study_name=settings.study_name,
        direction=settings.direction,
        sampler=_sampler(sampler, settings.seed, grid),
        pruner=_pruner(pruner),
        load_if_exists=True,
    )
    if study.direction.name.lower() != settings.direction:
        raise ValueError(
            f"study {settings.study_name!r} in {settings.storage} was created to "
            f"{study.direction.name.lower()}, not {settings.direction}; give the same direction "
            "(or a new study_name)"
        )
    _requeue_interrupted(study, storage)
    return study


def trials_still_to_run(study: Any, n_trials: int) -> int:
    """Trials to start so that the study holds `n_trials` finished ones."""
    from optuna.trial import TrialState

    finished = [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        and not trial.user_attrs.get(INTERRUPTED)
    ]
    return max(0, n_trials - len(finished))


def _requeue_interrupted(study: Any, storage: Any) -> None:
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not stale:
        return
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    _log.warning(
        "automl: study %r had %d trial(s) running when its driver stopped (%s); marked failed "
        "and their configs queued again",
        study.study_name,
        len(stale),
        ", ".join(str(trial.number) for trial in stale),
    )


def _sampler(sampler: Any, seed: int | None, grid: Callable[[], dict[str, list[Any]]]) -> Any:
    import optuna

    if not isinstance(sampler, str):
        if not isinstance(sampler, optuna.samplers.BaseSampler):
            raise TypeError(
                f"AutoEstimator(sampler=...): use one of {SAMPLERS} or an optuna sampler, got "
                f"{type(sampler).__name__}"
            )
        return sampler
    if sampler == "tpe":
        return _seeded(optuna.samplers.TPESampler(seed=seed), seed)
    if sampler == "random":
        return _seeded(optuna.samplers.RandomSampler(seed=seed), seed)
    if sampler == "grid":
        return _seeded(optuna.samplers.GridSampler(grid(), seed=seed), seed)
    raise ValueError(f"AutoEstimator(sampler={sampler!r}): use one of {SAMPLERS}")


def _seeded(sampler: Any, seed: int | None) -> Any:
    """Keep a seeded sampler's stream when trials run at once. Optuna reseeds the sampler
    from the OS for every trial of ``optimize(n_jobs > 1)``, which throws the seed away; the
    search draws each trial's config under its lock, so one stream serves every thread."""
    if seed is not None:
        sampler.reseed_rng = _keep_stream
    return sampler


def _keep_stream() -> None:
    """Stands in for a seeded sampler's ``reseed_rng``."""


def _pruner(pruner: Any) -> Any:
    import optuna

    if pruner is None:
        return optuna.pruners.NopPruner()
    if not isinstance(pruner, str):
        if not isinstance(pruner, optuna.pruners.BasePruner):
            raise TypeError(
                f"AutoEstimator(pruner=...): use one of {PRUNERS} or an optuna pruner, got "
                f"{type(pruner).__name__}"
            )
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"AutoEstimator(pruner={pruner!r}): use one of {PRUNERS}")


def default_direction(metric: str) -> str:
    lowered = metric.lower()
    if any(word in lowered for word in ("loss", "mse", "mae", "rmse", "error", "mape")):
        return "minimize"
    return "maximize"


def raise_if_all_failed(study: Any, started_before: int) -> None:
    """A search whose every new trial failed is a mistake in its inputs: say the first error."""
    from optuna.trial import TrialState

    new = study.get_trials(deepcopy=False)[started_before:]
    if not new or any(trial.state != TrialState.FAIL for trial in new):
        return
    first = new[0].user_attrs.get("error", "unknown error")
    raise RuntimeError(
        f"AutoEstimator.fit: all {len(new)} trial(s) failed; the first with {first}. The "
        "trials stay in the study's storage (see .trials)"
    )
