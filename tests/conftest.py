"""Shared fixtures: real Spark sessions of each kind, and a real standalone cluster.

A Python process holds one JVM-backed Spark session at a time, so the session fixtures share
one switch: asking for another kind stops the current session first. Tests are ordered by the
kind they use, so each kind starts about once per run. The standalone cluster and the Connect
server behind two of the kinds are started by the first test that needs them and stopped after
the last one, so they too start once per run, however many modules use them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

import deepspark as ds
from deepspark.context.spark_versions import pyspark_version

# Every JVM the tests start (sessions here, Spark in fresh processes, the docs pages, the
# clusters' daemons) compiles with C1 only and collects with one thread. The suite's JVMs live
# seconds to minutes, and on 2 cores their C2 compiler and GC threads compete with the tests:
# the README page, run alone, used 54, 54 and 49 s of CPU by default and 40 and 38 s with
# these (runs interleaved, 2026-12-07). Java reads the variable at every launch; a value
# already set is kept.
os.environ.setdefault("JDK_JAVA_OPTIONS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")

SESSION_KINDS = (
    "spark",
    "local_cluster_spark",
    "connect_spark",
    "standalone_spark",
    "connect_server_spark",
)


class _SessionSwitch:
    """Keeps at most one session alive; switching kind stops the previous one."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.session = None

    def get(self, kind: str, start) -> object:
        if self.kind == kind and self.session is not None:
            if _alive(self.session):
                return self.session
            # A test stopped it and may have started the same kind again: init_context hands
            # a running session back, and that one is kept rather than restarted.
            with contextlib.suppress(Exception):
                again = start()
                if _alive(again):
                    self.session = again
                    return again
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


# Fixtures that start JVMs beyond the run's local session and its one Connect session: their
# tests belong to the slow tier, which `make test-fast` (`-m "not slow"`) leaves out. Such a test
# gets the mark here when its file forgot it, so the fast tier never starts a cluster.
SLOW_TIER_FIXTURES = frozenset(
    {
        "local_cluster_spark",
        "standalone_cluster",
        "standalone_spark",
        "connect_server",
        "connect_server_spark",
    }
)


@pytest.hookimpl(tryfirst=True)  # the marks added here must be in place before `-m` selects
def pytest_collection_modifyitems(config, items):
    def kind_rank(item) -> int:
        names = getattr(item, "fixturenames", ())
        for rank, kind in enumerate(SESSION_KINDS, start=1):
            if kind in names:
                return rank
        return 0

    items.sort(key=kind_rank)
    for item in items:
        uses = SLOW_TIER_FIXTURES & set(getattr(item, "fixturenames", ()))
        if uses and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    if _distributed(config):
        for item in items:
            group = _worker_group(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group))


# ---------------------------------------------------------------------------------------------
# pytest-xdist (`make test-fast` and `make test-spark35` run `-n 2 --dist loadgroup`): which
# tests must run in the same worker process. The xdist_group marks are added above, before
# xdist's own hook in the worker turns them into units of work.

# One group per cluster or server kind: a worker starts it once and runs all its tests. The
# Connect session takes a fixed port, so the tests that use the port share its group.
WORKER_GROUPS = {
    "local_cluster_spark": "local-cluster",
    "standalone_cluster": "standalone",
    "standalone_spark": "standalone",
    "connect_server": "connect-server",
    "connect_server_spark": "connect-server",
    "connect_spark": "connect-port",
}


def _distributed(config) -> bool:
    """Whether this is an xdist worker of a ``--dist loadgroup`` run. Workers collect the
    tests and turn xdist_group marks into work units; xdist sets their own ``dist`` option to
    "no" and keeps the run's choice as ``loadgroup``."""
    return hasattr(config, "workerinput") and bool(config.getoption("loadgroup", False))


def _worker_group(item) -> str | None:
    """The unit `item` runs in: its kind's group, its own (spread), or its file's."""
    names = set(getattr(item, "fixturenames", ()))
    for fixture, group in WORKER_GROUPS.items():
        if fixture in names:
            return group
    if item.get_closest_marker("connect_port") is not None:
        return "connect-port"
    if item.get_closest_marker("spread") is not None:
        return None
    return item.nodeid.split("::")[0]


def pytest_configure(config):
    # Two worker processes share the machine's cores: torch in each computes on its share
    # (the training ranks and Spark's Python workers set their own thread counts).
    worker_count = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker_count is not None:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(worker_count)))


def started_by_this_run(process) -> bool:
    """Whether `process` (a psutil.Process) was started by this pytest process or its children.

    Under pytest-xdist another worker's Spark and training processes run beside this one's;
    each worker's processes inherit its PYTEST_XDIST_WORKER. Without xdist every process is
    this run's.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return True
    try:
        return process.environ().get("PYTEST_XDIST_WORKER") == worker
    except psutil.Error:
        return False


class _RunService:
    """A cluster or server kept from the first test that asks for it to the last one.

    Tests are sorted by session kind, so the tests that use one service run in one stretch; it
    is stopped as soon as the next test does not ask for it. A failed start is remembered, so
    the tests after it fail at once instead of waiting for their own start to time out.
    """

    def __init__(self, fixture_name: str, start, stop) -> None:
        self.fixture_name = fixture_name
        self._start, self._stop = start, stop
        self.value = None
        self.error: BaseException | None = None

    def get(self):
        if self.error is not None:
            raise RuntimeError(f"{self.fixture_name} failed to start earlier") from self.error
        if self.value is None:
            try:
                self.value = self._start()
            except Exception as error:
                self.error = error
                raise
        return self.value

    def stop(self) -> None:
        if self.value is not None:
            value, self.value = self.value, None
            self._stop(value)


_services: list[_RunService] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the test's own fixtures go first
    for service in _services:
        if nextitem is None or service.fixture_name not in nextitem.fixturenames:
            service.stop()


def pytest_sessionfinish(session, exitstatus):
    _switch.stop()
    for service in _services:
        service.stop()
    if _skipped_dev_modules and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------------------------------------
# A test skipped because a module of the dev extra is missing (or fails to import) hides a
# broken install: the run fails, so CI never passes with such a test left out.

_IMPORT_SKIP = re.compile(r"could not import '([\w.]+)'|No module named '([\w.]+)'")
# import names whose distribution is named otherwise
_DISTRIBUTION_OF = {
    "sklearn": "scikit-learn",
    "cv2": "opencv-python-headless",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
}
_skipped_dev_modules: dict[str, str] = {}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dev_distributions() -> set[str]:
    """The distributions `pip install -e .[dev]` installs, by canonical name."""
    requirements = importlib.metadata.requires("deepspark") or []
    by_extra: dict[str, list[str]] = {}
    for requirement in requirements:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if extra is not None:
            by_extra.setdefault(extra.group(1), []).append(requirement)
    found: set[str] = set()
    pending, seen = ["dev"], set()
    while pending:
        extra = pending.pop()
        seen.add(extra)
        for requirement in by_extra.get(extra, []):
            name, nested = re.match(
                r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[([^\]]*)\])?", requirement
            ).groups()
            if _canonical(name) == "deepspark":
                pending += [e.strip() for e in (nested or "").split(",") if e.strip() not in seen]
            else:
                found.add(_canonical(name))
    return found


def _is_dev_module(module: str) -> bool:
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is not None:
        return True  # installed, yet its test was skipped: an import inside it fails
    dist = _canonical(_DISTRIBUTION_OF.get(top, top))
    return any(name == dist or name.startswith(dist + "_") for name in _dev_distributions())


def _note_skip(report) -> None:
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2])
    match = _IMPORT_SKIP.search(reason)
    if match is not None:
        module = match.group(1) or match.group(2)
        if _is_dev_module(module):
            _skipped_dev_modules[report.nodeid] = reason


# Where a run's time goes, by test file (setup, call and teardown together): the suite's time
# target is met by the files at the top of this list, not by single tests.
_seconds_per_file: dict[str, float] = {}
FILES_SHOWN = 20


def pytest_runtest_logreport(report):
    _note_skip(report)
    path = report.nodeid.split("::")[0]
    _seconds_per_file[path] = _seconds_per_file.get(path, 0.0) + report.duration


def pytest_collectreport(report):
    _note_skip(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _seconds_per_file:
        terminalreporter.section(f"slowest {FILES_SHOWN} test files")
        ranked = sorted(_seconds_per_file.items(), key=lambda item: -item[1])
        for path, seconds in ranked[:FILES_SHOWN]:
            terminalreporter.line(f"{seconds:8.1f}s  {path}")
    if not _skipped_dev_modules:
        return
    terminalreporter.section("skipped for a dev-extra module", red=True)
    for nodeid, reason in _skipped_dev_modules.items():
        terminalreporter.line(f"{nodeid}: {reason}", red=True)
    terminalreporter.line(
        "These tests need a module that `pip install -e .[dev]` provides; the run fails until "
        "it imports (reinstall the dev extra).",
        red=True,
    )


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


# deepspark refuses Spark Connect on PySpark 3.5 (make test-spark35), which
# test_context_versions asserts; the tests that need a Connect session skip there.
_CONNECT_SKIP_REASON = "Spark Connect through deepspark needs PySpark >= 4.0; this is 3.5"


# for a test that starts its own Connect client
CONNECT_NEEDS_PYSPARK_4 = pytest.mark.skipif(
    pyspark_version() < (4, 0), reason=_CONNECT_SKIP_REASON
)


def skip_connect_before_pyspark_4() -> None:
    """Skip the calling test or fixture on PySpark 3.5, where Connect is refused."""
    if pyspark_version() < (4, 0):
        pytest.skip(_CONNECT_SKIP_REASON)


CONNECT_PORT = 15002  # where pyspark's client looks for a local Connect server


def wait_for_connect_port(timeout_s: float = 60.0) -> None:
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
    skip_connect_before_pyspark_4()
    return _switch.get("connect_spark", _start_connect_session)


def _start_connect_session():
    # The local server takes the port once the session before it is stopped; that may be this
    # kind's own server, which a test stopped and which is still letting the port go.
    wait_for_connect_port()
    try:
        return _init_connect_session()
    except Exception as error:
        # Under pytest-xdist the server failed to bind the port twice in 5 fast-tier runs,
        # right after the wait found it free; the holder was not found. A failed start leaves
        # nothing behind, so it is started once more, and the warning names what held the port.
        if f":{CONNECT_PORT}" not in str(error):
            raise
        warnings.warn(
            f"the Connect server could not bind port {CONNECT_PORT}; held by "
            f"{_port_holders(CONNECT_PORT) or 'nothing now'}; starting it once more",
            stacklevel=1,
        )
        wait_for_connect_port()
        return _init_connect_session()


def _init_connect_session():
    return ds.init_context("connect", master="local[2]", app_name="deepspark-tests-connect")


def _port_holders(port: int) -> list[str]:
    holders = []
    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port:
            try:
                command = " ".join(psutil.Process(connection.pid).cmdline())[:200]
            except (psutil.Error, TypeError, ValueError):
                command = "?"
            holders.append(f"{connection.status} pid {connection.pid}: {command}")
    return holders


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

        def registered() -> bool:
            try:
                return cluster.alive_workers() >= workers
            except (OSError, ValueError):  # not listening yet, or an empty page while starting
                return False

        _wait_until(
            registered,
            exited=lambda: any(process.poll() is not None for process in cluster.processes),
            what=f"the standalone cluster registering {workers} workers",
            timeout_s=startup_timeout_s,
            logs=cluster.logs,
        )
    except BaseException:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


def _start_run_standalone_cluster() -> StandaloneCluster:
    _switch.stop()  # the cluster's application must be the only JVM session in this process
    return start_standalone_cluster(workers=2)


def _stop_run_standalone_cluster(cluster: StandaloneCluster) -> None:
    if _switch.kind == "standalone_spark":
        _switch.stop()
    cluster.stop()
    if cluster.log_dir is not None:
        shutil.rmtree(cluster.log_dir, ignore_errors=True)


_standalone_service = _RunService(
    "standalone_cluster", _start_run_standalone_cluster, _stop_run_standalone_cluster
)
_services.append(_standalone_service)


@pytest.fixture
def standalone_cluster() -> StandaloneCluster:
    """A Master and two one-core Workers on loopback, shared by every test of the run that
    asks for it; stopped after the last of them."""
    return _standalone_service.get()


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


# ---------------------------------------------------------------------------------------------
# A Spark Connect server started on its own (`sbin/start-connect-server.sh`), as a user runs
# one, with a local-cluster master: the client in this process is not the server's driver.


@dataclass
class ConnectServer:
    url: str
    env: dict[str, str]
    log_dir: Path

    def logs(self) -> str:
        parts = [
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.log_dir.glob("*.out"))
        ]
        return "\n".join(parts)

    def pid(self) -> int | None:
        for path in self.log_dir.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                return int(path.read_text().strip())
        return None

    def stop(self) -> None:
        pid = self.pid()
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [str(_pyspark_home() / "sbin" / "stop-connect-server.sh")],
                env=self.env,
                capture_output=True,
                timeout=60,
            )
        if pid is not None and _process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pyspark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def _wait_until(ready, *, exited, what: str, timeout_s: float, logs) -> None:
    """Poll `ready` until it holds; fail with the logs when a process exited or time ran out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if exited():
            raise RuntimeError(f"a process exited before {what}:\n" + logs())
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout_s:g} s:\n" + logs())
        time.sleep(0.5)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_connect_server(master: str = "local-cluster[2,1,1024]", startup_timeout_s=180.0):
    root = Path(tempfile.mkdtemp(prefix="deepspark-connect-server-"))
    port = free_port()
    env = dict(os.environ)
    env.pop("SPARK_REMOTE", None)
    # a local Connect session of this process keeps its token in the environment; a server
    # started by hand has none
    env.pop("SPARK_CONNECT_AUTHENTICATE_TOKEN", None)
    env.update(
        {
            "SPARK_HOME": str(_pyspark_home()),
            "SPARK_LOG_DIR": str(root),
            "SPARK_PID_DIR": str(root),
            "SPARK_LOCAL_IP": "127.0.0.1",
            # The server's Python workers: a user starts the server with the interpreter that
            # has deepspark, the same way.
            "PYSPARK_PYTHON": sys.executable,
        }
    )
    server = ConnectServer(f"sc://127.0.0.1:{port}", env, root)
    confs = {
        "spark.connect.grpc.binding.port": str(port),
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.executor.memory": "1024m",
    }
    args = [str(_pyspark_home() / "sbin" / "start-connect-server.sh"), "--master", master]
    for key, value in confs.items():
        args += ["--conf", f"{key}={value}"]
    try:
        subprocess.run(args, env=env, capture_output=True, timeout=120, check=True)

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        def exited() -> bool:
            pid = server.pid()
            return pid is not None and not _process_alive(pid)

        _wait_until(
            listening,
            exited=exited,
            what=f"the Spark Connect server listening on port {port}",
            timeout_s=startup_timeout_s,
            logs=server.logs,
        )
    except BaseException:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


def _stop_run_connect_server(server: ConnectServer) -> None:
    if _switch.kind == "connect_server_spark":
        _switch.stop()
    server.stop()
    shutil.rmtree(server.log_dir, ignore_errors=True)


_connect_server_service = _RunService(
    "connect_server", start_connect_server, _stop_run_connect_server
)
_services.append(_connect_server_service)


@pytest.fixture
def connect_server() -> ConnectServer:
    """A Spark Connect server (local-cluster[2,1,1024]) on loopback, shared by every test of
    the run that asks for it; stopped after the last of them."""
    skip_connect_before_pyspark_4()
    return _connect_server_service.get()


@pytest.fixture
def connect_server_spark(connect_server):
    """A Spark Connect client of `connect_server`, made with `init_context("connect", ...)`."""
    skip_connect_before_pyspark_4()
    return _switch.get(
        "connect_server_spark",
        lambda: ds.init_context(
            "connect", master=connect_server.url, app_name="deepspark-tests-connect-server"
        ),
    )
