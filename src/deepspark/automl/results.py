"""What a search leaves: the trials table and PNG plots (Optuna's matplotlib plots, Agg)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pandas as pd

__all__ = [
    "best_trial",
    "ranked_trials",
    "saved_estimator",
    "trial_best_epoch",
    "trial_config",
    "trials_frame",
    "write_plots",
]

_ATTR_COLUMNS = ("seconds", "epochs_trained", "best_epoch", "error", "retry_of")


def trials_frame(study: Any) -> pd.DataFrame:
    """One row per trial: ``number``, ``state``, ``value``, ``seconds``, ``epochs_trained``,
    ``best_epoch`` (the epoch whose metric is the value),
    one ``param_<name>`` column per config value, ``error`` (failed trials) and
    ``retry_of`` (a config queued again after its driver died)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
        }
        for name in _ATTR_COLUMNS:
            row[name] = trial.user_attrs.get(name)
        # what the trial trained with, as it stored it (Optuna's in-memory params of trials
        # that ran at once can lag behind the storage)
        for name, value in trial.user_attrs.get("config", trial.params).items():
            row[f"param_{name}"] = value
        rows.append(row)
    columns = ["number", "state", "value", *_ATTR_COLUMNS]
    return pd.DataFrame(rows, columns=None if rows else columns)


def best_trial(study: Any) -> Any:
    """The study's best complete trial; a clear error when none is complete."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ValueError(
            f"study {study.study_name!r} has no complete trial yet (see .trials for why)"
        )
    return study.best_trial


def trial_config(trial: Any, fixed: dict[str, Any]) -> dict[str, Any]:
    """A trial's whole config: what it stored, or its searched values with the fixed ones."""
    if "config" in trial.user_attrs:
        return dict(trial.user_attrs["config"])
    return {**trial.params, **fixed}


def trial_best_epoch(trial: Any) -> int:
    """The epoch (0-based) whose metric is the trial's value."""
    return int(trial.user_attrs.get("best_epoch", trial.user_attrs.get("epochs_trained", 1) - 1))


def ranked_trials(study: Any, count: int | None, fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``count`` best complete trials (None: all), best first: number, value, config,
    best_epoch and model_path (where the trial saved its fitted estimator)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
    complete = sorted(complete, key=lambda trial: (sign * trial.value, trial.number))
    return [
        {
            "number": trial.number,
            "value": float(trial.value),
            "config": trial_config(trial, fixed),
            "best_epoch": trial_best_epoch(trial),
            "model_path": trial.user_attrs.get("model_path"),
        }
        for trial in complete[:count]
    ]


def saved_estimator(number: int, path: str | None, metrics: Any = None) -> Any:
    """The fitted `Estimator` trial `number` saved at `path`."""
    from deepspark.training import Estimator

    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"trial {number} has no saved model at {path!r}; was the search's directory removed?"
        )
    return Estimator.load(path, metrics=metrics)


def write_plots(study: Any, directory: str, metric: str) -> list[str]:
    """Optimisation history, parameter importances and parallel coordinates as PNG files."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    os.makedirs(directory, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError("no complete trial to plot yet")
    plots = [
        ("optimization_history.png", optuna_plots.plot_optimization_history),
        ("parallel_coordinate.png", optuna_plots.plot_parallel_coordinate),
    ]
    if len(complete) >= 2 and len(study.best_trial.params) >= 1:
        plots.append(("param_importances.png", optuna_plots.plot_param_importances))
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in plots:
            axes = plot(study, target_name=metric)
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            path = os.path.join(directory, name)
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(path)
    return written
