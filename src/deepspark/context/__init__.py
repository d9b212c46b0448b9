"""Spark session management: one entry point for every deployment."""

from deepspark.context.config import ClusterMode, ContextConfig, ContextError, resolve_spark_conf
from deepspark.context.session import init_context, stop_context
from deepspark.context.workers import WorkerEnvironmentError, check_workers

__all__ = [
    "ClusterMode",
    "ContextConfig",
    "ContextError",
    "WorkerEnvironmentError",
    "check_workers",
    "init_context",
    "resolve_spark_conf",
    "stop_context",
]
