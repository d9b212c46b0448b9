"""Create, reuse and stop the one SparkSession that deepspark works with."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

from deepspark.context.config import (
    ClusterMode,
    ContextConfig,
    ContextError,
    executor_path_with,
    resolve_spark_conf,
)
from deepspark.context.identity import is_connect
from deepspark.context.spark_versions import require_pyspark
from deepspark.context.topology import clear_held_task_slots, parse_master, task_slots
from deepspark.context.workers import DAEMON_CONF, PYTHON_CONF, WORKER_DAEMON, mark_workers_ready
from deepspark.context.workers import warm_workers as _warm_workers

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from pyspark.sql import SparkSession

__all__ = [
    "current_session",
    "init_context",
    "on_stop_context",
    "stop_context",
]

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_active: tuple[ContextConfig, SparkSession] | None = None
# Environment variables pyspark set for a session of ours and leaves behind after stop().
_leftover_env: set[str] = set()
_CONNECT_TOKEN = "SPARK_CONNECT_AUTHENTICATE_TOKEN"
# Called with the session in stop_context, before it stops (e.g. to free deepspark's caches).
_stop_hooks: list[Callable[[SparkSession], None]] = []
# Task slots that long-running jobs of this session keep busy (Ray's worker nodes): by holder.
# A lock of its own: stop hooks, which run under _lock, give slots back.

_JVM_MODES = {
    ClusterMode.LOCAL,
    ClusterMode.LOCAL_CLUSTER,
    ClusterMode.STANDALONE,
    ClusterMode.YARN,
    ClusterMode.K8S,
}


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def init_context(
    cluster_mode: str | ClusterMode = "local",
    *,
    master: str | None = None,
    cores: int | None = None,
    executor_cores: int | None = None,
    num_executors: int | None = None,
    executor_memory: str | None = None,
    driver_memory: str | None = None,
    conf: dict[str, Any] | None = None,
    app_name: str = "deepspark",
    container_image: str | None = None,
    python_env_archive: str | None = None,
    connect_timeout_s: float = 30.0,
    warm_workers: bool = True,
    ray: bool | dict[str, Any] = False,
) -> SparkSession:
    """Start (or reuse) the SparkSession that deepspark runs on.

    Parameters
    ----------
    cluster_mode : str
        One of ``"local"``, ``"local-cluster"``, ``"standalone"``, ``"yarn"``, ``"k8s"``,
        ``"connect"``, ``"spark-submit"``.
        Where the application runs. ``"local"`` runs Spark inside this process (``local[*]``, or
        ``local[cores]``); ``"local-cluster"`` starts ``num_executors`` executor JVMs on this
        machine; ``"standalone"``, ``"yarn"`` and ``"k8s"`` use that cluster manager;
        ``"connect"`` talks to a Spark Connect server (``master="sc://host:15002"``, or no
        master to start a local one); ``"spark-submit"`` adopts the session that
        ``spark-submit`` created.
    master : str, optional
        The master URL, when the mode needs one (``spark://host:7077``,
        ``k8s://https://host:443``, ``sc://host:15002``).
    cores : int, optional
        Local mode: worker threads. Standalone: the most cores the application takes.
    executor_cores, num_executors, executor_memory, driver_memory : optional
        Executor and driver resources (memory as a JVM size such as ``"2g"``).
    conf : dict, optional
        Extra Spark confs; they override deepspark's defaults.
    app_name : str
        The Spark application name.
    container_image : str, optional
        Kubernetes: the image executors run.
    python_env_archive : str, optional
        YARN/Kubernetes: a packed Python environment (``venv-pack``/``conda-pack``) shipped to
        every container and used as the workers' Python.
    connect_timeout_s : float
        How long to wait for a Spark Connect server to answer.
    warm_workers : bool
        Start Spark's Python workers right away and have them import torch, in a background
        job, so that the session's first fit or predict does not wait seconds for that.
    ray : bool or dict
        Also start a Ray cluster on the executors once the session is up: ``True`` for the
        defaults of `deepspark.ray.start`, or a dict of its arguments (``pip install
        'deepspark[ray]'``). The executors get the workers' Python ``bin`` directory on
        ``PATH`` (Ray starts its nodes with the ``ray`` command found there), and
        `stop_context` stops Ray before Spark. Not with ``"k8s"`` or ``"connect"``.

    Returns
    -------
    pyspark.sql.SparkSession

    Raises
    ------
    ValueError
        An unknown ``cluster_mode``, a malformed master URL, a bad resource value, or
        ``ray`` with a mode Ray on Spark does not run on.
    ContextError
        No Java found, or a Spark Connect server that does not answer in time.

    Examples
    --------
    >>> import deepspark as ds
    >>> spark = ds.init_context(cores=2)
    >>> spark.range(4).count()
    4
    >>> ds.stop_context()
    """
    global _active
    config = ContextConfig(
        cluster_mode=cluster_mode,
        master=master,
        cores=cores,
        executor_cores=executor_cores,
        num_executors=num_executors,
        executor_memory=executor_memory,
        driver_memory=driver_memory,
        conf=dict(conf or {}),
        app_name=app_name,
        container_image=container_image,
        python_env_archive=python_env_archive,
        connect_timeout_s=connect_timeout_s,
        ray=ray,
    )
    with _lock:
        if _active is not None:
            running_config, session = _active
            if _is_alive(session):
                if running_config != config:
                    warnings.warn(
                        "init_context: a deepspark session is already running; returning it "
                        "and ignoring the new arguments (call deepspark.stop_context() first "
                        "to start a different one)",
                        stacklevel=2,
                    )
                return session
            _active = None
        session = _create_session(config)
        _active = (config, session)
        if warm_workers:
            _warm_workers(session, lambda: task_slots(session))
    if config.ray is not False:  # outside the lock: Ray asks for current_session()
        _start_ray(config.ray)
    return session


def _start_ray(ray: bool | dict[str, Any]) -> None:
    """``init_context(ray=...)``: start Ray on Spark once the session is up.

    Ray on Spark is the one capability a session starts when asked; its package is loaded by
    name, only then, so that neither an import of it here (it stands above this floor) nor a
    registration when it is imported is needed.
    """
    import importlib

    start = importlib.import_module("deepspark.ray").start
    start(**({} if ray is True else dict(ray)))


def stop_context() -> None:
    """Stop the session started by `init_context`; calling it again does nothing.

    Examples
    --------
    >>> import deepspark as ds
    >>> ds.stop_context()
    >>> ds.stop_context()
    """
    global _active
    with _lock:
        if _active is None:
            return
        _, session = _active
        _active = None
        for hook in list(_stop_hooks):
            try:
                hook(session)
            except Exception as error:  # the session stops anyway, and frees what it holds
                _log.warning("stop_context: %s failed: %s", getattr(hook, "__name__", hook), error)
        try:
            session.stop()
        except Exception as error:  # a session whose JVM already died cannot stop cleanly
            _log.warning("stop_context: the session did not stop cleanly: %s", error)
        if is_connect(session) and "SPARK_REMOTE" not in os.environ:
            # pyspark marks the process Connect-only for a remote server and leaves the mark
            # after stop(); a later classic init_context would then fail
            os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)
        while _leftover_env:
            os.environ.pop(_leftover_env.pop(), None)
        clear_held_task_slots()


def on_stop_context(hook: Callable[[SparkSession], None]) -> None:
    """Have `stop_context` call ``hook(session)`` before it stops the session (once per hook).

    Modules that keep something per session (`deepspark.data.cache`) register here, so that
    what they hold is freed with the session.
    """
    with _lock:
        if hook not in _stop_hooks:
            _stop_hooks.append(hook)


def worker_python(master: str | None, conf: dict[str, str]) -> str | None:
    """The interpreter `init_context` gives Spark's Python workers, or None to leave Spark's.

    A ``spark.pyspark.python`` conf wins, then the ``PYSPARK_PYTHON`` environment variable
    (Spark's own order); without either, executors that share this machine (``local``,
    ``local-cluster``, a standalone master on loopback) run this very interpreter.

    Examples
    --------
    >>> worker_python("yarn", {"spark.pyspark.python": "./environment/bin/python"})
    './environment/bin/python'
    >>> worker_python("k8s://https://api:443", {}) is None
    True
    """
    if conf.get(PYTHON_CONF):
        return conf[PYTHON_CONF]
    if os.environ.get("PYSPARK_PYTHON"):
        return None
    if master is not None and parse_master(master).shares_machine:
        return sys.executable
    return None


def current_session() -> SparkSession | None:
    """The running session `init_context` started, or ``None`` when there is none.

    For code that needs a session without being handed a DataFrame (converting a pandas
    DataFrame or numpy arrays to Spark, say).
    """
    with _lock:
        active = _active
    if active is None or not _is_alive(active[1]):
        return None
    return active[1]


def _is_alive(session: SparkSession) -> bool:
    if is_connect(session):
        return not getattr(session.client, "is_closed", False)
    return session.sparkContext._jsc is not None


def _create_session(config: ContextConfig) -> SparkSession:
    """Build the session; executors that share this machine run this interpreter."""
    spark_conf = resolve_spark_conf(config)
    master = spark_conf.get("spark.master") or config.master or ""
    python = None
    if config.cluster_mode is not ClusterMode.SPARK_SUBMIT:
        python = worker_python(master, spark_conf)
    if python is not None:
        spark_conf[PYTHON_CONF] = python
        if config.ray is not False:
            spark_conf.setdefault(
                "spark.executorEnv.PATH", executor_path_with(python, config.cluster_mode)
            )
    if python == sys.executable and parse_master(master).shares_machine:
        # the workers run this interpreter, so this deepspark: their daemon imports torch first
        spark_conf.setdefault(DAEMON_CONF, WORKER_DAEMON)
    with _jvm_python(python):
        session = _build_session(config, spark_conf)
    if python is None:
        return session
    if not is_connect(session):
        # PySpark reads PYSPARK_PYTHON once and ignores spark.pyspark.python unless
        # spark-submit launched it; the SparkContext's own setting reaches every task.
        session.sparkContext.pythonExec = python
    if (
        python == sys.executable
        and parse_master(master).shares_machine
        and _workers_run(session, python)
    ):
        mark_workers_ready(session)
    return session


@contextlib.contextmanager
def _jvm_python(python: str | None) -> Iterator[None]:
    """Let a JVM launched now see ``PYSPARK_PYTHON=python``; this process's env is restored.

    A local Spark Connect server plans Python functions with the ``PYSPARK_PYTHON`` of its
    JVM's environment, which is fixed when the JVM starts.
    """
    if python is None or "PYSPARK_PYTHON" in os.environ:
        yield
        return
    os.environ["PYSPARK_PYTHON"] = python
    try:
        yield
    finally:
        os.environ.pop("PYSPARK_PYTHON", None)


def _workers_run(session: SparkSession, python: str) -> bool:
    """Whether the session's workers start `python`.

    A local Connect server runs in this process's JVM, which may have started before with
    another environment; then the first job checks the workers instead.
    """
    if not is_connect(session):
        return True
    from pyspark import SparkContext

    jvm = SparkContext._jvm
    return jvm is not None and jvm.java.lang.System.getenv("PYSPARK_PYTHON") == python


def _build_session(config: ContextConfig, spark_conf: dict[str, str]) -> SparkSession:
    from pyspark.sql import SparkSession

    mode = config.cluster_mode
    if mode is ClusterMode.SPARK_SUBMIT:
        active = SparkSession.getActiveSession()
        if active is not None:
            return active
        if "SPARK_SUBMIT_OPTS" not in os.environ and "PYSPARK_GATEWAY_PORT" not in os.environ:
            raise ContextError(
                "cluster_mode='spark-submit' adopts the session spark-submit creates, but this "
                "process was not started by spark-submit; run `spark-submit your_script.py` or "
                "choose another cluster_mode"
            )
        return SparkSession.builder.getOrCreate()
    if mode is ClusterMode.CONNECT:
        assert config.master is not None
        # Connect clients before 4.0 lack what deepspark's jobs use there (Arrow results, the
        # barrier mapInArrow over Connect), and 3.5's local server downloads its jar at start.
        require_pyspark((4, 0), "Spark Connect (init_context(cluster_mode='connect'))")
        if config.master.startswith("sc://"):
            _wait_for_connect_server(config.master, config.connect_timeout_s)
        else:
            _require_java()
        builder = SparkSession.builder.remote(config.master)
        for key, value in spark_conf.items():
            builder = builder.config(key, value)
        if not config.master.startswith("sc://") and _CONNECT_TOKEN not in os.environ:
            # pyspark gives the local server a token through the environment and keeps it
            # there; a later connection to another server would then present it (over TLS)
            _leftover_env.add(_CONNECT_TOKEN)
        with warnings.catch_warnings():
            # A local Connect server takes static confs at start; the client then also tries to
            # set them at run time and warns that it cannot, which is expected.
            warnings.filterwarnings("ignore", message=".*CANNOT_MODIFY_(STATIC_)?CONFIG.*")
            if not config.master.startswith("sc://"):
                return builder.getOrCreate()
            return _connect_bounded(builder, config.master, config.connect_timeout_s)
    _require_java()
    builder = SparkSession.builder
    for key, value in spark_conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _require_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(os.path.join(java_home, "bin", "java"), os.X_OK):
        return
    if shutil.which("java"):
        return
    raise ContextError(
        "no Java found: Spark needs a Java 17 or 21 runtime. Install one "
        "(`apt-get install openjdk-17-jre-headless`, `brew install openjdk@17`, or "
        "`conda install openjdk=17`) and put `java` on PATH or set JAVA_HOME"
    )


def _connect_bounded(builder: Any, url: str, timeout_s: float) -> SparkSession:
    """Make the Connect session and ask the server once, within `timeout_s`.

    A port that accepts but never answers (a wrong token, TLS on one side only) would make the
    client retry for many minutes; here it fails with a message instead.
    """
    outcome: list[Any] = []

    def connect() -> None:
        try:
            session = builder.getOrCreate()
            session.version  # noqa: B018 (one request to the server)
            outcome.append(session)
        except BaseException as error:
            outcome.append(error)

    connecting = threading.Thread(target=connect, name="deepspark-connect", daemon=True)
    connecting.start()
    connecting.join(timeout_s)
    if outcome and not isinstance(outcome[0], BaseException):
        return outcome[0]
    _close_clients_of(url)
    cause = outcome[0] if outcome else None
    if cause is None:
        detail = f"no answer within {timeout_s:g} s"
    else:
        detail = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:300]}"
    raise ContextError(
        f"the Spark Connect server at {url} accepts connections but did not answer a request "
        f"({detail}). Check the URL's token (;token=...) and TLS (;use_ssl=true) against the "
        "server's settings, and that SPARK_CONNECT_AUTHENTICATE_TOKEN is not left over from "
        "another server; connect_timeout_s bounds this wait"
    ) from cause


def _close_clients_of(url: str) -> None:
    """Close the Connect clients a failed connection left retrying, so that neither their
    retries nor their clean-up at exit wait on a server that does not answer."""
    import gc

    from pyspark.sql.connect.client import SparkConnectClient

    endpoint = url[len("sc://") :].split("/", 1)[0].split(";", 1)[0]
    with warnings.catch_warnings():  # isinstance() touches deprecated module attributes
        warnings.simplefilter("ignore")
        clients = [obj for obj in gc.get_objects() if isinstance(obj, SparkConnectClient)]
    for client in clients:
        builder = getattr(client, "_builder", None)
        if not client.is_closed and getattr(builder, "endpoint", None) == endpoint:
            with contextlib.suppress(Exception):
                client.close()


def _wait_for_connect_server(url: str, timeout_s: float) -> None:
    """Fail fast with a clear message when nothing listens at a Spark Connect URL."""
    host_port = url[len("sc://") :].split("/", 1)[0].split(";", 1)[0]
    host, _, port_text = host_port.partition(":")
    port = int(port_text) if port_text else 15002
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 2.0)):
                return
        except OSError as error:
            last_error = error
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    raise ContextError(
        f"the Spark Connect server at {url} did not answer within {timeout_s:g} s "
        f"({last_error}); start it with `start-connect-server.sh` or check the host and port"
    )
