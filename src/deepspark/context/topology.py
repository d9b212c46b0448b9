"""What every floor asks of a Spark session, answered once.

Is the session a Spark Connect client or a classic one; what its master URL says (parsed once,
into a :class:`SparkMaster`); its deploy mode; how many executors it has, how many cores each,
and how many tasks can run at once (:class:`ExecutorLayout`); which address the driver's
servers listen on and the executors dial (:class:`DriverAddress`); and a key naming the
session. Training, inference, AutoML, Ray and the caches ask here instead of reading
``sparkContext.master``, ``spark.task.cpus`` or the session's module themselves, so one rule
answers each question everywhere (``tests/test_package_layout.py`` keeps it so).

Nothing here imports pyspark at module level: rank-side code reads :func:`local_ip` and
:func:`is_loopback_host` without it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepspark.context.config import (
    CONNECT_URL,
    K8S_URL,
    LOCAL_CLUSTER_URL,
    LOCAL_URL,
    STANDALONE_URL,
    ClusterMode,
    ContextError,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "DriverAddress",
    "ExecutorLayout",
    "SparkMaster",
    "deploy_mode",
    "driver_address",
    "executor_layout",
    "free_task_slots",
    "is_connect",
    "is_loopback_host",
    "local_ip",
    "master_of",
    "parse_master",
    "session_identity",
    "task_cpus",
    "task_slots",
]

# How long a classic cluster's first executor may take to register before counting fails.
EXECUTOR_REGISTRATION_TIMEOUT_S = 60.0
# Within this long of an application's start, executors still register: wait for a steady count.
EXECUTOR_SETTLE_S = 30.0
_STEADY_S = 2.0
_CONNECT_PORT = 15002


@dataclass(frozen=True)
class SparkMaster:
    """A master URL, parsed: which cluster manager, and what the URL itself fixes.

    Attributes
    ----------
    url : str
        The URL as Spark spells it.
    mode : ClusterMode or None
        The cluster manager the URL names (``LOCAL``, ``LOCAL_CLUSTER``, ``STANDALONE``,
        ``YARN``, ``K8S``, ``CONNECT`` for ``sc://``); None for one deepspark does not know.
    executors, cores_per_executor : int or None
        What a ``local[N]`` (one executor of N threads; ``*``: every CPU) or a
        ``local-cluster[E,C,M]`` URL fixes; None where the cluster manager decides.
    hosts : tuple of str
        The hosts of a ``spark://`` (standalone) or ``sc://`` (Connect) URL.

    Examples
    --------
    >>> master = parse_master("local-cluster[2,1,1024]")
    >>> master.mode.value, master.executors, master.cores_per_executor, master.is_local
    ('local-cluster', 2, 1, True)
    >>> parse_master("local[3]").cores_per_executor
    3
    >>> parse_master("spark://127.0.0.1:7077").shares_machine
    True
    """

    url: str
    mode: ClusterMode | None
    executors: int | None = None
    cores_per_executor: int | None = None
    hosts: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        """Local modes: every executor is this machine's (the driver's JVM, or its children)."""
        return self.mode in (ClusterMode.LOCAL, ClusterMode.LOCAL_CLUSTER)

    @property
    def shares_machine(self) -> bool:
        """Whether every executor runs on this machine: local modes, or a standalone master
        on loopback (its workers, started beside it, are this machine's too)."""
        if self.is_local:
            return True
        return self.mode is ClusterMode.STANDALONE and all(map(is_loopback_host, self.hosts))


def parse_master(url: str) -> SparkMaster:
    """Parse a Spark master URL (or a Connect ``sc://`` URL) once, for every caller.

    Parameters
    ----------
    url : str
        ``local``, ``local[N]``, ``local[*]``, ``local[N,F]``, ``local-cluster[E,C,M]``,
        ``spark://host:port[,host:port]``, ``yarn``, ``k8s://...`` or ``sc://host:port``.

    Returns
    -------
    SparkMaster
        With ``mode=None`` for a URL of another cluster manager.

    Examples
    --------
    >>> parse_master("yarn").mode.value
    'yarn'
    >>> parse_master("local").cores_per_executor
    1
    """
    url = (url or "").strip()
    local = LOCAL_URL.match(url)
    if local:
        threads = local.group(2)
        cores = (os.cpu_count() or 1) if threads == "*" else int(threads or 1)
        return SparkMaster(url, ClusterMode.LOCAL, 1, cores)
    if LOCAL_CLUSTER_URL.match(url):
        executors, cores = re.findall(r"\d+", url)[:2]
        return SparkMaster(url, ClusterMode.LOCAL_CLUSTER, int(executors), int(cores))
    if STANDALONE_URL.match(url):
        hosts = tuple(entry.rsplit(":", 1)[0] for entry in url[len("spark://") :].split(","))
        return SparkMaster(url, ClusterMode.STANDALONE, hosts=hosts)
    if url == "yarn":
        return SparkMaster(url, ClusterMode.YARN)
    if K8S_URL.match(url):
        return SparkMaster(url, ClusterMode.K8S)
    if CONNECT_URL.match(url):
        return SparkMaster(url, ClusterMode.CONNECT, hosts=(_connect_host(url),))
    return SparkMaster(url, None)


def _connect_host(url: str) -> str:
    """The host of ``sc://host:port/;params``."""
    host_port = url[len("sc://") :].split("/", 1)[0].split(";", 1)[0]
    return host_port.rsplit(":", 1)[0] if ":" in host_port else host_port


def is_connect(spark: Any) -> bool:
    """Whether `spark` (a session, or a DataFrame) is a Spark Connect client's object."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def session_identity(spark: Any) -> str:
    """A key naming `spark`'s workers: the application, or the Connect session.

    Per-session state (the workers' check, the DataFrame caches) is kept under it.
    """
    if is_connect(spark):
        return f"connect:{spark.session_id}"
    return f"classic:{spark.sparkContext.applicationId}"


def conf_value(spark: Any, key: str) -> str:
    """A Spark conf of `spark` as text, ``""`` when unset or when a Connect server will not
    show it."""
    try:
        return spark.conf.get(key, None) or ""
    except Exception:  # a Connect server may refuse to show a conf
        return ""


def _conf_number(spark: Any, key: str) -> float:
    try:
        return float(conf_value(spark, key) or 0)
    except ValueError:
        return 0.0


def master_of(spark: SparkSession) -> SparkMaster:
    """The master of the application behind `spark` (for Connect: the server's own master)."""
    if is_connect(spark):
        return parse_master(conf_value(spark, "spark.master"))
    return parse_master(spark.sparkContext.master)


def deploy_mode(spark: SparkSession) -> str:
    """``"client"`` (the driver runs in this process's JVM) or ``"cluster"``."""
    return conf_value(spark, "spark.submit.deployMode") or "client"


def task_cpus(spark: SparkSession) -> int:
    """The CPUs each task takes (``spark.task.cpus``, default 1)."""
    return max(1, int(_conf_number(spark, "spark.task.cpus") or 1))


@dataclass(frozen=True)
class ExecutorLayout:
    """How the application's executors are laid out, and how many tasks run at once.

    Attributes
    ----------
    executors : int
    cores_per_executor : int
    task_cpus : int
        ``spark.task.cpus``.
    task_slots : int
        Tasks that run at once: executors times ``cores_per_executor // task_cpus``, fewer
        where tasks ask for GPUs (``spark.task.resource.gpu.amount``) and executors have
        fewer; the most ranks one barrier stage can hold.
    """

    executors: int
    cores_per_executor: int
    task_cpus: int
    task_slots: int


def executor_layout(spark: SparkSession) -> ExecutorLayout:
    """The executors of the application behind `spark`, their cores and its task slots.

    A local master fixes the layout. On a classic cluster the registered executors are
    counted (waiting up to a minute for the first one and, in the application's first
    seconds, for their number to hold), and their cores come from
    ``spark.executor.cores`` or else the scheduler's own count of concurrent tasks. Over Spark
    Connect the server's ``spark.executor.instances`` and ``spark.executor.cores`` say it when
    static; otherwise a probe job reports the executors it ran on.

    Raises
    ------
    ContextError
        No executor registered with a classic cluster within
        :data:`EXECUTOR_REGISTRATION_TIMEOUT_S`.
    """
    master = master_of(spark)
    per_task = task_cpus(spark)
    if master.executors is not None and master.cores_per_executor is not None:
        executors, cores = master.executors, master.cores_per_executor
    elif not is_connect(spark):
        executors, cores = _classic_executors(spark, per_task)
    else:
        executors, cores = _connect_executors(spark)
    per_executor = cores // per_task
    task_gpus = _conf_number(spark, "spark.task.resource.gpu.amount")
    if task_gpus:
        executor_gpus = _conf_number(spark, "spark.executor.resource.gpu.amount")
        if master.mode is ClusterMode.LOCAL:  # the executor is the driver
            executor_gpus = executor_gpus or _conf_number(spark, "spark.driver.resource.gpu.amount")
        if executor_gpus:
            per_executor = min(per_executor, int(executor_gpus / task_gpus + 1e-9))
    return ExecutorLayout(executors, cores, per_task, max(1, executors * per_executor))


def _classic_executors(spark: SparkSession, per_task: int) -> tuple[int, int]:
    """(executors, cores each) of a classic application on a cluster manager."""
    context = spark.sparkContext
    tracker = context._jsc.sc()
    deadline = time.monotonic() + EXECUTOR_REGISTRATION_TIMEOUT_S
    while tracker.getExecutorIds().size() == 0:
        if time.monotonic() > deadline:
            raise ContextError(
                f"no executor registered with the application at {context.master} within "
                f"{EXECUTOR_REGISTRATION_TIMEOUT_S:g} s; check that the cluster has free "
                "cores and memory for an executor (spark.executor.cores, spark.executor.memory)"
            )
        time.sleep(0.5)
    executors = _settled_executor_count(spark, tracker)
    cores = int(_conf_number(spark, "spark.executor.cores"))
    if cores:
        return executors, cores
    # the scheduler knows the slots of executors that took every core of their worker
    profile = tracker.resourceProfileManager().defaultResourceProfile()
    slots = int(tracker.maxNumConcurrentTasks(profile))
    return executors, max(1, slots * per_task // executors)


def _settled_executor_count(spark: SparkSession, tracker: Any) -> int:
    """The registered executors; in an application's first seconds, once their number holds.

    Right after the session starts, a cluster's executors register one by one; counting the
    first alone would plan too few ranks. Later the count is taken as it is.
    """
    expected = int(_conf_number(spark, "spark.executor.instances"))
    settle_until = spark.sparkContext.startTime / 1000 + EXECUTOR_SETTLE_S
    count = int(tracker.getExecutorIds().size())
    steady_since = time.monotonic()
    while time.time() < settle_until and not (expected and count >= expected):
        if time.monotonic() - steady_since >= _STEADY_S:
            break
        time.sleep(0.25)
        now = int(tracker.getExecutorIds().size())
        if now != count:
            count, steady_since = now, time.monotonic()
    return count


def _connect_executors(spark: SparkSession) -> tuple[int, int]:
    """(executors, cores each) behind a Connect server whose master is a cluster manager."""
    cores = int(_conf_number(spark, "spark.executor.cores"))
    instances = int(_conf_number(spark, "spark.executor.instances"))
    dynamic = conf_value(spark, "spark.dynamicAllocation.enabled").lower() == "true"
    if instances and cores and not dynamic:
        return instances, cores
    from deepspark.context.workers import check_workers

    # The probe runs one task per core the server's scheduler knows; it reports the
    # executors (host and working directory) those tasks ran on.
    survey = check_workers(spark, survey=True)
    assert survey is not None
    executors = instances or survey.executors
    return executors, cores or max(1, survey.tasks // survey.executors)


def task_slots(spark: SparkSession) -> int:
    """How many tasks of `spark` can run at once (`ExecutorLayout.task_slots`)."""
    return executor_layout(spark).task_slots


def free_task_slots(spark: SparkSession) -> tuple[int, dict[str, int]]:
    """``(slots a new barrier stage can have, {holder: slots held})``.

    :func:`task_slots` less what long-running jobs of the session hold
    (`deepspark.context.session.hold_task_slots`: Ray on Spark's worker nodes); may be 0.
    """
    from deepspark.context.session import held_task_slots

    held = held_task_slots()
    return max(0, task_slots(spark) - sum(held.values())), held


@dataclass(frozen=True)
class DriverAddress:
    """Where a driver-side server listens (`bind`) and the address executors dial
    (`advertise`): one interface, never every one."""

    bind: str
    advertise: str


_LOOPBACK = DriverAddress("127.0.0.1", "127.0.0.1")


def driver_address(spark: SparkSession) -> DriverAddress:
    """The address this process's servers use to hear from `spark`'s executors.

    Loopback when every executor runs on this machine. A classic driver uses Spark's own
    ``spark.driver.bindAddress`` / ``spark.driver.host``. A Spark Connect client is not the
    server's driver: it listens on its address on the route to the Connect server, which the
    server's executors can reach.
    """
    master = master_of(spark)
    if not is_connect(spark):
        if master.shares_machine:
            return _LOOPBACK
        advertise = conf_value(spark, "spark.driver.host") or local_ip()
        return DriverAddress(conf_value(spark, "spark.driver.bindAddress") or advertise, advertise)
    server = spark.client.host.strip("[]")
    if is_loopback_host(server):
        if master.shares_machine:
            return _LOOPBACK
        return DriverAddress(local_ip(), local_ip())
    address = local_ip()
    if not os.environ.get("SPARK_LOCAL_IP"):
        # the interface this machine uses towards the server (UDP connect sends nothing)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError), udp:
            udp.connect((server, _CONNECT_PORT))
            address = udp.getsockname()[0]
    return DriverAddress(address, address)


def is_loopback_host(host: str) -> bool:
    """Whether `host` names this machine's loopback interface.

    Examples
    --------
    >>> is_loopback_host("localhost"), is_loopback_host("10.0.0.2")
    (True, False)
    """
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def _usable(address: str) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return parsed.version == 4 and not (parsed.is_loopback or parsed.is_unspecified)


def local_ip() -> str:
    """Return this host's address as other hosts of the cluster reach it.

    In order: the ``SPARK_LOCAL_IP`` environment variable (Spark's own setting, so deepspark
    agrees with Spark about which interface to use), then the first non-loopback IPv4 address
    the host name resolves to, then ``"127.0.0.1"`` (single-machine clusters).

    Examples
    --------
    >>> isinstance(local_ip(), str)
    True
    """
    configured = os.environ.get("SPARK_LOCAL_IP", "").strip()
    if configured:
        return configured
    for name in {socket.gethostname(), socket.getfqdn()}:
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        for info in infos:
            address = str(info[4][0])
            if _usable(address):
                return address
    return "127.0.0.1"
