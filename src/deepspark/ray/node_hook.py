"""The start hook Ray on Spark loads while it starts a cluster for `deepspark.ray.start`.

``ray.util.spark`` builds the class named by the ``RAY_ON_SPARK_START_HOOK`` environment
variable, with no arguments, on the driver, and gives every Ray node it starts (the head here,
the worker nodes inside Spark tasks) the environment variables the hook returns. deepspark sets
them so that each node finds the ``ray`` command and carries the cluster's mark, by which
`deepspark.ray.stop` finds the processes a node leaves behind.

Imported only by Ray, once Ray is known to be installed.
"""

from __future__ import annotations

from ray.util.spark.start_hook_base import RayOnSparkStartHook

__all__ = ["NodeEnvironmentHook"]


class NodeEnvironmentHook(RayOnSparkStartHook):
    """Gives each Ray node `node_environment`, which `deepspark.ray.start` sets just before."""

    node_environment: dict[str, str] = {}

    def __init__(self) -> None:
        super().__init__(is_global=False)

    def custom_environment_variables(self) -> dict[str, str]:
        return dict(self.node_environment)
