"""Where a fit's wall time went: spans between the moments the driver and rank 0 noted.

Driver side, but plain arithmetic: no pyspark. `Estimator.fit` keeps the result as `timings_`.
"""

from __future__ import annotations

__all__ = ["fit_timeline"]

# (span name, the moment it starts, the moment it ends), in the order a fit goes through them;
# together they make up the fit's wall time
_TIMELINE = (
    ("driver_checks", "fit_start", "checks_done"),
    ("job_submit", "checks_done", "submitted"),
    ("worker_start", "submitted", "task_start"),
    ("rendezvous", "task_start", "rendezvous_done"),
    ("model_setup", "rendezvous_done", "model_ready"),
    ("first_step", "model_ready", "first_step"),
    ("epochs", "first_step", "train_done"),
    ("weights_return", "train_done", "job_done"),
    ("load_weights", "job_done", "fit_end"),
)
# spans that run alongside the ones above (rank 0's input arrives on its own thread)
_ALONGSIDE = (
    ("first_batch", "task_start", "first_batch"),
    ("input_read", "task_start", "input_done"),
)


def fit_timeline(
    marks: dict[str, float], fit_start: float, checks_done: float, fit_end: float
) -> dict[str, float]:
    """Seconds per span of a fit from wall-clock moments (see `Estimator.timings_`).

    A span whose moments were not reported (a fit that trained no epoch, say) is ``nan``.

    Examples
    --------
    >>> marks = {"submitted": 1.5, "task_start": 2.0, "first_batch": 2.5, "input_done": 4.0,
    ...          "rendezvous_done": 3.0, "model_ready": 3.2, "first_step": 3.3,
    ...          "train_done": 9.3, "validation_s": 1.0, "job_done": 9.5}
    >>> timeline = fit_timeline(marks, fit_start=0.0, checks_done=1.0, fit_end=9.6)
    >>> round(timeline["epochs"], 3), timeline["validation"], round(timeline["total"], 3)
    (5.0, 1.0, 9.6)
    >>> round(timeline["input_read"], 3)  # alongside the rendezvous and the first epoch
    2.0
    """
    moments = {**marks, "fit_start": fit_start, "checks_done": checks_done, "fit_end": fit_end}
    timeline = {}
    for name, begin, end in (*_TIMELINE, *_ALONGSIDE):
        if begin in moments and end in moments:
            timeline[name] = max(0.0, moments[end] - moments[begin])
        else:
            timeline[name] = float("nan")
    validation = float(marks.get("validation_s", float("nan")))
    timeline["epochs"] -= validation if validation == validation else 0.0
    timeline["validation"] = validation
    timeline["total"] = fit_end - fit_start
    order = [name for name, _, _ in _TIMELINE]
    order.insert(order.index("epochs") + 1, "validation")
    alongside = [name for name, _, _ in _ALONGSIDE]
    return {name: timeline[name] for name in [*order, "total", *alongside]}
