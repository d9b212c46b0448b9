"""Driver side of one training or evaluation job: its input DataFrame, its attempts, its results.

`run_job` starts the progress channel, runs the barrier stage (`stage.run_barrier_stage`),
re-runs failed attempts from the latest checkpoint up to `max_failures`, and returns what rank 0
sent back. The `Estimator` only validates arguments and interprets results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from deepspark.errors import DeepsparkError
from deepspark.training.job_spec import SPLIT_COLUMN, JobKind, RankLoop, ResultKind, TrainSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["JobResult", "TrainingError", "job_input", "retry_can_help", "run_job"]

_log = logging.getLogger(__name__)

# What Spark's error says about the barrier task that ended the stage, and why.
_BARRIER_TASK = re.compile(r"barrier task ResultTask\(\d+, (\d+)\)")
_WORKER_CRASH = re.compile(r"(Python worker exited unexpectedly[^\n.]*)")
# Errors a rank sees because another rank failed: the collective lost a peer (torch's
# process groups, or TensorFlow's collectives aborted).
_COLLECTIVE_SYMPTOM = re.compile(
    r"gloo|nccl|Connection (?:closed|reset)|Broken pipe|timed? ?out|ProcessGroup"
    r"|Collective ops is aborted",
    re.I,
)
# A Python worker's traceback inside Spark's error text, up to Spark's own lines after it.
_PYTHON_TRACEBACK = re.compile(
    r"Traceback \(most recent call last\):\n(.*?)(?=\n\s*SQLSTATE|\n\tat |\n\s*JVM stacktrace|\Z)",
    re.S,
)


class TrainingError(DeepsparkError, RuntimeError):
    """A training job failed (after its allowed retries); `causes` holds one entry per attempt.

    The message's first line after the headline names, per attempt, the rank that failed first
    and its exception (``rank 1: ModuleNotFoundError: No module named 'x'``).
    """

    def __init__(self, message: str, causes: list[str]):
        super().__init__(message)
        self.causes = causes


@dataclass
class JobResult:
    """What a finished job sent back, and how it went."""

    table: pa.Table
    attempts: int
    first_step_s: float
    ports: list[int] = field(default_factory=list)
    epoch_attempts: dict[int, int] = field(default_factory=dict)  # epoch -> attempt (1-based)
    # wall-clock moments of the successful attempt: the driver's submit and finish, and rank
    # 0's task start, first batch, spill, rendezvous, first step and end of training
    marks: dict[str, float] = field(default_factory=dict)

    def has(self, kind: ResultKind) -> bool:
        """Whether rank 0 sent anything under `kind`."""
        return kind.value in self.table.column("kind").to_pylist()

    def payload(self, kind: ResultKind) -> bytes:
        """The bytes rank 0 sent under `kind`, its chunks joined in order."""
        kinds = self.table.column("kind").to_pylist()
        seqs = self.table.column("seq").to_pylist()
        payloads = self.table.column("payload").to_pylist()
        chunks = sorted(
            (seq, bytes(payload))
            for row_kind, seq, payload in zip(kinds, seqs, payloads, strict=True)
            if row_kind == kind.value
        )
        if not chunks:
            raise RuntimeError(f"the job sent no {kind.value} back")
        return b"".join(payload for _, payload in chunks)


def job_input(
    df: DataFrame,
    columns: list[str],
    num_workers: int,
    *,
    split: int,
    validation: DataFrame | None = None,
    validation_split: int = 1,
) -> DataFrame:
    """The rows a job reads: the needed columns, a split tag, exactly `num_workers` partitions.

    A DataFrame that already has `num_workers` partitions (and no validation rows to mix in)
    keeps them as they are: no shuffle. When `df` or `validation` is kept by
    `deepspark.cache`, the job reads chunk rows instead (``__deepspark_chunk`` and the split
    column, balanced over the ranks; the ranks decode them with
    `deepspark.data.chunks.rows_from_chunks`), and a part that is not cached is converted to
    chunk rows on the fly.
    """
    from pyspark.sql import functions as F

    from deepspark.context.identity import is_connect
    from deepspark.data.cache import chunk_input

    parts = [(df, split)] + ([(validation, validation_split)] if validation is not None else [])
    chunks = chunk_input(parts, columns, num_workers, tag_column=SPLIT_COLUMN)
    if chunks is not None:
        return chunks

    def tagged(frame: DataFrame, value: int) -> DataFrame:
        return frame.select(*columns, F.lit(value).cast("int").alias(SPLIT_COLUMN))

    data = tagged(df, split)
    if validation is not None:
        data = data.unionByName(tagged(validation, validation_split))
    elif not is_connect(df.sparkSession):
        with contextlib.suppress(Exception):  # some plans cannot say without running
            if data.rdd.getNumPartitions() == num_workers:
                return data
    # A shuffle hands each rank its rows in the order their blocks arrive, which varies from
    # run to run; sorting them back into the input's order lets a seeded fit repeat exactly.
    order = "__deepspark_row_order"
    return (
        data.withColumn(order, F.monotonically_increasing_id())
        .repartition(num_workers)
        .sortWithinPartitions(order)
        .drop(order)
    )


def _given_up(spec: TrainSpec, causes: list[str], retried: bool) -> TrainingError:
    """The error of a job whose last attempt failed: each attempt's cause, in order."""
    detail = "\n".join(f"  attempt {number}: {text}" for number, text in enumerate(causes, 1))
    note = "" if retried else " (not retried: the driver's own code raised it)"
    return TrainingError(
        f"{spec.kind.value} failed after {len(causes)} attempt(s){note}:\n{detail}", causes
    )


def run_job(
    spark: SparkSession,
    data: DataFrame,
    spec: TrainSpec,
    *,
    loop: RankLoop = RankLoop.TORCH,
    max_failures: int = 0,
    progress: bool = True,
    started: float | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> JobResult:
    """Run `spec` over `data`, re-running failed attempts from the latest checkpoint.

    Each task runs the rank `loop` (`stage.run_barrier_stage`). `on_event` sees every event
    the ranks send as it arrives (on the progress server's thread).

    Raises
    ------
    TrainingError
        After the last allowed attempt failed; its message names, per attempt, the rank that
        failed first and every rank's reported error with the tail of its traceback.
    """
    from deepspark.context.topology import driver_address, master_of
    from deepspark.context.workers import check_workers
    from deepspark.training.driver.progress_bar import ProgressBar
    from deepspark.training.driver.progress_server import ProgressServer
    from deepspark.training.driver.stage import run_barrier_stage

    check_workers(spark)  # once per session: the workers' Python can run this job
    spec.rendezvous_host = "127.0.0.1" if master_of(spark).is_local else None
    driver = driver_address(spark)
    bar = ProgressBar(epochs=spec.loop.epochs) if progress else None
    sink = _ProgressSink(time.perf_counter() if started is None else started, bar, on_event)
    causes: list[str] = []
    server = ProgressServer(
        host=driver.bind,
        advertise_host=driver.advertise,
        sink=sink,
        max_connections=spec.world_size,
    )
    try:
        with server:
            spec.progress_address = server.address
            spec.progress_token = server.token
            for attempt in range(max_failures + 1):
                sink.attempt = spec.attempt = attempt + 1
                errors_before = len(server.events("error"))
                try:
                    submitted = time.time()
                    table = run_barrier_stage(data, spec, loop)
                except Exception as error:
                    cause = _failure_cause(server, error, errors_before)
                    causes.append(cause)
                    final = not retry_can_help(error)
                    if attempt == max_failures or final:
                        raise _given_up(spec, causes, retried=not final) from error
                    _log.warning(
                        "%s: attempt %d failed (%s); re-running from the latest checkpoint",
                        spec.kind.value,
                        attempt + 1,
                        cause.splitlines()[0],
                    )
                    spec.recovery = dataclasses.replace(spec.recovery, resume=True)
                    continue
                result = _job_result(server, spec, table, submitted)
                result.attempts = attempt + 1
                result.first_step_s = sink.first_step_s
                result.epoch_attempts = dict(sink.epoch_attempts)
                return result
    finally:
        # after the server stopped: its thread no longer calls the sink
        if bar is not None:
            bar.close()
    raise AssertionError("unreachable: the last attempt returns or raises")


# What the driver's own code raises before or after a job (a missing attribute, a wrong call, a
# bad argument, an object that does not pickle): a re-run raises it again. A failure of the job
# itself (a rank's exception, a lost executor or peer) reaches the driver as Spark's error
# (Py4JJavaError, a captured PythonException, a Connect gRPC error), of none of these types.
_DRIVER_CODE_ERRORS = (
    AttributeError,
    TypeError,
    NameError,
    ImportError,
    ValueError,
    KeyError,
    IndexError,
    NotImplementedError,
    AssertionError,
    pickle.PicklingError,
)


def retry_can_help(error: BaseException) -> bool:
    """Whether re-running the job may succeed where this attempt raised `error`.

    Examples
    --------
    >>> retry_can_help(AttributeError("'DataFrame' object has no attribute 'toArrow'"))
    False
    >>> retry_can_help(RuntimeError("Python worker exited unexpectedly (crashed)"))
    True
    """
    return not isinstance(error, _DRIVER_CODE_ERRORS)


class _ProgressSink:
    """What the driver takes from the ranks' progress events: the first step's moment, the
    attempt that trained each epoch; the events go on to the progress bar."""

    def __init__(self, started: float, bar: Any, on_event: Any = None) -> None:
        self.started, self.bar, self.on_event = started, bar, on_event
        self.attempt = 1
        self.first_step_s = float("nan")
        self.epoch_attempts: dict[int, int] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "step" and math.isnan(self.first_step_s):
            self.first_step_s = time.perf_counter() - self.started
        if event.get("kind") == "epoch" and "epoch" in event:
            self.epoch_attempts[int(event["epoch"])] = self.attempt
        if self.bar is not None:
            self.bar(event)
        if self.on_event is not None:
            self.on_event(event)


def _failure_cause(server: Any, error: Exception, errors_before: int) -> str:
    """What ended an attempt, with the ranks' own reports of it (see `_failure_summary`)."""
    # a failed rank's report can trail Spark's verdict by a moment
    server.wait_for(
        lambda events: sum(1 for event in events if event.get("kind") == "error") > errors_before,
        timeout_s=2.0,
    )
    return _failure_summary(error, server.events("error")[errors_before:])


def _job_result(server: Any, spec: TrainSpec, table: pa.Table, submitted: float) -> JobResult:
    """A successful attempt's results, with the ports it used and rank 0's timeline."""
    ports = [server.address[1]] + [
        int(event["rendezvous_port"])
        for event in server.events("log")
        if "rendezvous_port" in event
    ]
    if spec.kind is JobKind.FIT:
        # rank 0 reports its timeline before its results; the server may lag
        server.wait_for(lambda events: any("timeline" in event for event in events), timeout_s=2.0)
    marks = [event["timeline"] for event in server.events("log") if "timeline" in event]
    return JobResult(
        table=table,
        attempts=1,
        first_step_s=float("nan"),
        ports=ports,
        marks={**(marks[-1] if marks else {}), "submitted": submitted, "job_done": time.time()},
    )


def _failure_summary(error: Exception, errors: list[dict[str, Any]]) -> str:
    """The rank that failed first and its exception, then every rank's reported error.

    The first line reads ``rank 1: ValueError: message``. The exception comes from the rank's
    own report on the progress channel, or, for a rank that died before it could report (an
    import error, a killed process), from Spark's error text.
    """
    text = str(error)
    reported: dict[int, dict[str, Any]] = {}
    for event in errors:
        reported.setdefault(int(event.get("rank", -1)), event)
    first = _BARRIER_TASK.search(text)
    crash = _WORKER_CRASH.search(text)
    python_error = _python_exception(text)
    first_rank = int(first.group(1)) if first is not None else None
    if reported and (first_rank is None or first_rank in reported):
        # Spark's verdict is a race once the first failure tears down the collectives: the
        # rank whose own error came first (a symptom of another's failure last) is the cause.
        first_rank = min(
            reported,
            key=lambda rank: (
                _COLLECTIVE_SYMPTOM.search(str(reported[rank].get("error", ""))) is not None,
                float(reported[rank].get("time", 0.0)),
            ),
        )
    if first_rank in reported:
        cause = str(reported[first_rank].get("error"))
    else:
        cause = python_error or (crash.group(1).strip() if crash else None)
    if first_rank is not None:
        headline = f"rank {first_rank}: {cause or 'failed (no error reported)'}"
    else:
        lines = [line for line in text.strip().splitlines() if "Error" in line]
        headline = cause or (lines[-1] if lines else text.strip()[-500:] or repr(error))[:2000]
    parts = [headline]
    for event in errors:
        tail = "\n".join(str(event.get("traceback", "")).strip().splitlines()[-6:])
        parts.append(f"rank {event.get('rank')}: {event.get('error')}\n{tail}")
    return "\n".join(parts)


def _python_exception(text: str) -> str | None:
    """The last line (``Type: message``) of the first Python traceback in Spark's error text."""
    match = _PYTHON_TRACEBACK.search(text)
    if match is None:
        return None
    lines = [line for line in match.group(1).splitlines() if line and not line[0].isspace()]
    return lines[-1].strip() if lines else None
