"""Shared fixtures: real Spark sessions of each kind, and a real standalone cluster.

A Python process holds one JVM-backed Spark session at a time, so the session fixtures share
one switch: asking for another kind stops the current session first. Tests are ordered by the
kind they use, so each kind starts about once per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import deepspark as ds

# Executors and Python workers must run this interpreter, the one with deepspark installed.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

SESSION_KINDS = ("spark", "local_cluster_spark", "connect_spark", "standalone_spark")


class _SessionSwitch:
    """Keeps at most one session alive; switching kind stops the previous one."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.session = None

    def get(self, kind: str, start) -> object:
        if self.kind == kind and self.session is not None and _alive(self.session):
            return self.session
        self.stop()
        self.session = start()
        self.kind = kind
        return self.session

    def stop(self) -> None:
        ds.stop_context()
        if self.session is not None:
            # the session may already be gone with its JVM
            with contextlib.suppress(Exception):
                self.session.stop()
        self.session, self.kind = None, None


def _alive(session) -> bool:
    if type(session).__module__.startswith("pyspark.sql.connect"):
        return not getattr(session.client, "is_closed", False)
    return session.sparkContext._jsc is not None


_switch = _SessionSwitch()


def pytest_collection_modifyitems(config, items):
    def kind_rank(item) -> int:
        names = getattr(item, "fixturenames", ())
        for rank, kind in enumerate(SESSION_KINDS, start=1):
            if kind in names:
                return rank
        return 0

    items.sort(key=kind_rank)


def pytest_sessionfinish(session, exitstatus):
    _switch.stop()


@pytest.fixture
def spark():
    """A `local[2]` session, created through deepspark's own `init_context`."""
    return _switch.get("spark", lambda: ds.init_context(cores=2, app_name="deepspark-tests"))


@pytest.fixture
def local_cluster_spark():
    """Two executor JVMs with one core each: real process boundaries on one machine."""
    return _switch.get(
        "local_cluster_spark",
        lambda: ds.init_context(
            "local-cluster",
            num_executors=2,
            executor_cores=1,
            executor_memory="1024m",
            app_name="deepspark-tests-local-cluster",
        ),
    )


CONNECT_PORT = 15002  # where pyspark's client looks for a local Connect server


def _wait_for_connect_port(timeout_s: float = 60.0) -> None:
    """Another test run on this machine may hold the port a local Connect server needs."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", CONNECT_PORT))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"port {CONNECT_PORT} stayed busy for {timeout_s:g} s: another Spark "
                        "Connect server runs on this machine"
                    ) from None
        time.sleep(1.0)


@pytest.fixture
def connect_spark():
    """A Spark Connect client talking to a local Connect server (`remote("local[2]")`)."""
    if _switch.kind != "connect_spark":
        _switch.stop()
        _wait_for_connect_port()
    return _switch.get(
        "connect_spark",
        lambda: ds.init_context("connect", master="local[2]", app_name="deepspark-tests-connect"),
    )


# ---------------------------------------------------------------------------------------------
# A real standalone cluster on loopback: one Master and two Workers.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spark_class() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


@dataclass
class StandaloneCluster:
    master_url: str
    master_ui_port: int
    work_dirs: list[Path]
    processes: list[subprocess.Popen] = field(default_factory=list)
    log_dir: Path | None = None

    def state(self) -> dict:
        url = f"http://127.0.0.1:{self.master_ui_port}/json/"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def alive_workers(self) -> int:
        return int(self.state().get("aliveworkers", 0))

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def logs(self) -> str:
        if self.log_dir is None:
            return ""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def start_standalone_cluster(workers: int = 2, startup_timeout_s: float = 90.0):
    root = Path(tempfile.mkdtemp(prefix="deepspark-standalone-"))
    env = dict(os.environ)
    env.update(
        {
            "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_LOG_DIR": str(root),
            "SPARK_WORKER_DIR": str(root / "work"),
            "PYSPARK_PYTHON": sys.executable,
        }
    )
    master_port, ui_port = free_port(), free_port()
    master_url = f"spark://127.0.0.1:{master_port}"
    cluster = StandaloneCluster(master_url, ui_port, [], log_dir=root)
    try:
        cluster.processes.append(
            _spawn(
                [
                    spark_class(),
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(master_port),
                    "--webui-port",
                    str(ui_port),
                ],
                root / "master.log",
                env,
            )
        )
        for index in range(workers):
            work_dir = root / f"worker-{index}"
            work_dir.mkdir()
            cluster.work_dirs.append(work_dir)
            cluster.processes.append(
                _spawn(
                    [
                        spark_class(),
                        "org.apache.spark.deploy.worker.Worker",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(free_port()),
                        "--webui-port",
                        str(free_port()),
                        "--cores",
                        "1",
                        "--memory",
                        "1g",
                        "--work-dir",
                        str(work_dir),
                        master_url,
                    ],
                    root / f"worker-{index}.log",
                    env,
                )
            )
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                if cluster.alive_workers() >= workers:
                    break
            except OSError:
                pass
            if any(process.poll() is not None for process in cluster.processes):
                raise RuntimeError("a standalone cluster process exited:\n" + cluster.logs())
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the standalone cluster did not register {workers} workers within "
                    f"{startup_timeout_s:g} s:\n" + cluster.logs()
                )
            time.sleep(0.5)
    except BaseException:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


@pytest.fixture(scope="module")
def standalone_cluster() -> Iterator[StandaloneCluster]:
    """A Master and two one-core Workers on loopback, all stopped at teardown."""
    _switch.stop()  # the cluster's application must be the only JVM session in this process
    cluster = start_standalone_cluster(workers=2)
    try:
        yield cluster
    finally:
        _switch.stop()
        cluster.stop()
        if cluster.log_dir is not None:
            shutil.rmtree(cluster.log_dir, ignore_errors=True)


@pytest.fixture
def standalone_spark(standalone_cluster):
    return _switch.get(
        "standalone_spark",
        lambda: ds.init_context(
            "standalone",
            master=standalone_cluster.master_url,
            executor_cores=1,
            executor_memory="512m",
            conf={"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"},
            app_name="deepspark-tests-standalone",
        ),
    )
