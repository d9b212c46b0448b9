"""What `deepspark.ray.start` checks before anything starts: the session, the master, the
arguments, and whether the asked-for Ray worker nodes fit in the application's task slots."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import TYPE_CHECKING

from deepspark.context.config import RAY_CLUSTER_MODES, ClusterMode
from deepspark.context.identity import is_connect
from deepspark.context.session import current_session
from deepspark.context.topology import SparkMaster, executor_layout, master_of, parse_master
from deepspark.errors import DeepsparkError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "SUPPORTED_MASTERS",
    "TEMP_PREFIX",
    "RayOnSparkError",
    "check_master",
    "check_temp_dir",
    "classic_session",
    "node_memory",
    "plan_nodes",
]

_log = logging.getLogger(__name__)

SUPPORTED_MASTERS = "local, local-cluster, standalone (spark://) and YARN masters"
TEMP_PREFIX = "dsray-"
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)i?b?", re.IGNORECASE)
_MIN_OBJECT_STORE_BYTES = 75 * 2**20  # Ray refuses a smaller object store
# Ray's longest socket path below the temp root ("/ray-<port>-<id>/session_<date>_<pid>/
# sockets/plasma_store"), and the limit of a Unix socket path
_SOCKET_SUFFIX_CHARS = 88
_SOCKET_PATH_LIMIT = 107


class RayOnSparkError(DeepsparkError, RuntimeError):
    """Ray cannot be started on this Spark session as asked."""


def check_master(master: str | SparkMaster) -> None:
    """Refuse, before anything starts, a master on which Ray on Spark cannot start nodes.

    Examples
    --------
    >>> check_master("local-cluster[2,1,1024]")
    >>> check_master("k8s://https://api:443")
    Traceback (most recent call last):
    ...
    deepspark.ray.preflight.RayOnSparkError: Ray on Spark (ray.util.spark) runs on local, ...
    """
    if isinstance(master, str):
        master = parse_master(master)
    if master.mode is ClusterMode.K8S:
        raise RayOnSparkError(
            f"Ray on Spark (ray.util.spark) runs on {SUPPORTED_MASTERS}; this session's master "
            f"is {master.url!r} (Kubernetes), where it cannot start Ray nodes. On Kubernetes run "
            "Ray with KubeRay, or use deepspark.automl for searches on Spark itself"
        )
    if master.mode not in RAY_CLUSTER_MODES:
        raise RayOnSparkError(
            f"Ray on Spark (ray.util.spark) runs on {SUPPORTED_MASTERS}; this session's master "
            f"is {master.url!r}"
        )


def classic_session() -> SparkSession:
    """The running classic SparkSession Ray starts on: deepspark's, else pyspark's active one."""
    session = current_session()
    if session is None:
        from pyspark.sql import SparkSession

        session = SparkSession.getActiveSession()
    if session is None:
        raise RayOnSparkError(
            "no Spark session: start one with deepspark.init_context() before "
            "deepspark.ray.start(), or pass ray=True to init_context"
        )
    if is_connect(session):
        raise RayOnSparkError(
            "Ray on Spark needs a classic SparkSession: it starts its nodes through the "
            "SparkContext, which a Spark Connect session does not have. Start the session with "
            "init_context('local'|'local-cluster'|'standalone'|'yarn') to run Ray"
        )
    return session


def node_memory(memory: int | str, object_store_memory: int | str) -> tuple[int, int]:
    """(heap, object store) bytes of each Ray node, from sizes such as ``"512m"``."""
    heap = _size_in_bytes(memory, "memory_per_worker")
    object_store = _size_in_bytes(object_store_memory, "object_store_memory_per_worker")
    if object_store < _MIN_OBJECT_STORE_BYTES:
        raise ValueError(
            f"object_store_memory_per_worker={object_store_memory!r}: Ray needs at least "
            "75 MiB of object store per node; give e.g. '256m'"
        )
    return heap, object_store


def _size_in_bytes(value: int | str, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(f"{name}={value!r}: give a size in bytes or such as '512m' or '2g'")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(match.group(1)) * scale


def check_temp_dir(temp_dir: str | None) -> None:
    """Ray's Unix sockets live under the temp root, and their paths must stay short."""
    base = os.path.abspath(temp_dir or tempfile.gettempdir())
    longest = len(os.path.join(base, TEMP_PREFIX + "x" * 8)) + _SOCKET_SUFFIX_CHARS
    if longest > _SOCKET_PATH_LIMIT:
        raise ValueError(
            f"temp_dir={temp_dir!r}: Ray's socket files under {base!r} would have paths longer "
            f"than the {_SOCKET_PATH_LIMIT} bytes a Unix socket allows; give a directory "
            f"with a path of at most {_SOCKET_PATH_LIMIT - _SOCKET_SUFFIX_CHARS - 15} "
            "characters, such as '/tmp'"
        )


def plan_nodes(
    session: SparkSession, num_workers: int | None, cpus_per_worker: int | None
) -> tuple[int, int]:
    """(CPUs per node, number of nodes), checked against the application's task slots."""
    for name, value in (("num_workers", num_workers), ("cpus_per_worker", cpus_per_worker)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{name}={value!r}: give a positive integer")
        if value is not None and value < 1:
            raise ValueError(f"{name}={value!r}: give a positive integer")
    layout = executor_layout(session)
    task_cpus, executors, executor_cores = (
        layout.task_cpus,
        layout.executors,
        layout.cores_per_executor,
    )
    if master_of(session).mode is ClusterMode.LOCAL:
        if cpus_per_worker not in (None, task_cpus):
            raise ValueError(
                f"cpus_per_worker={cpus_per_worker}: in local mode each Ray worker node gets "
                f"spark.task.cpus ({task_cpus}) CPUs; leave cpus_per_worker unset, or start "
                "the session with conf={'spark.task.cpus': ...}"
            )
        cpus = task_cpus
    else:
        cpus = cpus_per_worker or executor_cores
        if cpus > executor_cores:
            raise ValueError(
                f"cpus_per_worker={cpus}: an executor of this application has "
                f"{executor_cores} core(s), and a Ray worker node runs inside one executor; "
                f"give cpus_per_worker <= {executor_cores} or start bigger executors"
            )
    fitting = executors * (executor_cores // cpus)
    slots = executors * (executor_cores // task_cpus)
    if num_workers is None:
        num_workers = fitting
    if num_workers > fitting or fitting < 1:
        raise ValueError(
            f"num_workers={num_workers}: each Ray worker node holds {cpus} core(s) of one "
            f"executor for the cluster's life, and this application has {executors} "
            f"executor(s) of {executor_cores} core(s) ({slots} task slot(s)), room for "
            f"{fitting} node(s). Give num_workers <= {fitting}, or start the session with "
            "more executors or cores"
        )
    free = slots - num_workers * (cpus // task_cpus)
    _log.info("Ray takes %d of %d task slots; Spark jobs keep %d", slots - free, slots, free)
    return cpus, num_workers
