"""Deployment configuration: which cluster, which resources, which Spark confs.

Pure data and pure functions (no JVM is started here), so the configuration produced for
YARN or Kubernetes can be inspected and tested on a laptop.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from deepspark.errors import DeepsparkError

__all__ = [
    "CONNECT_URL",
    "K8S_URL",
    "LOCAL_CLUSTER_URL",
    "LOCAL_URL",
    "RAY_CLUSTER_MODES",
    "STANDALONE_URL",
    "ClusterMode",
    "ContextConfig",
    "ContextError",
    "executor_path_with",
    "resolve_spark_conf",
]


class ContextError(DeepsparkError, RuntimeError):
    """A Spark context could not be created as asked."""


class ClusterMode(str, Enum):
    """Where the Spark application runs."""

    LOCAL = "local"
    LOCAL_CLUSTER = "local-cluster"
    STANDALONE = "standalone"
    YARN = "yarn"
    K8S = "k8s"
    CONNECT = "connect"
    SPARK_SUBMIT = "spark-submit"

    @classmethod
    def parse(cls, value: str | ClusterMode) -> ClusterMode:
        if isinstance(value, ClusterMode):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            valid = ", ".join(repr(mode.value) for mode in cls)
            raise ValueError(f"cluster_mode={value!r} is not known; use one of {valid}") from None


# Where Ray on Spark can start Ray nodes (spark-submit: checked once the master is known).
RAY_CLUSTER_MODES = (
    ClusterMode.LOCAL,
    ClusterMode.LOCAL_CLUSTER,
    ClusterMode.STANDALONE,
    ClusterMode.YARN,
    ClusterMode.SPARK_SUBMIT,
)

# Spark settings that suit deep learning workloads; user `conf` entries override them.
DEEP_LEARNING_DEFAULTS: dict[str, str] = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "4096",
    "spark.python.worker.reuse": "true",
    "spark.task.cpus": "1",
    # Our own progress bar reports training; Spark's stage bar would fight it for the terminal.
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.adaptive.enabled": "true",
}

_LOOPBACK_DEFAULTS: dict[str, str] = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "8",
}

# The master URLs each cluster mode takes (`deepspark.context.topology.parse_master` reads them).
STANDALONE_URL = re.compile(r"^spark://[A-Za-z0-9_.\-]+:\d{1,5}(,[A-Za-z0-9_.\-]+:\d{1,5})*$")
K8S_URL = re.compile(r"^k8s://(https?://)?[A-Za-z0-9_.\-]+(:\d{1,5})?/?$")
CONNECT_URL = re.compile(r"^sc://[A-Za-z0-9_.\-]+(:\d{1,5})?(/.*)?$")
LOCAL_URL = re.compile(r"^local(\[(\*|\d+)(,\d+)?\])?$")
LOCAL_CLUSTER_URL = re.compile(r"^local-cluster\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]$")


@dataclass
class ContextConfig:
    """Everything `init_context` was asked for, validated and with derived defaults filled in."""

    cluster_mode: ClusterMode = ClusterMode.LOCAL
    master: str | None = None
    cores: int | None = None
    executor_cores: int | None = None
    num_executors: int | None = None
    executor_memory: str | None = None
    driver_memory: str | None = None
    conf: dict[str, str] = field(default_factory=dict)
    app_name: str = "deepspark"
    container_image: str | None = None
    python_env_archive: str | None = None
    connect_timeout_s: float = 30.0
    ray: bool | dict[str, Any] = False

    def __post_init__(self) -> None:
        self.cluster_mode = ClusterMode.parse(self.cluster_mode)
        self.conf = {str(key): str(value) for key, value in (self.conf or {}).items()}
        for name in ("cores", "executor_cores", "num_executors"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: give a positive integer")
        for name in ("executor_memory", "driver_memory"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"\d+[kKmMgGtT]?", str(value)):
                raise ValueError(f"{name}={value!r}: give a JVM memory size such as '2g' or '512m'")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be positive (seconds)")
        self.master = self._resolve_master()
        self._check_ray()

    def _check_ray(self) -> None:
        if isinstance(self.ray, Mapping):
            self.ray = dict(self.ray)
        elif not isinstance(self.ray, bool):
            raise ValueError(
                f"ray={self.ray!r}: give True, False, or a dict of deepspark.ray.start arguments"
            )
        if self.ray is not False and self.cluster_mode not in RAY_CLUSTER_MODES:
            modes = ", ".join(repr(mode.value) for mode in RAY_CLUSTER_MODES)
            raise ValueError(
                f"ray={self.ray!r} with cluster_mode={self.cluster_mode.value!r}: Ray on Spark "
                f"(ray.util.spark) starts its nodes only on the {modes} modes (it needs a "
                "classic SparkContext and does not support Kubernetes executors); choose one "
                "of them, or run Ray with its own cluster launcher"
            )

    def _resolve_master(self) -> str | None:
        mode, master = self.cluster_mode, self.master
        if mode is ClusterMode.LOCAL:
            if master is None:
                return f"local[{self.cores}]" if self.cores else "local[*]"
            _check_url(master, LOCAL_URL, "local", "local[4] or local[*]")
        elif mode is ClusterMode.LOCAL_CLUSTER:
            if master is None:
                executors = self.num_executors or 2
                cores = self.executor_cores or 1
                memory_mb = _memory_mb(self.executor_memory or "1g")
                return f"local-cluster[{executors},{cores},{memory_mb}]"
            _check_url(master, LOCAL_CLUSTER_URL, "local-cluster", "local-cluster[2,1,1024]")
        elif mode is ClusterMode.STANDALONE:
            if master is None:
                raise ValueError("cluster_mode='standalone' needs master='spark://host:7077'")
            _check_url(master, STANDALONE_URL, "standalone", "spark://host:7077")
        elif mode is ClusterMode.YARN:
            if master not in (None, "yarn"):
                raise ValueError(f"master={master!r}: cluster_mode='yarn' takes master='yarn'")
            return "yarn"
        elif mode is ClusterMode.K8S:
            if master is None:
                raise ValueError("cluster_mode='k8s' needs master='k8s://https://<api-server>:443'")
            _check_url(master, K8S_URL, "k8s", "k8s://https://kubernetes.default.svc:443")
            if not self.container_image:
                raise ValueError(
                    "cluster_mode='k8s' needs container_image='<registry>/<image>:<tag>', "
                    "an image with Spark, Python and deepspark installed"
                )
        elif mode is ClusterMode.CONNECT:
            if master is None:
                # No URL: start a local Spark Connect server for this process.
                return f"local[{self.cores}]" if self.cores else "local[*]"
            if not (CONNECT_URL.match(master) or LOCAL_URL.match(master)):
                raise ValueError(
                    f"master={master!r} is not a Spark Connect URL; "
                    "give one such as 'sc://host:15002' (or 'local[2]' for a local server)"
                )
        return master


def _check_url(master: str, pattern: re.Pattern[str], mode: str, example: str) -> None:
    if not pattern.match(master):
        raise ValueError(
            f"master={master!r} is not a valid URL for cluster_mode={mode!r}; "
            f"give one such as {example!r}"
        )


def _memory_mb(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgGtT]?)", size).groups()  # type: ignore[union-attr]
    scale = {"": 1 / (1024 * 1024), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
    return max(1, int(int(number) * scale[unit.lower()]))


def resolve_spark_conf(config: ContextConfig) -> dict[str, str]:
    """The Spark confs a session for `config` is built with (defaults, then the user's)."""
    mode = config.cluster_mode
    conf: dict[str, str] = dict(DEEP_LEARNING_DEFAULTS)
    conf["spark.app.name"] = config.app_name
    local_connect = bool(
        mode is ClusterMode.CONNECT and config.master and config.master.startswith("local")
    )
    if mode in (ClusterMode.LOCAL, ClusterMode.LOCAL_CLUSTER) or local_connect:
        conf.update(_LOOPBACK_DEFAULTS)
    if local_connect:
        # A Connect server started for this process serves this process only.
        conf["spark.connect.grpc.binding.address"] = "127.0.0.1"
    if config.master and mode is not ClusterMode.CONNECT:
        conf["spark.master"] = config.master
    if config.executor_cores:
        conf["spark.executor.cores"] = str(config.executor_cores)
    if config.executor_memory:
        conf["spark.executor.memory"] = config.executor_memory
    if config.driver_memory:
        conf["spark.driver.memory"] = config.driver_memory
    if config.num_executors and mode in (ClusterMode.YARN, ClusterMode.K8S):
        conf["spark.executor.instances"] = str(config.num_executors)
    if config.cores and mode in (ClusterMode.STANDALONE,):
        conf["spark.cores.max"] = str(config.cores)
    if mode is ClusterMode.YARN:
        conf.update(_yarn_python_env(config.python_env_archive))
    if mode is ClusterMode.K8S:
        conf["spark.kubernetes.container.image"] = str(config.container_image)
        conf.setdefault("spark.kubernetes.pyspark.pythonVersion", "3")
        if config.python_env_archive:
            conf.update(_yarn_python_env(config.python_env_archive))
    conf.update(config.conf)
    return conf


_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar")


def _yarn_python_env(archive: str | None) -> dict[str, str]:
    """Ship a packed Python environment (venv-pack / conda-pack) to every container."""
    if archive is None:
        return {}
    if not archive.endswith(_ARCHIVE_SUFFIXES):
        raise ValueError(
            f"python_env_archive={archive!r} must be a packed environment "
            f"({', '.join(_ARCHIVE_SUFFIXES)}), e.g. made with `venv-pack -o env.tar.gz`"
        )
    if "://" not in archive and not os.path.exists(archive):
        raise ValueError(
            f"python_env_archive={archive!r} does not exist; pack the environment first "
            "(`venv-pack -o env.tar.gz` or `conda pack -o env.tar.gz`)"
        )
    # The archive is unpacked in each container's working directory under this alias.
    return {
        "spark.archives": f"{archive}#environment",
        "spark.pyspark.python": "./environment/bin/python",
        # In client mode the driver keeps the interpreter it was started with.
        "spark.pyspark.driver.python": sys.executable,
        "spark.yarn.appMasterEnv.PYSPARK_PYTHON": "./environment/bin/python",
        "spark.executorEnv.PYSPARK_PYTHON": "./environment/bin/python",
    }


def executor_path_with(python: str, mode: ClusterMode) -> str:
    """A ``PATH`` for executors that puts `python`'s ``bin`` directory first.

    Ray on Spark starts each Ray node with the ``ray`` command it finds on the executor's
    ``PATH``, which lives beside the workers' Python. On YARN a packed environment's relative
    path is resolved in each container, where YARN expands ``{{PWD}}``, ``{{PATH}}`` and
    ``<CPS>``.

    Examples
    --------
    >>> executor_path_with("./environment/bin/python", ClusterMode.YARN)
    '{{PWD}}/environment/bin<CPS>{{PATH}}'
    """
    bin_dir = os.path.dirname(python)
    if mode is ClusterMode.YARN and not os.path.isabs(bin_dir):
        relative = bin_dir[2:] if bin_dir.startswith("./") else bin_dir
        return "{{PWD}}/" + relative + "<CPS>{{PATH}}"
    return os.pathsep.join(entry for entry in (bin_dir, os.environ.get("PATH")) if entry)
