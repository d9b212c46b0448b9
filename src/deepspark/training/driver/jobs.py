"""Driver side of one training or evaluation job: its input DataFrame, its attempts, its results.

`run_job` starts the progress channel, runs the barrier stage (`stage.run_barrier_stage`),
re-runs failed attempts from the latest checkpoint up to `max_failures`, and returns what rank 0
sent back. The `Estimator` only validates arguments and interprets results.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from deepspark.training.job_spec import SPLIT_COLUMN, ResultKind, TrainSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["JobResult", "TrainingError", "job_input", "run_job"]

_log = logging.getLogger(__name__)

# What Spark's error says about the barrier task that ended the stage, and why.
_BARRIER_TASK = re.compile(r"barrier task ResultTask\(\d+, (\d+)\)")
_WORKER_CRASH = re.compile(r"(Python worker exited unexpectedly[^\n.]*)")


class TrainingError(RuntimeError):
    """A training job failed (after its allowed retries); `causes` holds one entry per attempt."""

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
    keeps them as they are: no shuffle.
    """
    from pyspark.sql import functions as F

    from deepspark.training.driver.stage import is_connect

    def tagged(frame: DataFrame, value: int) -> DataFrame:
        return frame.select(*columns, F.lit(value).cast("int").alias(SPLIT_COLUMN))

    data = tagged(df, split)
    if validation is not None:
        data = data.unionByName(tagged(validation, validation_split))
    elif not is_connect(df.sparkSession):
        with contextlib.suppress(Exception):  # some plans cannot say without running
            if data.rdd.getNumPartitions() == num_workers:
                return data
    return data.repartition(num_workers)


def run_job(
    spark: SparkSession,
    data: DataFrame,
    spec: TrainSpec,
    *,
    max_failures: int = 0,
    progress: bool = True,
    started: float | None = None,
) -> JobResult:
    """Run `spec` over `data`, re-running failed attempts from the latest checkpoint.

    Raises
    ------
    TrainingError
        After the last allowed attempt failed; its message names, per attempt, the rank that
        failed first and every rank's reported error with the tail of its traceback.
    """
    from deepspark.training.driver.progress_bar import ProgressBar
    from deepspark.training.driver.stage import is_loopback_master, run_barrier_stage
    from deepspark.training.progress import ProgressServer

    loopback = is_loopback_master(spark)
    spec.rendezvous_host = "127.0.0.1" if loopback else None
    started = time.perf_counter() if started is None else started
    bar = ProgressBar(epochs=spec.epochs) if progress else None
    first_step: list[float] = []

    def sink(event: dict[str, Any]) -> None:
        if event.get("kind") == "step" and not first_step:
            first_step.append(time.perf_counter() - started)
        if bar is not None:
            bar(event)

    causes: list[str] = []
    server = ProgressServer(
        host="127.0.0.1" if loopback else "0.0.0.0",
        advertise_host=None if loopback else _driver_host(spark),
        sink=sink,
    )
    try:
        with server:
            spec.progress_address = server.address
            spec.progress_token = server.token
            for attempt in range(max_failures + 1):
                errors_before = len(server.events("error"))
                try:
                    table = run_barrier_stage(data, spec)
                except Exception as error:
                    # a failed rank's report can trail Spark's verdict by a moment
                    server.wait_for(
                        lambda events, seen=errors_before: (
                            sum(1 for event in events if event.get("kind") == "error") > seen
                        ),
                        timeout_s=2.0,
                    )
                    cause = _failure_summary(error, server.events("error")[errors_before:])
                    causes.append(cause)
                    if attempt == max_failures:
                        detail = "\n".join(
                            f"  attempt {number}: {text}" for number, text in enumerate(causes, 1)
                        )
                        raise TrainingError(
                            f"{spec.kind.value} failed after {attempt + 1} attempt(s):\n{detail}",
                            causes,
                        ) from error
                    _log.warning(
                        "%s: attempt %d failed (%s); re-running from the latest checkpoint",
                        spec.kind.value,
                        attempt + 1,
                        cause.splitlines()[0],
                    )
                    spec.resume = True
                    continue
                ports = [server.address[1]] + [
                    int(event["rendezvous_port"])
                    for event in server.events("log")
                    if "rendezvous_port" in event
                ]
                return JobResult(
                    table=table,
                    attempts=attempt + 1,
                    first_step_s=first_step[0] if first_step else float("nan"),
                    ports=ports,
                )
    finally:
        # after the server stopped: its thread no longer calls the sink
        if bar is not None:
            bar.close()
    raise AssertionError("unreachable: the last attempt returns or raises")


def _driver_host(spark: SparkSession) -> str:
    from deepspark.training.rank.rendezvous import local_ip

    return spark.conf.get("spark.driver.host", None) or local_ip()


def _failure_summary(error: Exception, errors: list[dict[str, Any]]) -> str:
    """Which rank failed first and why, then every rank's reported error with its log tail."""
    text = str(error)
    parts = []
    first = _BARRIER_TASK.search(text)
    crash = _WORKER_CRASH.search(text)
    reported = {int(event.get("rank", -1)) for event in errors}
    if first is not None:
        rank = int(first.group(1))
        if crash is not None and rank not in reported:
            parts.append(f"rank {rank} failed first: {crash.group(1).strip()}")
        else:
            parts.append(f"rank {rank} failed first")
    elif crash is not None:
        parts.append(crash.group(1).strip())
    for event in errors:
        tail = "\n".join(str(event.get("traceback", "")).strip().splitlines()[-6:])
        parts.append(f"rank {event.get('rank')}: {event.get('error')}\n{tail}")
    if not parts:
        lines = [line for line in text.strip().splitlines() if "Error" in line]
        parts.append((lines[-1] if lines else text.strip()[-500:] or repr(error))[:2000])
    return "\n".join(parts)
