"""Which Python Spark's workers run: the driver's own where it can, a clear error where not.

Each test runs a user's script in a fresh process whose PATH and environment hold no hint of
deepspark's interpreter, as a user's first run would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import deepspark
from conftest import skip_connect_before_pyspark_4, wait_for_connect_port

pytestmark = pytest.mark.slow


def _base_python() -> str:
    """The interpreter this venv was made from: Python without deepspark's packages."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _make_venv(root: Path, *, with_packages: bool) -> Path:
    """A venv without deepspark; `with_packages` lets it import this venv's other packages."""
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    if with_packages:
        # A .pth file adds this venv's site-packages to the path, but the .pth files inside it
        # (deepspark's editable install among them) are not read: torch and pyarrow import,
        # deepspark does not.
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        Path(site, "main_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # without PYTHONPATH, as the user's script runs (a worktree's tests set it to their src)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    missing = subprocess.run([str(python), "-c", "import deepspark"], capture_output=True, env=env)
    assert missing.returncode != 0, "the bare venv must not import deepspark"
    return python


def _user_env(path_first: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYSPARK_", "SPARK_REMOTE", "SPARK_CONNECT"))
        and key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["PATH"] = os.pathsep.join([str(path_first), env.get("PATH", "")])
    return env


def _run_script(code: str, cwd: Path, env: dict[str, str], timeout: float = 400):
    script = cwd / "user_script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_first_fit_runs_although_path_python_lacks_deepspark(tmp_path: Path):
    bare = _make_venv(tmp_path / "bare", with_packages=False)
    for name in ("python3", "python"):
        assert (bare.parent / name).exists()
    result = _run_script(
        """
        import os, sys
        import numpy as np
        import pandas as pd
        import torch
        from sklearn.datasets import load_breast_cancer
        import deepspark as ds

        assert "PYSPARK_PYTHON" not in os.environ
        spark = ds.init_context(cores=2)
        x, y = load_breast_cancer(return_X_y=True)
        x = ((x - x.mean(0)) / x.std(0)).astype(np.float64)
        df = spark.createDataFrame(
            pd.DataFrame({"features": list(x), "label": y.astype(np.int64)}),
            "features array<double>, label long",
        )
        torch.manual_seed(0)
        est = ds.Estimator.from_torch(
            model=torch.nn.Linear(30, 2),
            optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
            loss=torch.nn.CrossEntropyLoss(),
            metrics=["accuracy"],
        )
        history = est.fit(
            df, feature_cols="features", label_cols="label", epochs=3, batch_size=64,
            num_workers=2, seed=0, progress=False,
        )
        print("WORKER_PYTHON", spark.conf.get("spark.pyspark.python"))
        print("ACCURACY", history["train_accuracy"].iloc[-1])
        ds.stop_context()
        assert "PYSPARK_PYTHON" not in os.environ
        """,
        cwd=tmp_path,
        env=_user_env(bare.parent),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"WORKER_PYTHON {sys.executable}" in result.stdout
    accuracy = float(result.stdout.split("ACCURACY", 1)[1].split()[0])
    assert accuracy >= 0.9


@pytest.mark.parametrize("worker", ["without_packages", "without_deepspark"])
def test_probe_names_a_worker_python_that_cannot_run_deepspark(tmp_path: Path, worker: str):
    python = _make_venv(tmp_path / "venv", with_packages=worker == "without_deepspark")
    result = _run_script(
        f"""
        import deepspark as ds
        from deepspark.context import WorkerEnvironmentError, check_workers

        spark = ds.init_context(cores=1, conf={{"spark.pyspark.python": {str(python)!r}}})
        try:
            check_workers(spark)
        except WorkerEnvironmentError as error:
            print("ERROR:", error)
        else:
            print("NO ERROR")
        ds.stop_context()
        """,
        cwd=tmp_path,
        env=_user_env(python.parent),
    )
    out = result.stdout
    assert "ERROR:" in out, out[-3000:] + result.stderr[-5000:]
    assert "NO ERROR" not in out
    assert str(python) in out
    assert "PYSPARK_PYTHON" in out and "spark.pyspark.python" in out
    assert "python_env_archive" in out
    if worker == "without_deepspark":
        # the probe itself ran in that worker (shipped by value) and said what it found there
        assert "deepspark is missing" in out
    else:
        assert "No module named" in out


@pytest.mark.connect_port
def test_a_connect_server_started_by_hand_names_the_one_line_that_works(tmp_path: Path):
    # A user starts a local Connect server themselves; its Python workers are the first
    # `python3` on PATH, which lacks deepspark's packages. The error says what to run instead.
    skip_connect_before_pyspark_4()
    bare = _make_venv(tmp_path / "bare", with_packages=False)
    env = _user_env(bare.parent)
    # this checkout's deepspark on the driver (the workers' bare Python lacks torch either way)
    env["PYTHONPATH"] = str(Path(deepspark.__file__).parents[1])
    wait_for_connect_port()  # the local server takes pyspark's default port
    result = _run_script(
        """
        from pyspark.sql import SparkSession
        from deepspark.context import WorkerEnvironmentError, check_workers

        spark = SparkSession.builder.remote("local[2]").getOrCreate()
        try:
            check_workers(spark)
        except WorkerEnvironmentError as error:
            print("ERROR:", error)
        else:
            print("NO ERROR")
        spark.stop()
        """,
        cwd=tmp_path,
        env=env,
    )
    out = result.stdout
    assert "ERROR:" in out, out[-3000:] + result.stderr[-5000:]
    assert 'ds.init_context(cluster_mode="connect")' in out, out[-3000:]
