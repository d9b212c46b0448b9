"""Ray on Spark: a Ray cluster on the executors of deepspark's Spark application.

``deepspark.init_context(ray=True)`` (or `start` on a running session) starts it with Ray's
``ray.util.spark``; `deepspark.stop_context` (or `stop`) tears it down. Needs
``pip install 'deepspark[ray]'``; Ray itself is imported only when a cluster starts.
"""

from deepspark.ray.cluster import RayCluster, current, start, stop
from deepspark.ray.preflight import RayOnSparkError, check_master

__all__ = ["RayCluster", "RayOnSparkError", "check_master", "current", "start", "stop"]
