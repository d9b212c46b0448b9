"""Start Ray on the executors of deepspark's Spark application, and stop it with the session.

Ray's own ``ray.util.spark.setup_ray_cluster`` does the work: a head node beside the driver
and one Ray worker node inside each of a long-running Spark job's tasks. This module checks
the session and the arguments before anything starts, gives the nodes the environment they
need, connects the driver with ``ray.init`` and, in `stop`, ends what Ray's shutdown leaves
behind on this machine.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepspark.context.config import ClusterMode
from deepspark.context.session import on_stop_context
from deepspark.context.topology import hold_task_slots, master_of, task_cpus
from deepspark.ray.leftovers import CLUSTER_MARK, end_marked_processes
from deepspark.ray.preflight import (
    TEMP_PREFIX,
    RayOnSparkError,
    check_master,
    check_temp_dir,
    classic_session,
    node_memory,
    plan_nodes,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import ModuleType

    from pyspark.sql import SparkSession


__all__ = ["RayCluster", "current", "start", "stop"]

_log = logging.getLogger(__name__)

_HOOK_VARIABLE = "RAY_ON_SPARK_START_HOOK"
_HOOK_CLASS = "deepspark.ray.node_hook.NodeEnvironmentHook"
_HEAD_START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class RayCluster:
    """The Ray cluster `start` runs on the session's executors."""

    address: str
    """``host:port`` of the head node; what ``ray.init(address=...)`` takes."""
    cluster_id: str
    """Every process of the cluster has ``DEEPSPARK_RAY_CLUSTER=<cluster_id>`` in its
    environment."""
    num_workers: int
    cpus_per_worker: int
    temp_dir: str
    """This machine's root of the cluster's temporary files (sessions, spilled objects)."""
    log_dir: str | None


_lock = threading.Lock()
_running: RayCluster | None = None
_registered = False


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def start(
    num_workers: int | None = None,
    cpus_per_worker: int | None = None,
    *,
    memory_per_worker: int | str = "512m",
    object_store_memory_per_worker: int | str = "256m",
    temp_dir: str | None = None,
    log_dir: str | None = None,
    dashboard: bool = False,
) -> str:
    """Start a Ray cluster inside the Spark application and connect this driver to it.

    Each Ray worker node runs inside one Spark task and holds that task's slot (its executor
    cores) until `stop`: deepspark fits and other Spark jobs get only the slots Ray leaves
    free. The head node runs beside the driver with no CPUs, so every Ray task and actor runs
    on the executors. `deepspark.stop_context` stops Ray first; so does the end of the
    driver, and Ray's nodes end themselves when their Spark tasks or the driver die.

    Parameters
    ----------
    num_workers : int, optional
        Ray worker nodes to start; by default as many as fit in the application's task slots.
    cpus_per_worker : int, optional
        CPUs of each worker node (Spark cores its task holds). Default: an executor's cores
        (``spark.executor.cores``), so each executor hosts one node. In local mode every node
        gets ``spark.task.cpus`` CPUs and this must be left unset or equal to it.
    memory_per_worker, object_store_memory_per_worker : int or str
        Ray's heap and object store of each worker node (and of the head), in bytes or as a
        size such as ``"512m"`` or ``"2g"``. Small by default; the object store spills to
        `temp_dir` when full.
    temp_dir : str, optional
        Where the cluster keeps its session files and spilled objects: a new directory under
        it (default: the system temp directory) that `stop` removes on this machine.
    log_dir : str, optional
        Keep the Ray nodes' logs: they are copied here when the nodes stop.
    dashboard : bool
        Start Ray's dashboard on the head node (off by default).

    Returns
    -------
    str
        The head's ``host:port`` address (also in ``RAY_ADDRESS`` while Ray runs).

    Raises
    ------
    RayOnSparkError
        No classic Spark session (none started, or Spark Connect), a master Ray on Spark does
        not support (Kubernetes), or Ray already running in this process.
    ValueError
        A bad argument, or more worker nodes than the application's task slots hold.
    ImportError
        Ray is not installed (``pip install 'deepspark[ray]'``).

    Examples
    --------
    >>> import deepspark as ds, deepspark.ray
    >>> spark = ds.init_context(cores=2)  # doctest: +SKIP
    >>> deepspark.ray.start(num_workers=1)  # doctest: +SKIP
    '127.0.0.1:...'
    >>> ds.stop_context()  # doctest: +SKIP
    """
    global _running
    session = classic_session()
    master = master_of(session)
    check_master(master)
    ray = _import_ray()
    memory, object_store = node_memory(memory_per_worker, object_store_memory_per_worker)
    with _lock:
        if _running is not None:
            raise RayOnSparkError(
                f"Ray already runs on this Spark application (head {_running.address}); "
                "call deepspark.ray.stop() before starting another cluster"
            )
        if ray.is_initialized():
            raise RayOnSparkError(
                "this process is already connected to a Ray cluster (ray.init was called); "
                "call ray.shutdown() before deepspark.ray.start()"
            )
        cpus, num_workers = plan_nodes(session, num_workers, cpus_per_worker)
        check_temp_dir(temp_dir)
        cluster_id = uuid.uuid4().hex[:12]
        root = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=temp_dir)
        node_environment = {
            CLUSTER_MARK: cluster_id,
            # a library-started cluster does not report usage unless the user opts in
            "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        }
        if master.shares_machine:
            # Ray starts every node with the `ray` command of the node's PATH
            node_environment["PATH"] = _path_with(_python_bin_dirs(session))
        options: dict[str, Any] = {
            "max_worker_nodes": num_workers,
            "min_worker_nodes": num_workers,
            "memory_worker_node": memory,
            "object_store_memory_worker_node": object_store,
            "memory_head_node": memory,
            "object_store_memory_head_node": object_store,
            "head_node_options": {"include_dashboard": bool(dashboard)},
            "ray_temp_root_dir": root,
            "collect_log_to_path": log_dir,
        }
        if master.mode is not ClusterMode.LOCAL:
            # stage scheduling sizes each node's task; local mode has none (spark.task.cpus)
            options.update(num_cpus_worker_node=cpus, num_gpus_worker_node=0)
        address = _launch(ray, options, node_environment, cluster_id, root)
        _running = RayCluster(address, cluster_id, num_workers, cpus, root, log_dir)
        hold_task_slots("Ray on Spark", num_workers * _slots_per_node(session, cpus))
        _register_teardown()
    _log.info(
        "Ray runs %d worker node(s) of %d CPU(s) on the executors; head at %s",
        num_workers,
        cpus,
        address,
    )
    return address


def stop() -> None:
    """Disconnect, stop the Ray cluster `start` began, and end its leftover processes.

    Removes the cluster's temporary directory on this machine. Calling it again, or without a
    running cluster, does nothing.

    Examples
    --------
    >>> import deepspark.ray
    >>> deepspark.ray.stop()
    """
    global _running
    with _lock:
        cluster, _running = _running, None
        if cluster is None:
            return
        _shut_down(sys.modules.get("ray"))
        hold_task_slots("Ray on Spark", 0)
        signalled = end_marked_processes(cluster.cluster_id)
        if signalled:
            _log.info("deepspark.ray.stop: ended %d leftover Ray process(es)", signalled)
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _slots_per_node(session: SparkSession, cpus: int) -> int:
    """Task slots one worker node's Spark task takes: its CPUs over ``spark.task.cpus``."""
    return max(1, cpus // task_cpus(session))


def current() -> RayCluster | None:
    """The Ray cluster `start` runs, or ``None``."""
    with _lock:
        return _running


def _import_ray() -> ModuleType:
    try:
        import ray
        import ray.util.spark  # the cluster API; it needs Ray's default extra
    except ImportError as error:
        raise ImportError(
            f"deepspark.ray needs Ray on Spark ({error}): pip install 'deepspark[ray]'"
        ) from error
    return ray


def _python_bin_dirs(session: SparkSession) -> list[str]:
    """The bin directories of the workers' and the driver's Python (for the `ray` command)."""
    pythons = [session.sparkContext.pythonExec or sys.executable, sys.executable]
    return [os.path.dirname(os.path.abspath(python)) for python in pythons]


def _path_with(dirs: list[str]) -> str:
    entries = [*dirs, *os.environ.get("PATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(entry for entry in entries if entry))


@contextlib.contextmanager
def _start_environment(node_environment: dict[str, str]) -> Iterator[None]:
    """Have Ray load deepspark's start hook, and find `ray` for the head, while it starts."""
    from deepspark.ray.node_hook import NodeEnvironmentHook

    saved = {name: os.environ.get(name) for name in (_HOOK_VARIABLE, "PATH")}
    NodeEnvironmentHook.node_environment = dict(node_environment)
    os.environ[_HOOK_VARIABLE] = _HOOK_CLASS
    os.environ["PATH"] = _path_with([os.path.dirname(sys.executable)])
    try:
        yield
    finally:
        NodeEnvironmentHook.node_environment = {}
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _head_start_polled(timeout_s: float) -> Iterator[None]:
    """Wait for the head node by polling its port instead of Ray's fixed 20 s sleep.

    ``ray.util.spark`` (up to 2.60 at least) sleeps 20 s after launching the head and then
    checks its port once: 20 s lost on an idle machine, and a failed start on a loaded one
    where the head needs longer. While the cluster starts, the sleep is cut to a few seconds
    and the one check polls for up to `timeout_s`. Where a Ray version lacks these module
    names, Ray's own behaviour stays.
    """
    from ray.util.spark import cluster_init

    check = getattr(cluster_init, "is_port_in_use", None)
    sleep_s = getattr(cluster_init, "_RAY_HEAD_STARTUP_TIMEOUT", None)
    if not callable(check) or not isinstance(sleep_s, int | float):
        yield
        return

    def port_opens(host: str, port: int) -> bool:
        deadline = time.monotonic() + timeout_s
        while not check(host, port):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    cluster_init._RAY_HEAD_STARTUP_TIMEOUT = min(sleep_s, 3)
    cluster_init.is_port_in_use = port_opens
    try:
        yield
    finally:
        cluster_init._RAY_HEAD_STARTUP_TIMEOUT = sleep_s
        cluster_init.is_port_in_use = check


def _launch(
    ray: ModuleType,
    options: dict[str, Any],
    node_environment: dict[str, str],
    cluster_id: str,
    root: str,
) -> str:
    """setup_ray_cluster, then ray.init; on failure nothing of the cluster is left running."""
    from ray.util.spark import setup_ray_cluster

    try:
        with _start_environment(node_environment), _head_start_polled(_HEAD_START_TIMEOUT_S):
            address, _ = setup_ray_cluster(**options)
        ray.init(address=address)
    except BaseException as error:
        _shut_down(ray)
        end_marked_processes(cluster_id, grace_s=2.0)
        shutil.rmtree(root, ignore_errors=True)
        if isinstance(error, Exception):
            raise RayOnSparkError(f"Ray on Spark did not start: {error}") from error
        raise
    return address


def _shut_down(ray: ModuleType | None) -> None:
    """Ray's own teardown: disconnect, cancel the nodes' Spark job, stop the head."""
    if ray is None:
        return
    try:
        ray.shutdown()
    except Exception as error:  # the cluster still has to stop
        _log.warning("deepspark.ray: ray.shutdown failed: %s", error)
    from ray.util.spark import shutdown_ray_cluster

    try:
        shutdown_ray_cluster()
    except Exception as error:  # e.g. none left to stop after a failed start
        _log.debug("deepspark.ray: shutdown_ray_cluster: %s", error)


def _register_teardown() -> None:
    global _registered
    if not _registered:
        on_stop_context(_stop_with_session)
        atexit.register(stop)
        _registered = True


def _stop_with_session(session: SparkSession) -> None:
    stop()
