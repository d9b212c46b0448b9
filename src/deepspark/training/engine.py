"""The training engine's public entry: run a fit or an evaluation of a backend on N ranks.

Driver side. `fit` and `evaluate` do what every framework's job needs, once: the checks that
need no data (`FitOptions.check`), the job's data (DataFrame, pandas, dict of arrays or data
creator; columns checked, one partition per rank), recovery (re-runs from the latest
checkpoint, up to ``max_failures``), the callbacks' driver hooks, the barrier stage with its
progress channel, and what comes back: history, attempts, timings, the trained weights.

A framework adds a `Backend`: the few things that differ between torch, TensorFlow and (later)
a user's own function. It says which loop its ranks run (`RankLoop`), what they build
(`RankProgram`: the pickled model and its training parts), and what to check on the driver
(`Backend.prepare`, `Backend.check_sample`). It does not copy the trainer. The estimators
(`deepspark.Estimator`, ``deepspark.keras.KerasEstimator``) are facades over these two
functions: they turn their flat keyword arguments into `FitOptions` and load the result.

See docs/training.md, "The engine's entry", for a fit through `fit` with a backend of one's
own.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from deepspark.training.backend import Backend
from deepspark.training.callbacks import call_driver_hook
from deepspark.training.driver.checks import pickled
from deepspark.training.driver.fit_data import job_data
from deepspark.training.driver.jobs import run_job
from deepspark.training.driver.recovery import prepared_recovery
from deepspark.training.driver.timeline import fit_timeline
from deepspark.training.job_spec import JobKind, ResultKind, TrainSpec
from deepspark.training.options import EvaluateOptions, FitOptions, LoopOptions

__all__ = ["FitResult", "evaluate", "fit"]

_log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a finished fit brought back, and how it went.

    Attributes
    ----------
    history : pandas.DataFrame
        One row per epoch; ``attempt`` says which attempt trained it.
    step_history : pandas.DataFrame
        Validations every ``validate_every_steps``; empty without them.
    weights : bytes
        Rank 0's trained weights (safetensors).
    optimizer_state : bytes or None
        The optimizers' state, for the next fit to continue (torch loop).
    attempts : int
        How many attempts the job took (1 when nothing failed).
    first_step_s : float
        Seconds from the start of the fit to the first training step of its last attempt.
    ports : list of int
        The ports the job listened on (progress channel, rendezvous).
    marks : dict of str to float
        The wall-clock moments of the fit (see `timings`).
    """

    history: pd.DataFrame
    step_history: pd.DataFrame
    weights: bytes
    optimizer_state: bytes | None
    attempts: int
    first_step_s: float
    ports: list[int] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def timings(self) -> dict[str, float]:
        """Where the fit's wall time went, in seconds, up to now (call it once the weights are
        loaded: its last span, ``load_weights``, ends here). See ``Estimator.timings_``."""

        return fit_timeline(
            self.marks, self.marks["fit_start"], self.marks["checks_done"], time.time()
        )


def fit(
    backend: Backend,
    data: Any,
    options: FitOptions,
    *,
    validation_data: Any = None,
) -> FitResult:
    """Train `backend`'s program data-parallel on `data`, one barrier stage per attempt.

    Parameters
    ----------
    backend : Backend
    data : Spark, pandas or pandas-on-Spark DataFrame, dict of arrays, or data creator
        The training rows (see ``Estimator.fit``).
    options : FitOptions
    validation_data : same types as `data`, optional
        Evaluated after every epoch, in the same stage.

    Returns
    -------
    FitResult

    Raises
    ------
    ValueError, TypeError
        Bad options or data, on the driver before any job starts.
    deepspark.TrainingError
        When the job failed after its allowed re-runs.
    """

    started_wall = time.time()
    started = time.perf_counter()
    options.check()
    options = backend.prepare(options)
    job = job_data(backend, data, validation_data, options.data, options.run, training=True)
    with prepared_recovery(job.spark, options.recovery) as recovery:
        options.loop.check_with(
            has_validation=job.has_validation,
            has_checkpoints=recovery.checkpoint_dir is not None,
            use_gpu=backend.use_gpu,
        )
        spec = TrainSpec(
            kind=JobKind.FIT,
            program=backend.program(JobKind.FIT),
            features=job.features,
            labels=job.labels,
            world_size=job.num_workers,
            batch_size=options.data.batch_size,
            step_policy=options.data.step_policy or "pad",
            # a resume mid-epoch replays the epoch's order, which a streamed epoch lacks
            stream_first_epoch=bool(options.data.stream_first_epoch)
            and options.loop.checkpoint_every_steps is None,
            loop=options.loop,
            recovery=recovery,
            collective_timeout_s=options.run.collective_timeout_s,
            has_validation=job.has_validation,
            job_id=uuid.uuid4().hex[:12],
            creator_blobs=job.creator_blobs,
            creator_keys=job.creator_keys,
        )
        marks = {"fit_start": started_wall, "checks_done": time.time()}
        result = _run_with_hooks(backend, job, spec, options, started)
    return _fit_result(result, job.num_workers, options, marks)


def evaluate(backend: Backend, data: Any, options: EvaluateOptions) -> dict[str, float]:
    """Loss and metrics of `backend`'s model over every row of `data`, computed by the ranks.

    Returns
    -------
    dict
        ``{"loss": ..., "<metric>": ...}``, exact over every row.
    """

    options.check()
    job = job_data(backend, data, None, options.data, options.run, training=False)
    spec = TrainSpec(
        kind=JobKind.EVALUATE,
        program=backend.program(JobKind.EVALUATE),
        features=job.features,
        labels=job.labels,
        world_size=job.num_workers,
        batch_size=max(options.data.batch_size, job.num_workers),
        loop=LoopOptions(epochs=0),  # no training: the progress bar has no epochs
        collective_timeout_s=options.run.collective_timeout_s,
        job_id=uuid.uuid4().hex[:12],
        creator_blobs=job.creator_blobs,
        creator_keys=job.creator_keys,
    )
    result = run_job(job.spark, job.frame, spec, loop=backend.loop, progress=options.run.progress)
    return json.loads(result.payload(ResultKind.METRICS))


def _run_with_hooks(
    backend: Backend, job: Any, spec: TrainSpec, options: FitOptions, started: float
) -> Any:
    """The fit job with the callbacks' driver hooks around it."""

    callbacks = list(options.callbacks)
    fit_params = {
        "epochs": options.loop.epochs,
        "batch_size": options.data.batch_size,
        "num_workers": job.num_workers,
        "step_policy": spec.step_policy,
        "seed": options.loop.seed,
        "checkpoint_dir": spec.recovery.checkpoint_dir,
    }
    call_driver_hook(callbacks, "on_fit_begin", fit_params)
    # pickled after on_fit_begin, so what it set (an MLflow run id) reaches every rank
    spec.callbacks_blob = pickled("callbacks", callbacks) if callbacks else None
    try:
        return run_job(
            job.spark,
            job.frame,
            spec,
            loop=backend.loop,
            max_failures=options.recovery.max_failures,
            progress=options.run.progress,
            started=started,
        )
    except BaseException as error:
        call_driver_hook(callbacks, "on_fit_end", [], error)
        raise


def _fit_result(
    result: Any, num_workers: int, options: FitOptions, marks: dict[str, float]
) -> FitResult:
    """The history and results of a successful job; the callbacks' ``on_fit_end``."""

    history = json.loads(result.payload(ResultKind.HISTORY))
    for record in history:
        record["attempt"] = result.epoch_attempts.get(int(record["epoch"]), 1)
    steps = pd.DataFrame()
    if result.has(ResultKind.STEP_HISTORY):
        steps = pd.DataFrame(json.loads(result.payload(ResultKind.STEP_HISTORY)))
    last = history[-1] if history else {}
    _log.info(
        "fit: %d epochs on %d workers; %s",
        len(history),
        num_workers,
        ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)),
    )
    fitted = FitResult(
        history=pd.DataFrame(history),
        step_history=steps,
        weights=result.payload(ResultKind.WEIGHTS),
        optimizer_state=(
            result.payload(ResultKind.OPTIMIZER) if result.has(ResultKind.OPTIMIZER) else None
        ),
        attempts=result.attempts,
        first_step_s=result.first_step_s,
        ports=result.ports,
        marks={**result.marks, **marks},
    )
    call_driver_hook(list(options.callbacks), "on_fit_end", history, None)
    return fitted
