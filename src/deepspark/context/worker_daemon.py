"""Spark's Python worker daemon, started with torch already imported.

Spark starts one daemon per executor (``python -m pyspark.daemon``) and forks every Python
worker from it. Each worker then imports what its tasks need; for deepspark that is torch, which
takes seconds, and Spark stops a worker idle for over a minute (a constant in Spark, not a
setting), so a fit after a pause, or after a rank was lost, pays the import again. This daemon
imports torch once, before it forks, so every worker starts with it.

`init_context` sets ``spark.python.daemon.module`` to this module where the workers run the
driver's Python (local and local-cluster masters, a Connect server it starts). On a cluster, set
it in ``conf=`` when every executor has deepspark installed. A module that fails to import is
left to the worker, as without this daemon.

Only modules that start no thread of their own are imported here: Spark's daemon forks without
threads so that no lock is held in a child, and pyarrow (jemalloc's background thread), pandas
and torchmetrics (which imports pandas) are left to the workers for that reason. numpy's
OpenBLAS pool, which torch brings, stops itself around a fork.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

__all__ = ["DAEMON_CONF", "PRELOADED", "preload"]

# The Spark conf that names the daemon module (Spark 3.5 and 4.x read it the same way).
DAEMON_CONF = "spark.python.daemon.module"

# What a training or predict task imports first; none of these starts a thread.
PRELOADED = (
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "torch.optim",
    "torch._dynamo",
)


def preload(names: tuple[str, ...] = PRELOADED) -> list[str]:
    """Import ``names``, with anything they print sent to stderr; the ones that imported.

    The daemon's stdout carries its port to the JVM, so nothing else may reach it.
    """
    imported = []
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            for name in names:
                try:
                    importlib.import_module(name)
                except Exception as error:  # the worker's own import will report it
                    print(
                        f"deepspark worker daemon: {name} did not import: {error}", file=sys.stderr
                    )
                else:
                    imported.append(name)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    return imported


def main() -> None:
    preload()
    from pyspark import daemon

    daemon.manager()


if __name__ == "__main__":
    main()
