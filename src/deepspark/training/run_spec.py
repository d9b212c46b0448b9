"""The plain, picklable description of one `deepspark.run` job: a user's function or script.

Built on the driver (`driver.function_job`), shipped to every rank inside the Spark task
closure and read by `rank._function_rank`. Plain values and bytes only. The fields the engine's
job runner reads (`kind`, `world_size`, `attempt`, the progress address, ...) have the same
names as in `TrainSpec`, so one runner schedules and retries both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deepspark.training.job_spec import JobKind
from deepspark.training.options import RecoveryOptions

__all__ = ["FrameHandle", "RunSpec"]


@dataclass(frozen=True)
class FrameHandle:
    """What a rank's function receives in place of a Spark DataFrame passed to `deepspark.run`.

    The DataFrame's rows travel to the ranks through the run's barrier stage (each rank gets
    its share, spilled to local disk); `deepspark.shard` turns a handle into this rank's batches.

    Attributes
    ----------
    index : int
        Which of the run's DataFrames this is (its split in the stage's input).
    columns : tuple of str
        The DataFrame's columns.
    """

    index: int
    columns: tuple[str, ...]

    def __repr__(self) -> str:
        return f"FrameHandle(index={self.index}, columns={list(self.columns)})"


@dataclass
class RunSpec:
    """Everything a rank of a `deepspark.run` job needs."""

    world_size: int
    function_blob: bytes | None  # cloudpickle of (fn, args, kwargs); None in script mode
    script: str | None = None  # script mode: the file's path, as every executor sees it
    script_args: tuple[str, ...] = ()
    script_source: bytes | None = None  # the script's text, for executors that lack the file
    frames: tuple[FrameHandle, ...] = ()
    use_gpu: bool = False
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    max_log_lines: int = 1000  # per rank and attempt; later lines are counted, not sent
    max_line_chars: int = 2000
    collective_timeout_s: float = 600.0
    kind: JobKind = JobKind.RUN
    job_id: str = ""
    attempt: int = 0
    progress_address: tuple[str, int] | None = None
    progress_token: str = ""
    rendezvous_host: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every rank
