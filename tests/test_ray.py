"""Ray on Spark (deepspark.ray): a real Ray cluster on a local-cluster's executors, and the
checks that refuse what cannot work before anything starts.

Starting Ray costs 30-45 s, so one cluster serves the whole module. It runs in a child
interpreter (a script written to a temporary directory): Ray's native code has been seen to
crash at interpreter exit, which must not take pytest with it, and teardown is checked from the
outside, after the child is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import deepspark as ds
import deepspark.ray
from deepspark.context import ContextConfig
from deepspark.ray import RayOnSparkError, check_master

PROGRAM_TIMEOUT_S = 420  # bounds the child; it normally needs 1.5-2 minutes
TEARDOWN_WAIT_S = 30.0
MIB = 2**20

# The child: a local-cluster of two one-core executors with Ray started by init_context(ray=),
# a task, an actor, a two-trial Ray Tune run, and where Ray's processes live.
RAY_PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import psutil
    import torch
    import deepspark as ds
    import deepspark.ray

    work_dir = sys.argv[1]
    result = {}
    spark = ds.init_context(
        "local-cluster", num_executors=2, executor_cores=1, executor_memory="1024m",
        app_name="deepspark-tests-ray", warm_workers=False,
        ray={"num_workers": 2, "object_store_memory_per_worker": "128m"},
    )
    import ray

    cluster = deepspark.ray.current()
    result["cluster"] = {"address": cluster.address, "cluster_id": cluster.cluster_id,
                         "temp_dir": cluster.temp_dir, "num_workers": cluster.num_workers}
    result["executor_path"] = spark.conf.get("spark.executorEnv.PATH")
    result["resources"] = ray.cluster_resources()
    from deepspark.context.session import held_task_slots
    result["held_slots"] = held_task_slots()
    try:  # a fit cannot have slots Ray holds: refused at once, not left waiting
        ds.Estimator.from_torch(torch.nn.Linear(1, 1), optimizer=lambda p: torch.optim.SGD(p, 0.1),
                                loss=torch.nn.MSELoss()).fit(
            {"x": np.zeros((4, 1), "float32"), "y": np.zeros((4, 1), "float32")},
            feature_cols="x", label_cols="y", num_workers=1)
        result["fit_refused"] = ""
    except ValueError as error:
        result["fit_refused"] = str(error)

    @ray.remote
    def square(x):
        return x * x, os.getpid()

    @ray.remote
    class Counter:
        def __init__(self):
            self.count = 0

        def add(self, amount):
            self.count += amount
            return self.count

    squares = ray.get([square.remote(x) for x in range(6)], timeout=120)
    result["squares"] = [value for value, _ in squares]
    counter = Counter.remote()
    result["counter"] = ray.get([counter.add.remote(n) for n in (1, 2, 3)], timeout=120)
    ray.kill(counter)

    def marked():
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("DEEPSPARK_RAY_CLUSTER") == cluster.cluster_id:
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    def executor_jvm(process):
        # the pid of the executor JVM above `process`, or None
        try:
            for parent in process.parents():
                if "java" in parent.name() and any(
                    "CoarseGrainedExecutorBackend" in part for part in parent.cmdline()
                ):
                    return parent.pid
        except psutil.NoSuchProcess:
            pass
        return None

    processes = marked()
    nodes = [p for p in processes if "ray.util.spark.start_ray_node" in " ".join(p.cmdline())]
    result["worker_node_jvms"] = [executor_jvm(p) for p in nodes if "--head" not in p.cmdline()]
    result["head_nodes"] = sum("--head" in p.cmdline() for p in nodes)
    result["task_jvms"] = sorted({executor_jvm(psutil.Process(pid)) or 0 for _, pid in squares})
    result["ports"] = sorted({
        c.laddr.port for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in {p.pid for p in processes}
    })
    try:
        deepspark.ray.start()
    except deepspark.ray.RayOnSparkError as error:
        result["second_start"] = str(error)

    from ray import tune

    def objective(config):
        for step in range(3):
            tune.report({"loss": (config["x"] - 2.0) ** 2 + 0.01 * step})

    tuner = tune.Tuner(
        objective,
        param_space={"x": tune.grid_search([1.0, 2.5])},
        tune_config=tune.TuneConfig(metric="loss", mode="min"),
        run_config=tune.RunConfig(storage_path=os.path.join(work_dir, "tune"), name="grid",
                                  verbose=0),
    )
    grid = tuner.fit()
    best = grid.get_best_result()
    result["tune"] = {"trials": len(grid), "errors": grid.num_errors,
                      "best_x": best.config["x"], "best_loss": best.metrics["loss"]}
    print("RESULT " + json.dumps(result), flush=True)

    ds.stop_context()
    print("AFTER " + json.dumps({
        "marked": [p.pid for p in marked()],
        "temp_dir_left": os.path.exists(cluster.temp_dir),
        "ray_connected": ray.is_initialized(),
        "running": deepspark.ray.current() is not None,
        "held_slots": held_task_slots(),
    }), flush=True)
    """
)


def _line(output: str, prefix: str) -> dict | None:
    for line in output.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix) :])
    return None


def _marked_processes(cluster_id: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("DEEPSPARK_RAY_CLUSTER") == cluster_id:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _listening(ports: set[int]) -> set[int]:
    return {
        c.laddr.port
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
    }


@pytest.fixture(scope="module")
def ray_program(tmp_path_factory):
    """Run the Ray program once; its results, its output, and what remained afterwards."""
    work_dir = tmp_path_factory.mktemp("ray")
    script = work_dir / "ray_program.py"
    script.write_text(RAY_PROGRAM)
    env = dict(os.environ)
    # The venv is not on PATH (as for `.venv/bin/python script.py`): deepspark must give the
    # Ray nodes the `ray` command itself.
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(
        entry for entry in env.get("PATH", "").split(os.pathsep) if entry and entry != venv_bin
    )
    # worker nodes on one machine take turns to pick ports; 2 s each instead of 10
    env["RAY_ON_SPARK_RAY_WORKER_NODE_STARTUP_INTERVAL"] = "2"
    completed = subprocess.run(
        [sys.executable, str(script), str(work_dir)],
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT_S,
        env=env,
        cwd=work_dir,
    )
    output = completed.stdout + completed.stderr
    result = _line(completed.stdout, "RESULT ")
    after = _line(completed.stdout, "AFTER ")
    assert result is not None and after is not None, output[-6000:]
    # Ray's native code has crashed (SIGSEGV) at interpreter exit after all work was done;
    # anything else is a failure of the program.
    assert completed.returncode in (0, -11, 139), output[-6000:]
    cluster_id = result["cluster"]["cluster_id"]
    ports = set(result["ports"])
    deadline = time.monotonic() + TEARDOWN_WAIT_S
    while _marked_processes(cluster_id) or _listening(ports):
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    survivors = [(p.pid, " ".join(p.cmdline())[:120]) for p in _marked_processes(cluster_id)]
    return result, after, survivors, _listening(ports), output


@pytest.mark.slow
def test_ray_runs_tasks_and_actors_on_the_executors(ray_program):
    result, after, *_ = ray_program
    assert result["squares"] == [x * x for x in range(6)]
    assert result["counter"] == [1, 3, 6]
    assert result["cluster"]["num_workers"] == 2
    assert result["held_slots"] == {"Ray on Spark": 2}
    assert "only 0 task slot(s) are free (Ray on Spark holds 2)" in result["fit_refused"]
    assert after["held_slots"] == {}
    assert result["resources"]["CPU"] == 2  # the two worker nodes; the head has none


@pytest.mark.slow
def test_ray_worker_nodes_are_children_of_executor_jvms(ray_program):
    result, *_ = ray_program
    jvms = result["worker_node_jvms"]
    assert len(jvms) == 2 and None not in jvms, result
    assert len(set(jvms)) == 2  # one node in each executor
    assert result["head_nodes"] == 1
    assert 0 not in result["task_jvms"] and set(result["task_jvms"]) <= set(jvms)


@pytest.mark.slow
def test_ray_memory_is_bounded_as_asked(ray_program):
    result, *_ = ray_program
    # head and two worker nodes: 128 MiB object store and 512 MiB heap each
    assert result["resources"]["object_store_memory"] == pytest.approx(3 * 128 * MIB, rel=0.01)
    assert result["resources"]["memory"] == pytest.approx(3 * 512 * MIB, rel=0.01)


@pytest.mark.slow
def test_init_context_puts_the_worker_python_on_the_executors_path(ray_program):
    result, *_ = ray_program
    assert result["executor_path"].split(os.pathsep)[0] == os.path.dirname(sys.executable)


@pytest.mark.slow
def test_ray_tune_runs_its_trials_on_the_cluster(ray_program):
    result, *_ = ray_program
    assert result["tune"]["trials"] == 2
    assert result["tune"]["errors"] == 0
    assert result["tune"]["best_x"] == 2.5
    assert result["tune"]["best_loss"] == pytest.approx(0.25 + 0.02)


@pytest.mark.slow
def test_starting_ray_twice_is_refused(ray_program):
    result, *_ = ray_program
    assert "already runs" in result["second_start"]
    assert result["cluster"]["address"] in result["second_start"]


@pytest.mark.slow
def test_stop_context_leaves_no_ray_process_port_or_temp_dir(ray_program):
    result, after, survivors, listening, output = ray_program
    # right when stop_context returned, in the program itself
    assert after["marked"] == [], output[-3000:]
    assert not after["temp_dir_left"]
    assert not after["ray_connected"] and not after["running"]
    # and from outside, once the program is gone
    assert survivors == []
    assert result["ports"], "Ray listened on no port: the program did not see its processes"
    assert listening == set()
    assert not Path(result["cluster"]["temp_dir"]).exists()


# --- refused before anything starts ------------------------------------------------------------


@pytest.mark.parametrize(
    "master",
    ["local", "local[2]", "local[*]", "local-cluster[2,1,1024]", "spark://host:7077", "yarn"],
)
def test_masters_ray_on_spark_supports_pass(master):
    check_master(master)


def test_kubernetes_master_is_refused_with_the_supported_ones():
    with pytest.raises(RayOnSparkError, match=r"Kubernetes.*KubeRay") as raised:
        check_master("k8s://https://kubernetes.default.svc:443")
    assert "local, local-cluster, standalone (spark://) and YARN" in str(raised.value)


@pytest.mark.parametrize("mode", ["k8s", "connect"])
def test_init_context_refuses_ray_on_modes_without_ray_on_spark(mode):
    extra = {"master": "k8s://https://api:443", "container_image": "img:1"}
    with pytest.raises(ValueError, match=rf"ray=True with cluster_mode='{mode}'"):
        ContextConfig(cluster_mode=mode, ray=True, **(extra if mode == "k8s" else {}))


def test_ray_argument_of_init_context_must_be_a_bool_or_dict():
    with pytest.raises(ValueError, match="ray=2"):
        ContextConfig(ray=2)


def test_start_without_a_session_says_to_start_one():
    ds.stop_context()
    with pytest.raises(RayOnSparkError, match="init_context"):
        deepspark.ray.start()


def test_too_many_workers_for_the_task_slots_are_refused(spark):
    with pytest.raises(ValueError, match=r"num_workers=3.*2 task slot\(s\).*num_workers <= 2"):
        deepspark.ray.start(num_workers=3)
    assert deepspark.ray.current() is None


def test_local_mode_node_cpus_come_from_the_task_cpus(spark):
    with pytest.raises(ValueError, match=r"cpus_per_worker=2.*spark.task.cpus \(1\)"):
        deepspark.ray.start(num_workers=1, cpus_per_worker=2)


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("num_workers", 0, "num_workers=0: give a positive integer"),
        ("memory_per_worker", "lots", "memory_per_worker='lots'"),
        ("object_store_memory_per_worker", "10m", "at least 75 MiB"),
        ("temp_dir", "/tmp/" + "d" * 60, "paths longer than the 107 bytes"),
    ],
)
def test_bad_arguments_name_themselves(spark, argument, value, message):
    with pytest.raises(ValueError, match=message):
        deepspark.ray.start(**{argument: value})


def test_missing_ray_says_which_extra_to_install(spark, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'deepspark\[ray\]'"):
        deepspark.ray.start()


def test_spark_connect_session_is_refused(connect_spark):
    with pytest.raises(RayOnSparkError, match="Spark Connect"):
        deepspark.ray.start()


def test_stop_without_a_cluster_does_nothing():
    deepspark.ray.stop()
    deepspark.ray.stop()
    assert deepspark.ray.current() is None
