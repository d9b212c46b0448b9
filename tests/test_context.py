"""init_context in every deployment mode this machine can run, and its error messages."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pytest

import deepspark as ds
from conftest import CONNECT_NEEDS_PYSPARK_4, free_port, spark_class
from deepspark.context import ClusterMode, ContextConfig, resolve_spark_conf
from deepspark.context.identity import is_connect, session_identity
from deepspark.context.topology import (
    DriverAddress,
    driver_address,
    executor_layout,
    master_of,
    parse_master,
)


def _run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else dict(os.environ),
    )


def _wait_for_executors(session, count: int, timeout_s: float = 90.0) -> None:
    tracker = session.sparkContext._jsc.sc()
    deadline = time.monotonic() + timeout_s
    # getExecutorMemoryStatus counts the driver too
    while tracker.getExecutorMemoryStatus().size() < count + 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} executors did not register within {timeout_s} s")
        time.sleep(0.25)


def _task_working_dirs(session, partitions: int = 4) -> set[str]:
    """The working directories of the Python workers that ran a job's tasks."""

    def where(batches):
        import os
        import time

        import pyarrow as pa

        time.sleep(0.3)  # long enough that one executor cannot take every task
        for batch in batches:
            yield pa.RecordBatch.from_pydict({"cwd": [os.getcwd()] * batch.num_rows})

    df = session.range(0, 64, numPartitions=partitions).mapInArrow(where, "cwd string")
    return {row.cwd for row in df.collect()}


# --- configuration and errors: no JVM needed ------------------------------------------------


def test_unknown_cluster_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="cluster_mode='mesos'.*'local'.*'local-cluster'.*'k8s'"):
        ds.init_context("mesos")


@pytest.mark.parametrize(
    ("mode", "master"),
    [
        ("standalone", "http://host:7077"),
        ("standalone", "spark://host"),
        ("k8s", "https://api:443"),
        ("connect", "http://localhost:15002"),
        ("local", "local[two]"),
        ("local-cluster", "local-cluster[2,1]"),
        ("yarn", "spark://host:7077"),
    ],
)
def test_malformed_master_url_is_refused(mode, master):
    with pytest.raises(ValueError, match=r"master="):
        ContextConfig(cluster_mode=mode, master=master, container_image="img:1")


def test_standalone_and_k8s_need_their_urls():
    with pytest.raises(ValueError, match="spark://host:7077"):
        ContextConfig(cluster_mode="standalone")
    with pytest.raises(ValueError, match="container_image"):
        ContextConfig(cluster_mode="k8s", master="k8s://https://api.example:443")


def test_bad_resource_values_name_the_argument():
    with pytest.raises(ValueError, match="executor_memory='lots'"):
        ContextConfig(executor_memory="lots")
    with pytest.raises(ValueError, match="cores=0"):
        ContextConfig(cores=0)


def test_local_defaults_suit_deep_learning():
    conf = resolve_spark_conf(ContextConfig(cores=3, conf={"spark.python.worker.reuse": False}))
    assert conf["spark.master"] == "local[3]"
    assert conf["spark.sql.execution.arrow.pyspark.enabled"] == "true"
    assert int(conf["spark.sql.execution.arrow.maxRecordsPerBatch"]) > 0
    # user confs win over the defaults
    assert conf["spark.python.worker.reuse"] == "False"


def test_yarn_conf_ships_the_python_environment(tmp_path: Path):
    archive = tmp_path / "env.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(__file__, arcname="bin/marker.py")
    config = ContextConfig(
        cluster_mode="yarn",
        num_executors=4,
        executor_cores=2,
        executor_memory="4g",
        driver_memory="2g",
        python_env_archive=str(archive),
    )
    conf = resolve_spark_conf(config)
    assert config.master == "yarn"
    assert conf["spark.master"] == "yarn"
    assert conf["spark.archives"] == f"{archive}#environment"
    assert conf["spark.pyspark.python"] == "./environment/bin/python"
    assert conf["spark.pyspark.driver.python"] == sys.executable
    assert conf["spark.executor.instances"] == "4"
    assert conf["spark.executor.cores"] == "2"
    assert conf["spark.executor.memory"] == "4g"
    assert conf["spark.driver.memory"] == "2g"


def test_yarn_refuses_a_missing_or_unpacked_environment(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist.*venv-pack"):
        resolve_spark_conf(
            ContextConfig(cluster_mode="yarn", python_env_archive=str(tmp_path / "no.tar.gz"))
        )
    with pytest.raises(ValueError, match="packed environment"):
        resolve_spark_conf(ContextConfig(cluster_mode="yarn", python_env_archive=str(tmp_path)))


def test_k8s_conf_names_master_and_image():
    config = ContextConfig(
        cluster_mode=ClusterMode.K8S,
        master="k8s://https://kubernetes.default.svc:443",
        container_image="registry.example/deepspark:0.1",
        num_executors=3,
    )
    conf = resolve_spark_conf(config)
    assert conf["spark.master"] == "k8s://https://kubernetes.default.svc:443"
    assert conf["spark.kubernetes.container.image"] == "registry.example/deepspark:0.1"
    assert conf["spark.executor.instances"] == "3"


def test_missing_java_is_reported_with_the_fix():
    env = {
        key: value for key, value in os.environ.items() if key not in ("JAVA_HOME", "SPARK_HOME")
    }
    env["PATH"] = str(Path(sys.executable).parent)  # the venv, which holds no java
    result = _run_python(
        """
        import deepspark as ds
        try:
            ds.init_context()
        except ds.context.ContextError as error:
            print("ERROR:", error)
        """,
        env=env,
    )
    assert "ERROR: no Java found" in result.stdout, result.stderr[-2000:]
    assert "JAVA_HOME" in result.stdout


@CONNECT_NEEDS_PYSPARK_4
def test_connect_server_that_does_not_answer_fails_in_bounded_time():
    port = free_port()  # nothing listens here
    connect_timeout_s = 1.5
    result = _run_python(
        f"""
        import time, deepspark as ds
        start = time.monotonic()
        try:
            ds.init_context(
                "connect", master="sc://127.0.0.1:{port}", connect_timeout_s={connect_timeout_s}
            )
        except ds.context.ContextError as error:
            print("ERROR:", error)
        print("WAITED", time.monotonic() - start)
        """
    )
    assert f"ERROR: the Spark Connect server at sc://127.0.0.1:{port} did not answer" in (
        result.stdout
    ), result.stderr[-2000:]
    # a hang guard, not a speed claim: the call gives up soon after its timeout
    waited = float(result.stdout.split("WAITED", 1)[1].split()[0])
    assert connect_timeout_s <= waited < connect_timeout_s + 30, waited


@CONNECT_NEEDS_PYSPARK_4
def test_connect_port_that_accepts_but_never_answers_fails_in_bounded_time():
    # a listening socket that takes the connection and says nothing, as a server expecting
    # TLS or a token can look to a client that offers neither
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        result = _run_python(
            f"""
            import time, deepspark as ds
            start = time.monotonic()
            try:
                ds.init_context("connect", master="sc://127.0.0.1:{port}", connect_timeout_s=5)
            except ds.context.ContextError as error:
                print("ERROR:", error)
            print("WAITED", time.monotonic() - start)
            """
        )
    assert "accepts connections but did not answer" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-2000:]
    )
    waited = float(result.stdout.split("WAITED", 1)[1].split()[0])
    assert waited < 5 + 60, waited  # a hang guard, not a speed claim


@pytest.mark.slow
def test_spark_submit_mode_adopts_the_submitted_session(tmp_path: Path):
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import deepspark as ds
            spark = ds.init_context("spark-submit")
            print("MASTER", spark.sparkContext.master, "COUNT", spark.range(7).count())
            ds.stop_context()
            """
        )
    )
    submit = Path(spark_class()).with_name("spark-submit")
    # spark-submit's own way to name the interpreters, as a user gives it
    command = [str(submit), "--master", "local[1]", "--conf", "spark.ui.enabled=false"]
    command += ["--conf", f"spark.pyspark.python={sys.executable}"]
    command += ["--conf", f"spark.pyspark.driver.python={sys.executable}", str(script)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert "MASTER local[1] COUNT 7" in result.stdout, result.stderr[-3000:]


# --- live sessions ----------------------------------------------------------------------------


def test_local_session_runs_jobs_with_the_defaults(spark):
    assert spark.sparkContext.master == "local[2]"
    assert spark.conf.get("spark.sql.execution.arrow.pyspark.enabled") == "true"
    assert spark.conf.get("spark.python.worker.reuse") == "true"
    assert spark.range(100).selectExpr("sum(id) AS total").first().total == 4950

    def daemon(batches):
        import psutil

        for _ in batches:
            pass
        parent = psutil.Process().parent()
        threads = [
            Path(f"/proc/{parent.pid}/task/{task}/comm").read_text().strip()
            for task in os.listdir(f"/proc/{parent.pid}/task")
        ]
        yield pa.RecordBatch.from_pydict(
            {"command": [" ".join(parent.cmdline())], "threads": [",".join(sorted(threads))]}
        )

    # the workers fork from deepspark's daemon, which imported torch and torchmetrics first,
    # with no thread but OpenBLAS's: pyarrow's jemalloc was told to start none
    found = spark.range(0, 2, 1, 2).mapInArrow(daemon, "command string, threads string").collect()
    assert all("-m deepspark.context.worker_daemon" in row.command for row in found), found
    assert all("jemalloc" not in row.threads for row in found), found


def test_worker_daemon_keeps_stdout_for_the_port(tmp_path: Path):
    # the daemon's stdout carries its port to the JVM: what a preloaded module prints goes to stderr
    (tmp_path / "noisy.py").write_text(
        "import os, sys\nprint('from python')\nos.write(1, b'from C')\n"
    )
    result = _run_python(
        f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from deepspark.context import worker_daemon

        done = worker_daemon.preload(("noisy", "no_such_module", "json"))
        print("AFTER", done)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "AFTER ['noisy', 'json']\n"
    assert "from python" in result.stderr and "from C" in result.stderr
    assert "no_such_module did not import" in result.stderr


def test_second_init_context_returns_the_running_session(spark):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds.init_context(cores=2, app_name="deepspark-tests") is spark
    with pytest.warns(UserWarning, match="already running"):
        assert ds.init_context(cores=1) is spark


@pytest.mark.slow
def test_stop_context_is_idempotent(spark):
    ds.init_context(cores=2, app_name="deepspark-tests")
    ds.stop_context()
    ds.stop_context()
    assert spark.sparkContext._jsc is None
    fresh = ds.init_context(cores=2, app_name="deepspark-tests")
    assert fresh.range(3).count() == 3


@pytest.mark.slow
def test_local_cluster_runs_tasks_in_separate_executor_jvms(local_cluster_spark):
    assert local_cluster_spark.sparkContext.master == "local-cluster[2,1,1024]"
    _wait_for_executors(local_cluster_spark, 2)
    # One job can land on one executor when the other's Python worker starts slowly (a
    # loaded machine); over three jobs, both executors' working directories must appear.
    seen: set[str] = set()
    for _ in range(3):
        seen |= _task_working_dirs(local_cluster_spark)
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    executors = local_cluster_spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()
    assert executors == 3  # two executors and the driver


def test_connect_session_runs_dataframe_jobs(connect_spark):
    assert type(connect_spark).__module__.startswith("pyspark.sql.connect")
    total = connect_spark.range(10).selectExpr("sum(id) AS total").first().total
    assert total == 45
    assert len(_task_working_dirs(connect_spark)) >= 1


@pytest.mark.slow
def test_standalone_tasks_run_on_both_workers(standalone_spark, standalone_cluster):
    assert standalone_spark.sparkContext.master == standalone_cluster.master_url
    _wait_for_executors(standalone_spark, 2)
    dirs = _task_working_dirs(standalone_spark, partitions=8)
    used_workers = {
        index
        for index, work_dir in enumerate(standalone_cluster.work_dirs)
        if any(d.startswith(str(work_dir)) for d in dirs)
    }
    assert used_workers == {0, 1}, dirs


@pytest.mark.slow
def test_fit_and_predict_through_a_connect_server_of_its_own(connect_server_spark):
    """A Connect client whose server (and its executors) runs apart from this process."""
    import pandas as pd
    import torch
    from sklearn.datasets import load_digits

    from deepspark.context.topology import task_slots

    spark = connect_server_spark
    assert type(spark).__module__.startswith("pyspark.sql.connect")
    assert task_slots(spark) == 2
    digits = load_digits()
    frame = pd.DataFrame({"features": list(digits.data / 16.0), "label": digits.target})
    df = spark.createDataFrame(frame, "features array<double>, label long")
    torch.manual_seed(0)
    est = ds.Estimator.from_torch(
        model=torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        ),
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
    )
    history = est.fit(
        df,
        feature_cols="features",
        label_cols="label",
        epochs=3,
        batch_size=64,
        num_workers=2,
        seed=0,
        progress=False,
    )
    assert len(est.history) == 3
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    # step events reached this client over the progress channel
    assert math.isfinite(est.first_step_s_)
    scored = est.predict(df.limit(40), feature_cols="features").collect()
    assert len(scored) == 40
    assert all(len(row.prediction) == 10 for row in scored)


@pytest.mark.slow
@pytest.mark.parametrize("warm", [True, False])
def test_init_context_warms_the_python_workers_that_later_tasks_reuse(warm):
    # a fresh process: the session's workers have run nothing before
    result = _run_python(
        f"""
        import threading
        import pyarrow as pa
        import deepspark as ds
        from deepspark.context.workers import warm_modules

        # torch and torchmetrics come with the workers' daemon; a module added here does not
        warm_modules("sqlite3")
        spark = ds.init_context(cores=2, warm_workers={warm})
        for thread in threading.enumerate():
            if thread.name == "deepspark-warm-workers":
                thread.join(90)

        def imported(batches):
            import sys
            for _ in batches:
                pass
            yield pa.RecordBatch.from_pydict({{"sqlite3": ["sqlite3" in sys.modules]}})

        rows = spark.range(0, 2, 1, 2).mapInArrow(imported, "sqlite3 boolean", barrier=True)
        print("SQLITE3", sorted(row.sqlite3 for row in rows.collect()))
        ds.stop_context()
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"SQLITE3 {[warm, warm]}" in result.stdout, result.stdout[-2000:]


# --- the session's topology, asked in one place (deepspark.context.topology) -------------------


@pytest.mark.parametrize(
    ("url", "mode", "executors", "cores", "shares"),
    [
        ("local", "local", 1, 1, True),
        ("local[3]", "local", 1, 3, True),
        ("local[2,4]", "local", 1, 2, True),
        ("local-cluster[2,1,1024]", "local-cluster", 2, 1, True),
        ("spark://127.0.0.1:7077", "standalone", None, None, True),
        ("spark://a:7077,b:7077", "standalone", None, None, False),
        ("yarn", "yarn", None, None, False),
        ("k8s://https://api:443", "k8s", None, None, False),
        ("sc://server:15002", "connect", None, None, False),
    ],
)
def test_master_urls_are_parsed_once_for_every_caller(url, mode, executors, cores, shares):
    master = parse_master(url)
    assert (master.mode.value, master.executors, master.cores_per_executor) == (
        mode,
        executors,
        cores,
    )
    assert master.shares_machine is shares
    assert parse_master("local[*]").cores_per_executor == os.cpu_count()
    assert parse_master("mesos://host:5050").mode is None


def test_topology_of_a_local_session(spark):
    assert not is_connect(spark) and master_of(spark).is_local
    layout = executor_layout(spark)
    assert (layout.executors, layout.task_slots) == (1, spark.sparkContext.defaultParallelism)
    assert driver_address(spark) == DriverAddress("127.0.0.1", "127.0.0.1")
    assert session_identity(spark) == f"classic:{spark.sparkContext.applicationId}"


def test_topology_of_a_local_cluster_counts_its_executors(local_cluster_spark):
    layout = executor_layout(local_cluster_spark)
    assert (layout.executors, layout.cores_per_executor, layout.task_slots) == (2, 1, 2)


def test_topology_of_a_connect_session_is_the_servers(connect_spark):
    assert is_connect(connect_spark)
    assert is_connect(connect_spark.range(1))  # its DataFrames too
    assert master_of(connect_spark).url == "local[2]"
    assert executor_layout(connect_spark).task_slots == 2
    assert session_identity(connect_spark) == f"connect:{connect_spark.session_id}"
    assert driver_address(connect_spark).bind == "127.0.0.1"  # a local server on loopback


def test_topology_of_a_standalone_cluster_waits_for_and_counts_its_executors(standalone_spark):
    layout = executor_layout(standalone_spark)
    assert (layout.executors, layout.cores_per_executor, layout.task_slots) == (2, 1, 2)
    assert driver_address(standalone_spark) == DriverAddress("127.0.0.1", "127.0.0.1")
