"""Which Python the Spark workers run, and whether it can run deepspark.

Spark starts its Python workers with ``PYSPARK_PYTHON`` (or ``python3`` on the executors'
``PATH``), not with the driver's interpreter. Where driver and executors share a machine,
`init_context` hands the workers the driver's own interpreter
(`deepspark.context.session.worker_python`) and the workers need no check. Everywhere else the
first job of a session runs :func:`check_workers`: one small task per slot reports its
interpreter and the versions of deepspark, torch and pyarrow it can import, and a mismatch
raises one `WorkerEnvironmentError` that says what to fix, instead of
a training job failing with a worker's traceback.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepspark.context.config import ContextError
from deepspark.context.identity import is_connect, session_identity

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import pyarrow as pa
    from pyspark.sql import SparkSession

__all__ = [
    "WorkerEnvironmentError",
    "WorkerReport",
    "WorkerSurvey",
    "check_workers",
    "mark_workers_ready",
    "warm_modules",
    "warm_workers",
]

# What every worker must import, at the driver's version.
REQUIRED_PACKAGES = ("deepspark", "torch", "pyarrow")
PYTHON_CONF = "spark.pyspark.python"

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_surveys: dict[str, WorkerSurvey] = {}
_ready: set[str] = set()

# A failed probe job names the module a worker could not import, or the interpreter Spark
# could not start, or a Python version the worker does not share with the driver.
_MISSING_MODULE = re.compile(r"(?:ModuleNotFoundError|ImportError): [^\n]*")
_NO_PROGRAM = re.compile(r'Cannot run program "([^"]+)"[^\n]*')
_VERSION_MISMATCH = re.compile(r"[^\n]*(?:PYTHON_VERSION_MISMATCH|different minor versions)[^\n]*")


class WorkerEnvironmentError(ContextError):
    """Spark's Python workers run an interpreter that cannot run deepspark's tasks."""


@dataclass(frozen=True)
class WorkerReport:
    """What one probe task saw in its Python worker."""

    python: str
    python_version: str
    host: str
    executor: str
    task_cpus: int
    versions: dict[str, str | None]

    def problems(self, expected: dict[str, str]) -> list[str]:
        """One phrase per package that is missing or at another version than the driver's."""
        found = []
        for name, wanted in expected.items():
            version = self.versions.get(name)
            if version is None:
                found.append(f"{name} is missing (the driver has {wanted})")
            elif _release(version) != _release(wanted):
                found.append(f"{name} {version} (the driver has {wanted})")
        return found


@dataclass(frozen=True)
class WorkerSurvey:
    """Every probe task's report: the workers' environment and the executors that ran them."""

    reports: tuple[WorkerReport, ...]

    @property
    def executors(self) -> int:
        """Distinct executors (host and working directory) that ran a probe task."""
        return max(1, len({(report.host, report.executor) for report in self.reports}))

    @property
    def tasks(self) -> int:
        return len(self.reports)


def mark_workers_ready(spark: SparkSession) -> None:
    """Record that `spark`'s workers run this interpreter, so `check_workers` skips them."""
    with _lock:
        _ready.add(session_identity(spark))


def check_workers(spark: SparkSession, *, survey: bool = False) -> WorkerSurvey | None:
    """Check, once per session, that Spark's Python workers can run deepspark's tasks.

    Sessions whose workers `init_context` gave this interpreter are not probed (None is
    returned) unless ``survey`` asks for the executors' report anyway.

    Raises
    ------
    WorkerEnvironmentError
        When a worker lacks deepspark, torch or pyarrow, has another version of one of them,
        or cannot be started at all; the message names the worker's interpreter and the fix.

    Examples
    --------
    >>> import deepspark as ds
    >>> from deepspark.context import check_workers
    >>> spark = ds.init_context(cores=2)
    >>> check_workers(spark) is None  # local: the workers run this interpreter, no probe
    True
    >>> check_workers(spark, survey=True).tasks >= 1
    True
    >>> ds.stop_context()
    """
    key = session_identity(spark)
    with _lock:
        if key in _surveys:
            return _surveys[key]
        if key in _ready and not survey:
            return None
    expected = driver_versions()
    result = _run_probe(spark, expected)
    bad = [(report, report.problems(expected)) for report in result.reports]
    bad = [(report, problems) for report, problems in bad if problems]
    if bad:
        report, problems = bad[0]
        raise WorkerEnvironmentError(
            f"Spark's Python workers cannot run deepspark: the worker on {report.host} runs "
            f"{report.python} (Python {report.python_version}), where "
            f"{'; '.join(problems)}. {_fix_hint(expected, spark)}"
        )
    with _lock:
        _surveys[key] = result
    return result


# What the first fit or predict of a session imports, seconds of it on a small machine: torch's
# first optimizer imports torch._dynamo, the first metric torchmetrics. A training rank's modules
# are named here as data (imported by name in the workers, never by this module). The workers'
# daemon (`deepspark.context.worker_daemon`) imports these before it forks; the warm-up imports
# them in workers whose daemon has not (a cluster's), and others added with `warm_modules`.
TASK_MODULES = (
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "torch._dynamo",
    "torchmetrics",
    "deepspark.data",
    "deepspark.training.rank.run",
    "deepspark.training.rank.loop",
    "deepspark.training.rank.metrics",
)
# The Spark conf that names the module Spark's workers fork from, and deepspark's.
DAEMON_CONF = "spark.python.daemon.module"
WORKER_DAEMON = "deepspark.context.worker_daemon"
_warm_worker_modules = list(TASK_MODULES)
# the driver's checks update every metric once: torchmetrics there too
_warm_driver_modules = ["torch._dynamo", "deepspark.training.rank.metrics"]


def warm_modules(*names: str, driver: bool = False) -> None:
    """Have `warm_workers` import `names` in the workers (and on the driver, with ``driver``)."""
    with _lock:
        for name in names:
            if name not in _warm_worker_modules:
                _warm_worker_modules.append(name)
            if driver and name not in _warm_driver_modules:
                _warm_driver_modules.append(name)


def warm_workers(spark: SparkSession, count_slots: Callable[[], int]) -> threading.Thread | None:
    """Start the session's Python workers and import torch and the tasks' modules in them.

    A fresh worker spends seconds importing torch, torch._dynamo (the first optimizer) and
    torchmetrics before its first task can start; Spark keeps idle workers and hands them later
    tasks, so a worker that has imported them once serves every later job warm. One task per
    task slot runs in a background job, on a daemon thread; another imports the
    driver's share of the same modules meanwhile. A failure only logs (the first job's own check
    reports a broken worker environment). Spark Connect sessions are not warmed: their workers
    are the server's.

    Returns
    -------
    threading.Thread or None
        The thread running the job, or ``None`` for a Connect session.
    """
    if is_connect(spark):
        return None
    with _lock:
        on_workers, on_driver = tuple(_warm_worker_modules), tuple(_warm_driver_modules)

    def warm() -> None:
        try:
            tasks = count_slots()  # here: a cluster's executors may still be registering
            job = spark.range(0, tasks, 1, tasks).mapInArrow(_warm_task(on_workers), "ready long")
            job.collect()
        except Exception as error:  # a stopped session, a broken worker environment
            _log.debug("warming the Python workers did not finish: %s", error)

    def warm_driver() -> None:
        for name in on_driver:  # while the user's program goes on
            try:
                importlib.import_module(name)
            except Exception as error:
                _log.debug("warming the driver: %s did not import: %s", name, error)

    threading.Thread(target=warm_driver, name="deepspark-warm-driver", daemon=True).start()
    thread = threading.Thread(target=warm, name="deepspark-warm-workers", daemon=True)
    thread.start()
    return thread


def _warm_task(modules: tuple[str, ...]) -> Callable[[Iterator[pa.RecordBatch]], Any]:
    """The warm-up job's task: import ``modules`` in a worker (a nested function, shipped by
    value)."""

    def warm(batches):
        import contextlib
        import importlib

        import pyarrow as pa

        for _ in batches:
            pass
        for name in modules:
            # a module a worker lacks is for the real job's check to report
            with contextlib.suppress(Exception):
                importlib.import_module(name)
        yield pa.RecordBatch.from_pydict({"ready": [1]})

    return warm


def driver_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in REQUIRED_PACKAGES}


def _fix_hint(expected: dict[str, str], spark: Any = None) -> str:
    wanted = ", ".join(f"{name}=={version}" for name, version in expected.items())
    hint = (
        f"Make every executor run a Python with {wanted}: set PYSPARK_PYTHON (or the conf "
        f"{PYTHON_CONF}) to that interpreter, or ship a packed environment with "
        "init_context(python_env_archive='env.tar.gz')"
    )
    if spark is not None and type(spark).__module__.startswith("pyspark.sql.connect"):
        # A local Connect server started by hand (builder.remote("local[2]")) runs its workers
        # with the system's python; init_context starts one with this interpreter's.
        hint += (
            ". For a local Spark Connect server, the one line that sets this up is "
            'ds.init_context(cluster_mode="connect")'
        )
    return hint


def _release(version: str) -> str:
    """``2.13.0+cpu`` and ``2.13.0+cu124`` are the same release for a worker."""
    return version.split("+", 1)[0]


def _run_probe(spark: SparkSession, expected: dict[str, str]) -> WorkerSurvey:
    # As many tasks as the cluster's default parallelism, so the probe reaches every executor.
    data = spark.range(1 << 16)
    probe = _probe_task(tuple(expected))
    try:
        rows = data.mapInArrow(probe, "report string").collect()
    except Exception as error:
        text = str(error)
        patterns = (_NO_PROGRAM, _MISSING_MODULE, _VERSION_MISMATCH)
        found = next((match for p in patterns if (match := p.search(text))), None)
        if found is None:
            raise
        raise WorkerEnvironmentError(
            f"Spark's Python workers cannot run deepspark: the workers run "
            f"{_configured_python(spark)}, which failed with {found.group(0).strip()!r}. "
            f"{_fix_hint(expected, spark)}"
        ) from error
    reports = []
    for row in rows:
        fields = json.loads(row.report)
        reports.append(WorkerReport(**fields))
    return WorkerSurvey(tuple(reports))


def _configured_python(spark: Any) -> str:
    """The interpreter this session asks the workers to run, as far as the driver knows."""
    if not is_connect(spark):
        return repr(spark.sparkContext.pythonExec)
    try:
        configured = spark.conf.get(PYTHON_CONF, None)
    except Exception:  # a Connect server may refuse to show a conf
        configured = None
    if configured:
        return repr(configured)
    return "the Connect server's PYSPARK_PYTHON (python3 on the executors' PATH by default)"


def _probe_task(packages: tuple[str, ...]) -> Callable[[Iterator[pa.RecordBatch]], Any]:
    """The probe's task function.

    A nested function, so cloudpickle ships it by value: a worker without deepspark can run it
    and say so. It uses the standard library, pyarrow (which `mapInArrow` itself needs) and
    pyspark's TaskContext only.
    """

    def probe(batches):
        import importlib.metadata
        import importlib.util
        import json
        import platform
        import socket
        import time

        import pyarrow as pa
        from pyspark import TaskContext

        for _ in batches:
            pass
        time.sleep(0.2)  # long enough that one executor cannot take every probe task
        versions = {}
        for name in packages:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            version = None
            if found:
                try:
                    version = importlib.metadata.version(name)
                except importlib.metadata.PackageNotFoundError:
                    version = "unknown"
            versions[name] = version
        context = TaskContext.get()
        report = {
            "python": sys.executable,
            "python_version": platform.python_version(),
            "host": socket.gethostname(),
            "executor": os.getcwd(),
            "task_cpus": int(context.cpus()) if context is not None else 1,
            "versions": versions,
        }
        yield pa.RecordBatch.from_pydict({"report": [json.dumps(report)]})

    return probe
