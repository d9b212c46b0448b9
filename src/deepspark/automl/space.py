"""Search spaces: Optuna distributions, plain choices, or a function ``trial -> config``.

A dict space maps each name to an ``optuna.distributions`` object (sampled), a list or tuple
(a categorical choice) or any other value (fixed, passed through). A callable space is
Optuna's define-by-run: it gets the ``optuna.Trial`` and returns the config dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["SearchSpace", "config_for_storage", "grid_of", "optimizer_for_config"]


class SearchSpace:
    """What each trial's config is drawn from.

    Parameters
    ----------
    space : dict or callable
        ``{name: distribution | list of choices | fixed value}``, or ``trial -> dict``.

    Examples
    --------
    >>> import optuna
    >>> space = SearchSpace({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
    ...                      "hidden": [32, 64], "epochs": 3})
    >>> study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    >>> config = space.sample(study.ask())
    >>> sorted(config), config["epochs"], config["hidden"] in (32, 64)
    (['epochs', 'hidden', 'lr'], 3, True)
    """

    def __init__(self, space: Mapping[str, Any] | Callable[[Any], dict[str, Any]]) -> None:
        import optuna

        if callable(space):
            self.function: Callable[[Any], dict[str, Any]] | None = space
            self.distributions: dict[str, Any] = {}
            self.fixed: dict[str, Any] = {}
            return
        if not isinstance(space, Mapping) or not space:
            raise TypeError(
                "AutoEstimator(search_space=...) takes a non-empty dict {name: optuna "
                "distribution | list of choices | fixed value} or a function trial -> config; "
                f"got {type(space).__name__}"
            )
        self.function = None
        self.distributions = {}
        self.fixed = {}
        for name, value in space.items():
            if not isinstance(name, str):
                raise TypeError(f"search_space: names must be strings, got {name!r}")
            if isinstance(value, optuna.distributions.BaseDistribution):
                self.distributions[name] = value
            elif isinstance(value, (list, tuple)):
                if not value:
                    raise ValueError(f"search_space[{name!r}]: an empty list has nothing to try")
                self.distributions[name] = optuna.distributions.CategoricalDistribution(value)
            else:
                self.fixed[name] = value
        if not self.distributions:
            raise ValueError(
                "search_space: nothing to search (every value is fixed); give at least one "
                "optuna distribution or list of choices"
            )

    def sample(self, trial: Any) -> dict[str, Any]:
        """The config of ``trial`` (an ``optuna.Trial``)."""
        if self.function is not None:
            config = self.function(trial)
            if not isinstance(config, dict):
                raise TypeError(
                    f"search_space: the function must return a dict config, got "
                    f"{type(config).__name__}"
                )
            return config
        config = {name: _suggest(trial, name, dist) for name, dist in self.distributions.items()}
        config.update(self.fixed)
        return config


def _suggest(trial: Any, name: str, dist: Any) -> Any:
    import optuna

    if isinstance(dist, optuna.distributions.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise TypeError(f"search_space[{name!r}]: {type(dist).__name__} is not supported")


def grid_of(space: SearchSpace) -> dict[str, list[Any]]:
    """The grid ``optuna.samplers.GridSampler`` walks: every searched name's choices.

    Raises
    ------
    ValueError
        A define-by-run space, or a continuous distribution (a grid needs finite choices).
    """
    import optuna

    if space.function is not None:
        raise ValueError(
            "sampler='grid' needs a dict search_space of lists (or categorical/stepped int "
            "distributions), not a function"
        )
    grid: dict[str, list[Any]] = {}
    for name, dist in space.distributions.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise ValueError(
                f"sampler='grid': search_space[{name!r}] is {dist!r}, which has no finite set "
                f"of values; give a list of values to try"
            )
    return grid


def config_for_storage(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the study's database can keep it (numpy numbers become plain ones)."""
    plain: dict[str, Any] = {}
    for name, value in config.items():
        item = getattr(value, "item", None)
        plain[name] = item() if callable(item) else value
    return plain


def optimizer_for_config(optimizer: Any, config: dict[str, Any]) -> Any:
    """``(params, config) -> Optimizer`` becomes the ``params -> Optimizer`` from_torch takes."""
    import inspect

    if optimizer is None or not callable(optimizer) or isinstance(optimizer, type):
        return optimizer
    try:
        parameters = inspect.signature(optimizer).parameters
    except (TypeError, ValueError):
        return optimizer
    if len(parameters) < 2:
        return optimizer

    def for_this_trial(params: Any) -> Any:
        return optimizer(params, config)

    return for_this_trial
