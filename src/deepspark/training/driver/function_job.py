"""`deepspark.run`: a user's own function or script on N ranks of the running Spark session.

Driver side. The checks run here before any job: the function pickles, the script exists, the
worker count fits the free task slots, the checkpoint directory is writable. DataFrames among
the arguments are replaced by `FrameHandle` objects and their rows become the barrier stage's
input (no copy to storage); inside the function `deepspark.shard` reads a rank's share. The
job itself goes through the engine's job runner (`jobs.run_job`): the same progress channel,
rendezvous, attempts and failure reports as `Estimator.fit`, with `rank._function_rank` as the
rank backend.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from deepspark.training.backend import Backend
from deepspark.training.driver.jobs import TrainingError
from deepspark.training.job_spec import RankLoop, ResultKind
from deepspark.training.run_spec import FrameHandle, RunSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["FunctionBackend", "RunError", "run"]


class RunError(TrainingError):
    """A `deepspark.run` job failed (after its allowed re-runs).

    Attributes
    ----------
    causes : list of str
        Per attempt, the rank that failed first and its exception.
    rank : int or None
        The rank that failed first in the last attempt.
    remote_traceback : str
        That rank's traceback, as it printed it.
    output : str
        That rank's last lines of output.
    """

    def __init__(
        self,
        message: str,
        causes: list[str],
        rank: int | None,
        remote_traceback: str,
        output: str,
    ):
        super().__init__(message, causes)
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.output = output


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def run(
    fn: Callable[..., Any] | str,
    *args: Any,
    num_workers: int | None = None,
    use_gpu: bool = False,
    max_failures: int = 0,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    max_log_lines: int = 1000,
    collective_timeout_s: float = 600.0,
    **kwargs: Any,
) -> Any:
    """Run `fn` on `num_workers` ranks of the running Spark session; return rank 0's result.

    The ranks run in one barrier stage. In each, ``torch.distributed`` is already initialised
    (gloo, or NCCL with ``use_gpu``) and the variables ``torchrun`` sets are set
    (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``), so existing DDP, Lightning and Hugging Face code runs unchanged. A
    Spark DataFrame among the arguments reaches the function as a handle; ``deepspark.shard``
    turns it into this rank's batches. What the ranks print reaches the driver with a
    ``[rank N]`` prefix.

    Parameters
    ----------
    fn : callable or str
        The function, or the path of a Python script (script mode, as
        ``TorchDistributor.run``: `args` are its command-line arguments, all strings; the script
        initialises ``torch.distributed`` itself, e.g. ``init_process_group("gloo")``).
    *args, **kwargs
        Passed to `fn`. DataFrames (also inside lists, tuples and dicts) become handles.
    num_workers : int, optional
        Ranks; default every free task slot.
    use_gpu : bool
        One GPU (or more) per rank as Spark assigns them (``spark.task.resource.gpu.amount``),
        mapped to ``CUDA_VISIBLE_DEVICES`` and the current device as `Estimator.fit` maps them.
    max_failures : int
        How many times a failed run is re-run (every failure counts, a bug in `fn` too, since
        a lost executor and a bug look alike from here). A re-run starts `fn` again; with
        ``deepspark.checkpoint`` / ``deepspark.restore`` it continues where it stopped.
    checkpoint_dir : str, optional
        fsspec URL for ``deepspark.checkpoint``; on a local master ``max_failures > 0`` gives
        the run a private one (removed afterwards).
    resume : bool
        Let the run start from checkpoints already in `checkpoint_dir` (otherwise refused, so
        that a new run never silently continues an old one).
    max_log_lines : int
        Lines of output each rank sends per attempt; later ones are counted, not sent.
    collective_timeout_s : float
        Bound on the ranks meeting and on every collective of the process group.

    Returns
    -------
    object
        What `fn` returned on rank 0 (``None`` in script mode).

    Raises
    ------
    RunError
        The run failed on its last attempt; the message names the rank that failed first, its
        exception and traceback.

    Examples
    --------
    >>> import deepspark as ds
    >>> def world(scale):
    ...     import torch, torch.distributed as dist
    ...     total = torch.tensor([float(dist.get_rank() + 1)])
    ...     dist.all_reduce(total)
    ...     return total.item() * scale
    >>> spark = ds.init_context(cores=2)  # doctest: +SKIP
    >>> ds.run(world, 10, num_workers=2)  # doctest: +SKIP
    30.0
    """
    import cloudpickle

    from deepspark.training.options import RecoveryOptions, RunOptions

    if isinstance(max_log_lines, bool) or not isinstance(max_log_lines, int) or max_log_lines < 0:
        raise ValueError(f"max_log_lines={max_log_lines!r}: give 0 or more")
    RunOptions(num_workers=num_workers, collective_timeout_s=collective_timeout_s).check()
    recovery = RecoveryOptions(
        checkpoint_dir=checkpoint_dir, resume=resume, max_failures=max_failures
    )
    recovery.check()
    script = _script(fn, args, kwargs)
    frames: list[DataFrame] = []
    args, kwargs = _handles((args, kwargs), frames)
    spark = _session(frames)
    num_workers = _workers(spark, num_workers)
    with _prepared_recovery(spark, recovery) as recovery:
        spec = RunSpec(
            world_size=num_workers,
            function_blob=None if script else _pickled(cloudpickle, fn, args, kwargs),
            script=script,
            script_args=tuple(args) if script else (),
            script_source=_source(script) if script else None,
            frames=tuple(_found_handles((args, kwargs))),
            use_gpu=bool(use_gpu),
            recovery=recovery,
            max_log_lines=max_log_lines,
            collective_timeout_s=float(collective_timeout_s),
            job_id=uuid.uuid4().hex[:12],
        )
        result = _run_stage(spark, _stage_input(spark, frames, num_workers), spec, max_failures)
    if script is not None:
        return None
    return cloudpickle.loads(result.payload(ResultKind.RETURN))


class FunctionBackend(Backend):
    """The engine's backend for a user's own function or script: its ranks run
    `rank._function_rank` (no model of the engine's to build; the function brings its own)."""

    loop = RankLoop.FUNCTION
    takes_creators = False


def _run_stage(spark: SparkSession, data: DataFrame, spec: RunSpec, max_failures: int) -> Any:
    """The job through the engine's job runner; a failure becomes a `RunError`."""
    from deepspark.training.driver.jobs import run_job

    printer = _Printer()
    try:
        return run_job(
            spark,
            data,
            spec,  # type: ignore[arg-type]  # the runner reads the fields both specs share
            loop=FunctionBackend.loop,
            max_failures=max_failures,
            progress=False,
            on_event=printer,
        )
    except TrainingError as error:
        raise printer.failure(error, spec) from error.__cause__


@contextlib.contextmanager
def _prepared_recovery(spark: SparkSession, recovery: Any) -> Iterator[Any]:
    """The run's checkpoint directory, checked as a fit's (`recovery.prepared_recovery`).

    A function need not checkpoint to be re-run (it starts again), so on a cluster re-runs
    without a directory are allowed; `deepspark.checkpoint` then says what is missing.
    """
    from deepspark.context.topology import master_of
    from deepspark.training.driver.recovery import prepared_recovery

    if recovery.checkpoint_dir is None and not master_of(spark).is_local:
        yield recovery
        return
    with prepared_recovery(spark, recovery) as prepared:
        yield prepared


def _script(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The script's path in script mode (checked), ``None`` for a function."""
    if callable(fn):
        return None
    if not isinstance(fn, (str, os.PathLike)):
        raise TypeError(
            f"deepspark.run(fn): give a function or a script's path, not {type(fn).__name__}"
        )
    path = os.fspath(fn)
    if not path.endswith(".py"):
        raise ValueError(f"deepspark.run({path!r}): a script is a Python file ending in .py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"deepspark.run({path!r}): no such script on the driver; give a path the driver "
            "can read (its text is sent to executors that lack the file)"
        )
    wrong = [repr(arg) for arg in args if not isinstance(arg, str)]
    if wrong or kwargs:
        raise TypeError(
            "deepspark.run(script, *args): a script's arguments are its command line, all "
            f"strings (e.g. '--lr', '0.01'); found {', '.join(wrong) or ''}"
            f"{' keyword arguments ' + str(sorted(kwargs)) if kwargs else ''}"
        )
    return os.path.abspath(path)


def _source(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _is_frame(value: Any) -> bool:
    return hasattr(value, "mapInArrow") and hasattr(value, "sparkSession")


def _handles(value: Any, frames: list[Any]) -> Any:
    """`value` with every Spark DataFrame replaced by a `FrameHandle` (each frame once)."""
    if _is_frame(value):
        for index, frame in enumerate(frames):
            if frame is value:
                return FrameHandle(index, tuple(frame.columns))
        frames.append(value)
        return FrameHandle(len(frames) - 1, tuple(value.columns))
    if isinstance(value, tuple):
        return tuple(_handles(item, frames) for item in value)
    if isinstance(value, list):
        return [_handles(item, frames) for item in value]
    if isinstance(value, dict):
        return {key: _handles(item, frames) for key, item in value.items()}
    return value


def _found_handles(value: Any) -> list[FrameHandle]:
    found: dict[int, FrameHandle] = {}

    def visit(item: Any) -> None:
        if isinstance(item, FrameHandle):
            found[item.index] = item
        elif isinstance(item, (tuple, list)):
            for part in item:
                visit(part)
        elif isinstance(item, dict):
            for part in item.values():
                visit(part)

    visit(value)
    return [found[index] for index in sorted(found)]


def _session(frames: list[Any]) -> SparkSession:
    from pyspark.sql import SparkSession

    from deepspark.context.session import current_session

    if frames:
        sessions = {id(frame.sparkSession) for frame in frames}
        if len(sessions) > 1:
            raise ValueError("deepspark.run: the DataFrames given belong to different sessions")
        return frames[0].sparkSession
    spark = current_session() or SparkSession.getActiveSession()
    if spark is None:
        raise RuntimeError(
            "deepspark.run runs its ranks as Spark tasks, and no Spark session is running; "
            "start one first with ds.init_context() (import deepspark as ds)"
        )
    return spark


def _workers(spark: SparkSession, num_workers: int | None) -> int:
    from deepspark.training.driver.checks import fit_workers

    # A run has no batch size to check against the worker count: the largest one passes.
    return fit_workers(spark, num_workers, sys.maxsize)


def _pickled(cloudpickle: Any, fn: Any, args: Any, kwargs: Any) -> bytes:
    try:
        return cloudpickle.dumps((fn, args, kwargs))
    except Exception as error:
        parts = [("fn", fn), *[(f"args[{i}]", arg) for i, arg in enumerate(args)]]
        parts += [(f"{key}=", value) for key, value in kwargs.items()]
        name = next((name for name, value in parts if not _pickles(cloudpickle, value)), "fn")
        raise TypeError(
            f"deepspark.run: {name} cannot be pickled to reach the ranks ({error}); pass plain "
            "values, or build objects such as sessions and open files inside the function"
        ) from error


def _pickles(cloudpickle: Any, value: Any) -> bool:
    try:
        cloudpickle.dumps(value)
    except Exception:
        return False
    return True


def _stage_input(spark: SparkSession, frames: list[Any], num_workers: int) -> DataFrame:
    """The barrier stage's rows: every DataFrame's, tagged by its index; or one row per rank."""
    if not frames:
        return spark.range(0, num_workers, 1, num_workers)
    from deepspark.training.driver.function_input import frames_input

    return frames_input(frames, num_workers)


class _Printer:
    """Prints the ranks' output on the driver with a rank prefix; keeps their error reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.errors: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "output":
            stream = sys.stderr if event.get("stream") == "stderr" else sys.stdout
            with self._lock:
                print(f"[rank {event.get('rank')}] {event.get('line', '')}", file=stream)
                stream.flush()
        elif kind == "error":
            with self._lock:
                self.errors.append(event)

    def failure(self, error: TrainingError, spec: RunSpec) -> RunError:
        """The run's error: the job runner's summary plus the first failing rank's traceback."""
        first = re.match(r"rank (\d+):", error.causes[-1]) if error.causes else None
        rank = int(first.group(1)) if first else None
        with self._lock:
            # the last report of that rank: the last attempt's
            reports = [event for event in self.errors if event.get("rank") == rank]
        report = reports[-1] if reports else None
        remote = str(report.get("traceback", "")) if report else ""
        output = str(report.get("output", "")) if report else ""
        message = str(error).replace(f"{spec.kind.value} failed", "deepspark.run failed", 1)
        if remote:
            message += f"\n\nrank {rank}'s traceback:\n{remote.rstrip()}"
        if output:
            message += f"\n\nrank {rank}'s last output:\n{output.rstrip()}"
        return RunError(message, error.causes, rank, remote, output)
