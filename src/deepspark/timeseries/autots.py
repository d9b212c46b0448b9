"""AutoTS: a search over forecasting model kinds, lookbacks, sizes and learning rates.

Each trial is a `deepspark.automl` trial: a distributed fit of one global network over every
series, on the windows of its own lookback (rolled once per lookback and reused), stopped early
when its validation loss stops improving. Validation windows take their inputs from the end of
the training data, so a validation split of a few horizons per series is enough. The result
is a `TSPipeline`: the training data's scaler and the forecaster (the mean of the candidates
that beat seasonal naive on the same validation windows: the best trial of each of the 5 best
kind-and-lookback pairs, averaged, and AutoETS, AutoTheta and AutoARIMA fitted per series;
or seasonal naive when none does), which predicts the real future of unscaled data and saves
and loads as one directory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from deepspark.deprecation import RENAMED_SEARCH_OPTIONS, renamed_keywords
from deepspark.timeseries import validation_steps, windows
from deepspark.timeseries.baseline import SeasonalNaiveForecaster, naive_check, with_statistical
from deepspark.timeseries.ensemble import EnsembleForecaster
from deepspark.timeseries.forecast_model import make_loss
from deepspark.timeseries.forecaster import Forecaster, check_floor
from deepspark.timeseries.networks import NETWORK_KINDS
from deepspark.timeseries.pipeline import TSPipeline
from deepspark.timeseries.statistical import (
    SEASONAL_NAIVE,
    STATISTICAL_MODELS,
    fitted_per_series,
    statsforecast_model,
    validation_losses,
)
from deepspark.timeseries.tsdataset import TSDataset

__all__ = ["DEFAULT_SIZE_SPACE", "AutoTS", "TSPipeline"]

# Per kind, the sizes a search tries by default: small, so that trials stay cheap.
DEFAULT_SIZE_SPACE: dict[str, dict[str, list[Any]]] = {
    "lstm": {"hidden_size": [32, 64], "num_layers": [1, 2]},
    "tcn": {"num_channels": [16, 32], "num_levels": [3, 4]},
    "seq2seq": {"hidden_size": [32, 64]},
    "nbeats": {"hidden_size": [64, 128], "num_blocks": [2, 3]},
    "dlinear": {},
    "patchtst": {"d_model": [32, 64], "num_layers": [1, 2]},
    "nhits": {"hidden_size": [64, 128]},
}


class AutoTS:
    """Search forecasters for the data: model kind, lookback, sizes and learning rate.

    Parameters
    ----------
    horizon : int
        Steps to forecast.
    season : int, optional
        The series' period in steps (12 for monthly data with a yearly cycle, 48 for
        half-hourly data with a daily one). Lookbacks then default to 1, 2 and 3 seasons, and
        the search also tries each network as a correction to the seasonal-naive forecast
        (``season=`` of `build_network`), which short seasonal series need.
    models : sequence of str
        Kinds to try (`deepspark.timeseries.NETWORK_KINDS`).
    lookback : sequence of int, optional
        Lookbacks to try; default 1, 2 and 3 seasons, or (24, 48) without `season`.
    lr : (float, float)
        Learning-rate range, searched on a log scale.
    sizes : dict, optional
        ``{kind: {size name: list of choices}}``; default `DEFAULT_SIZE_SPACE`.
    loss : {"mse", "mae", "huber"}
    metric : str
        What the search minimises: ``"val_loss"`` (the loss on the scaled validation windows,
        at a trial's best epoch with `patience`, at its last without).
    patience : int or None
        Stop a trial after this many epochs without a better validation loss and keep its
        best epoch's weights (default 5; None trains every epoch). Trials are then ranked by
        their best epoch's validation loss.
    refit : bool or int
        Train each chosen config again on the training and validation steps together, for as
        many epochs as its trial needed to reach its best validation loss, so the pipeline
        has seen the latest steps. An int n trains each config n times from different
        initial weights (seeds 0 to n-1) and the pipeline averages them all (default 3): on
        short series one training run's forecast varies more than the configs differ. True
        is 1; False (0) keeps the trials' own models.
    floor : "auto", float or None
        The least value the pipeline forecasts (see `TSPipeline`). ``"auto"`` (default): 0
        when no target of the training data is negative (energy, sales, counts), so such
        series never get negative forecasts; otherwise none. None: no floor.
    ensemble : int
        How many configs forecast together (default 5): the best trial of each of the best
        (kind, lookback) pairs. The pipeline forecasts the mean of their forecasts
        (`EnsembleForecaster`), which depends less on which config won by a few per cent on
        the validation steps than the winner alone, and members that read different windows
        err less alike than near-copies of the winner. 1 keeps the best alone.
    fallback : float or None
        How much better than the seasonal-naive forecast (the last value without `season`) the
        chosen trials must be on the validation windows, as a fraction of its loss (default 0.01).
        Both forecast every window and are compared window by window with the search's loss: the
        trials' mean forecast is kept only when its mean loss is lower by more than this fraction
        and by more than one standard error of the per-window differences, counting each series'
        windows as overlapping over `horizon` steps
        (`deepspark.timeseries.forecast_metrics.overlapping_standard_error`). Otherwise the pipeline
        forecasts seasonal naive (`SeasonalNaiveForecaster`): networks that learnt nothing beyond it
        only add noise, and refitting moves a forecast by more than a gain of under 1%.
        `validation_` holds the comparison. None keeps the trials unchecked (and compares no
        `statistical` model).
    statistical : str or sequence of str
        statsforecast models (`deepspark.timeseries.statistical.STATISTICAL_MODELS`) that
        compete with the trials on the same validation windows (default AutoETS, AutoTheta
        and AutoARIMA): each is fitted on every series' training steps, as the trials are, run
        over each validation origin's past and scored with the same loss in the same scaled
        space. Of the candidates (the trials'
        mean forecast and each of these) that beat seasonal naive as `fallback` asks, the
        one with the lowest validation loss relative to seasonal naive's forecasts; a chosen
        statistical model is a `StatsForecaster`, fitted on each series' whole history when
        the pipeline predicts. Empty: networks only. Needs statsforecast (the
        ``timeseries`` extra).
    combine : bool
        When several candidates beat seasonal naive (`statistical`): True forecasts the mean
        of theirs, the networks counting as one (an `EnsembleForecaster` with
        `StatsForecaster` members); False, the lowest validation loss's alone.
    **search_options
        `deepspark.automl.AutoEstimator`'s: ``num_workers``, ``max_concurrent``,
        ``sampler``, ``pruner``, ``study_name``, ``storage``, ``checkpoint_dir``, ``seed``.

    Examples
    --------
    See ``docs/timeseries.md`` ("AutoTS").
    """

    @renamed_keywords(**RENAMED_SEARCH_OPTIONS)
    def __init__(
        self,
        *,
        horizon: int,
        season: int | None = None,
        models: Sequence[str] = ("dlinear", "nbeats", "lstm", "tcn"),
        lookback: Sequence[int] | None = None,
        lr: tuple[float, float] = (1e-3, 3e-2),
        sizes: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
        loss: str = "mse",
        metric: str = "val_loss",
        patience: int | None = 5,
        refit: bool | int = 3,
        ensemble: int = 5,
        floor: str | float | None = "auto",
        fallback: float | None = 0.01,
        statistical: Sequence[str] = ("AutoETS", "AutoTheta", "AutoARIMA"),
        combine: bool = True,
        **search_options: Any,
    ) -> None:
        self.horizon = horizon
        self.season = season
        self.models = tuple(models)
        self.lookback = None if lookback is None else tuple(lookback)
        self.lr = lr
        self.sizes = sizes
        self.loss = loss
        self.metric = metric
        self.patience = patience
        self.refit = refit
        self.ensemble = ensemble
        self.floor = floor
        self.fallback = fallback
        self.statistical = (statistical,) if isinstance(statistical, str) else tuple(statistical)
        self.combine = combine
        self.search_options = search_options
        self.search_: Any = None
        self.pipeline_: TSPipeline | None = None
        self.members_: list[dict[str, Any]] = []  # the trials the pipeline forecasts with
        # the candidates' validation losses against seasonal naive's (`fallback`)
        self.validation_: dict[str, Any] | None = None

    def _lookbacks(self) -> tuple[int, ...]:
        if self.lookback is not None:
            return self.lookback
        return (24, 48) if self.season is None else tuple(k * self.season for k in (1, 2, 3))

    def _check(self) -> dict[str, dict[str, list[Any]]]:
        for name in ("horizon", "season", "patience", "ensemble"):
            value = getattr(self, name)
            if (value is not None or name in ("horizon", "ensemble")) and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"AutoTS({name}={value!r}): a positive int")
        if not isinstance(self.refit, int) or self.refit < 0:
            raise ValueError(f"AutoTS(refit={self.refit!r}): True, False or a count of seeds")
        unknown = [kind for kind in self.models if kind not in NETWORK_KINDS]
        if not self.models or unknown:
            raise ValueError(
                f"AutoTS(models={list(self.models)!r}): choose from {list(NETWORK_KINDS)}"
            )
        lookbacks = self._lookbacks()
        if not lookbacks or any(not isinstance(n, int) or n < 1 for n in lookbacks):
            raise ValueError(f"AutoTS(lookback={self.lookback!r}): positive ints to try")
        low, high = self.lr
        if not 0 < low <= high:
            raise ValueError(f"AutoTS(lr={self.lr!r}): (low, high) with 0 < low <= high")
        sizes = {kind: dict(DEFAULT_SIZE_SPACE.get(kind, {})) for kind in self.models}
        for kind, choices in (self.sizes or {}).items():
            if kind not in sizes:
                raise ValueError(f"AutoTS(sizes={{{kind!r}: ...}}): {kind!r} is not searched")
            sizes[kind] = {name: list(values) for name, values in choices.items()}
        make_loss(self.loss)
        unknown = [name for name in self.statistical if name not in STATISTICAL_MODELS]
        if unknown:
            raise ValueError(
                f"AutoTS(statistical={self.statistical!r}): a sequence from {STATISTICAL_MODELS}"
            )
        if self.statistical and self.fallback is not None:
            statsforecast_model(self.statistical[0], self.season or 1)  # before the search
        if self.fallback is not None and (
            isinstance(self.fallback, bool)
            or not isinstance(self.fallback, (int, float))
            or not 0 <= self.fallback < 1
        ):
            raise ValueError(f"AutoTS(fallback={self.fallback!r}): a fraction in [0, 1) or None")
        if self.floor != "auto":
            try:
                check_floor(self.floor)
            except ValueError:
                raise ValueError(
                    f"AutoTS(floor={self.floor!r}): 'auto', a finite number or None"
                ) from None
        return sizes

    def fit(
        self,
        train: TSDataset,
        validation_data: TSDataset,
        *,
        n_trials: int = 12,
        epochs: int = 20,
        batch_size: int = 64,
        **fit_options: Any,
    ) -> TSPipeline:
        """Search on `train`, judge on `validation_data` (both scaled alike, e.g.
        ``train.scale("standard")`` and ``val.scale(train.scaler, fit=False)``), and return
        the `TSPipeline` of the chosen trials (see `ensemble`): their configs trained again on
        `train` and `validation_data` together (`refit`), or their own models, trained on
        `train`.

        `validation_data` continues `train` in time (the ``val`` of `TSDataset.split`): its
        windows read their inputs from the end of each training series and forecast validation
        steps only, so each series needs `horizon` validation steps, not ``lookback +
        horizon``. Training windows never reach into the validation steps. ``num_workers``
        (each trial's) may be given here, as `Forecaster.fit` takes it, or to `AutoTS`.
        """
        from deepspark.automl import AutoEstimator
        from deepspark.training.callbacks import EarlyStopping

        sizes = self._check()
        validation_steps.check_pair(train, validation_data, "AutoTS.fit")
        columns = train.columns
        continued = validation_steps.continued(train, validation_data)
        rolled: dict[int, tuple[Any, Any]] = {}
        horizon, season = self.horizon, self.season

        def data_for(config: dict[str, Any]) -> tuple[Any, Any]:
            lookback = int(config["lookback"])
            if lookback not in rolled:
                rolled[lookback] = (
                    windows.trial_rows(train.windows(lookback, horizon), train.is_spark),
                    windows.trial_rows(continued.windows(lookback, horizon), train.is_spark),
                )
            return rolled[lookback]

        loss = self.loss

        def model(config: dict[str, Any]) -> torch.nn.Module:
            return _forecaster(config, horizon, loss, season).build_model(columns)

        callbacks = list(fit_options.pop("callbacks", None) or [])
        if self.patience is not None:
            callbacks.append(EarlyStopping("val_loss", self.patience, restore_best_weights=True))

        self.search_ = AutoEstimator.from_torch(
            model,
            self._space(sizes),
            optimizer=lambda params, config: torch.optim.Adam(params, lr=config["lr"]),
            loss=make_loss(self.loss),
            metric=self.metric,
            direction="minimize",
            score="last" if self.patience is None else "best",
            **_search_options(self.search_options, fit_options),
        )
        self.search_.fit(
            None,
            n_trials=n_trials,
            feature_cols=windows.X_COL,
            label_cols=windows.Y_COL,
            epochs=epochs,
            batch_size=batch_size,
            data_for_config=data_for,
            callbacks=callbacks,
            **fit_options,
        )
        self.members_ = self._chosen()
        naive = SeasonalNaiveForecaster(season=season or 1, horizon=horizon)
        chosen = ["networks"]
        if self.fallback is not None:
            chosen = self._validate(naive, columns, data_for, continued)
        return self._chosen_pipeline(chosen, naive, train, continued, fit_options, batch_size)

    def _chosen_pipeline(
        self,
        chosen: list[str],
        naive: SeasonalNaiveForecaster,
        train: TSDataset,
        continued: Any,
        fit_options: dict[str, Any],
        batch_size: int,
    ) -> TSPipeline:
        """The pipeline of the `chosen` candidates: one alone, or the mean of several."""
        if chosen == ["networks"]:
            return self._refit(train, continued, fit_options, batch_size)
        networks = "networks" in chosen
        self.members_ = self.members_ if networks else []
        forecasters = fitted_per_series(chosen, naive, continued.data)
        if networks:  # the first member, as in the config's "members"
            forecasters.insert(0, self._refit(train, continued, fit_options, batch_size).forecaster)
        order = ["networks"] * networks + [name for name in chosen if name != "networks"]
        mean = forecasters[0] if len(chosen) == 1 else EnsembleForecaster(forecasters)
        config = {"model": chosen[0]} if len(chosen) == 1 else {"model": "combination"}
        config |= {"lookback": mean.lookback, "season": naive.season}
        return self._pipeline(mean, train, config | ({"members": order} if len(chosen) > 1 else {}))

    def _space(self, sizes: dict[str, dict[str, list[Any]]]) -> Callable[[Any], dict[str, Any]]:
        """The search space, define-by-run: ``trial -> config``."""
        models, (low, high), lookbacks, season = (
            self.models,
            self.lr,
            self._lookbacks(),
            self.season,
        )

        def space(trial: Any) -> dict[str, Any]:
            kind = trial.suggest_categorical("model", list(models))
            lookback = trial.suggest_categorical("lookback", list(lookbacks))
            config = {
                "model": kind,
                "lookback": lookback,
                "lr": trial.suggest_float("lr", low, high, log=True),
            }
            # A seasonal network needs a season in its window.
            if season is not None and lookback >= season:
                config["seasonal"] = trial.suggest_categorical("seasonal", [False, True])
            for name, choices in sizes[kind].items():
                config[name] = trial.suggest_categorical(f"{kind}.{name}", list(choices))
            return config

        return space

    def _validate(
        self,
        naive: SeasonalNaiveForecaster,
        columns: Any,
        data_for: Callable[[dict[str, Any]], tuple[Any, Any]],
        continued: Any,
    ) -> list[str]:
        """The chosen trials' mean and each `statistical` model against seasonal naive on the
        validation windows, as `validation_`, and what the pipeline forecasts with
        (`fallback`, `combine`), as `validation_["forecast"]`: ``"networks"``, statistical
        models, or seasonal naive."""
        from deepspark.automl.results import saved_estimator

        longest = max([naive.lookback] + [int(t["config"]["lookback"]) for t in self.members_])
        models = [saved_estimator(t["number"], t["model_path"]).get_model() for t in self.members_]
        rows, margin = data_for({"lookback": longest})[1], float(self.fallback)
        counts = continued.window_counts(longest, self.horizon)
        check = naive_check(
            models,
            naive.build_model(columns),
            rows,
            self.loss,
            margin,
            horizon=self.horizon,
            counts=counts,
        )
        passing = [check["chosen"]]
        if self.statistical:
            losses = validation_losses(
                continued, self.statistical, naive.season, self.horizon, self.loss
            )
            check = with_statistical(
                check, losses, self.statistical, margin, horizon=self.horizon, id_col=columns.id_col
            )
            passing = check["passing"] or [SEASONAL_NAIVE]
        check["forecast"] = passing if self.combine else passing[:1]
        self.validation_ = check
        return check["forecast"]

    def _refit(
        self, train: TSDataset, continued: Any, fit_options: dict[str, Any], batch_size: int
    ) -> TSPipeline:
        """The pipeline of the chosen trials' forecasters (see `refit`)."""
        columns = train.columns
        refit_options = {k: v for k, v in fit_options.items() if k not in _SEARCH_ONLY}
        refit_options.setdefault("progress", False)
        refit_options.update(batch_size=batch_size, num_workers=self.search_.num_workers)
        members = [
            forecaster
            for trial in self.members_
            for forecaster in self._members(trial, continued, columns, refit_options)
        ]
        forecaster = members[0] if len(members) == 1 else EnsembleForecaster(members)
        return self._pipeline(forecaster, train, self.search_.best_config)

    def _pipeline(
        self, forecaster: Forecaster, train: TSDataset, config: dict[str, Any]
    ) -> TSPipeline:
        floor = self.floor
        if floor == "auto":
            floor = 0.0 if all(value >= 0 for value in train.target_min().values()) else None
        self.pipeline_ = TSPipeline(forecaster, train.scaler, config, floor)
        return self.pipeline_

    def _chosen(self) -> list[dict[str, Any]]:
        """The trials the pipeline forecasts with: the best of each (kind, lookback), best
        first, then the next best trials if there are fewer pairs than `ensemble`."""
        ranked = self.search_.top_trials(None)
        firsts: dict[tuple[str, int], dict[str, Any]] = {}
        for trial in ranked:
            firsts.setdefault((trial["config"]["model"], int(trial["config"]["lookback"])), trial)
        chosen = list(firsts.values())[: self.ensemble]
        chosen += [t for t in ranked if t not in chosen][: self.ensemble - len(chosen)]
        return chosen

    def _members(
        self, trial: dict[str, Any], continued: TSDataset, columns: Any, options: dict[str, Any]
    ) -> list[Forecaster]:
        """One trial's forecasters: its config trained again on train + validation steps for
        as many epochs as the trial needed, once per seed (`refit`), or the trial's model."""
        if self.refit:
            refitted = []
            for seed in range(int(self.refit)):
                forecaster = _forecaster(trial["config"], self.horizon, self.loss, self.season)
                forecaster.seed = seed
                forecaster.fit(continued.data, epochs=trial["best_epoch"] + 1, **options)
                refitted.append(forecaster)
            return refitted
        from deepspark.automl.results import saved_estimator

        forecaster = _forecaster(trial["config"], self.horizon, self.loss, self.season)

        forecaster.model_ = saved_estimator(trial["number"], trial["model_path"]).get_model()
        forecaster.columns_ = columns
        return [forecaster]

    @property
    def trials(self) -> pd.DataFrame:
        """The search's trials (see `deepspark.automl.AutoEstimator.trials`)."""
        if self.search_ is None:
            raise RuntimeError("AutoTS has not searched: call fit first")
        return self.search_.trials

    @property
    def best_config(self) -> dict[str, Any]:
        if self.search_ is None:
            raise RuntimeError("AutoTS has not searched: call fit first")
        return self.search_.best_config


# AutoEstimator.fit's options that a single refit does not take
_SEARCH_ONLY = ("timeout_s", "validation_data", "num_workers", "callbacks")


def _search_options(search: dict[str, Any], fit_options: dict[str, Any]) -> dict[str, Any]:
    """The search's options, with ``num_workers`` taken from `fit_options` when given there
    (each trial's workers, as `Forecaster.fit` takes it)."""
    if "num_workers" not in fit_options:
        return search
    workers = fit_options.pop("num_workers")
    if search.get("num_workers", workers) != workers:
        raise ValueError(
            f"AutoTS(num_workers={search['num_workers']!r}) and fit(num_workers={workers!r}) "
            "disagree: give it once"
        )
    return {**search, "num_workers": workers}


def _forecaster(config: dict[str, Any], horizon: int, loss: str, season: int | None) -> Forecaster:
    not_sizes = ("model", "lookback", "lr", "epochs", "batch_size", "seasonal")
    sizes = {name: value for name, value in config.items() if name not in not_sizes}
    if config.get("seasonal"):
        sizes["season"] = season
    return Forecaster(
        config["model"],
        lookback=int(config["lookback"]),
        horizon=horizon,
        lr=float(config["lr"]),
        loss=loss,
        **sizes,
    )
