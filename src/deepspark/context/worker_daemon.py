"""Spark's Python worker daemon, started with torch, torchmetrics and the task modules imported.

Run by Spark (``python -m``), never imported by deepspark itself. Spark starts one daemon per
executor (``python -m pyspark.daemon``) and forks every Python worker from it. Each worker then
imports what its tasks need; for deepspark that is torch, which takes seconds, and Spark stops a
worker idle for over a minute (a constant in Spark, not a setting), so a fit after a pause, or
after a rank was lost, pays the imports again. This daemon imports them once, before it forks,
so every worker starts with them.

`init_context` sets ``spark.python.daemon.module`` to this module where the workers run the
driver's own interpreter on the driver's machine (local and local-cluster masters, a standalone
master on loopback, a Connect server it starts), unless ``conf=`` names another daemon. On a
cluster, name it in ``conf=`` when every executor has deepspark installed. A module that fails
to import is left to the worker, as without this daemon.

Spark's own daemon forks with no thread running, so that no child starts with a lock held by a
thread it does not have. This one keeps to that, but for the OpenBLAS pools of numpy and scipy,
which stop themselves around a fork: pyarrow's jemalloc would start a background thread when
torchmetrics (through pandas) loads it, and the daemon turns that thread off
(``JE_ARROW_MALLOC_CONF``, unless already set), so its workers' jemalloc returns freed memory as
it allocates instead of from a thread of its own.
"""

from __future__ import annotations

import importlib
import os
import sys

__all__ = ["preload"]

# jemalloc's options, as pyarrow's copy of it reads them from the environment
_ARROW_JEMALLOC_ENV = "JE_ARROW_MALLOC_CONF"


def preload(names: tuple[str, ...] | None = None) -> list[str]:
    """Import ``names`` (the task modules by default), with anything they print sent to stderr;
    the ones that imported.

    The daemon's stdout carries its port to the JVM, so nothing else may reach it. pyarrow's
    jemalloc starts no background thread in this process or its children: the environment says
    so before anything here can load pyarrow.
    """
    os.environ.setdefault(_ARROW_JEMALLOC_ENV, "background_thread:false")
    if names is None:
        from deepspark.context.workers import TASK_MODULES

        names = TASK_MODULES
    imported = []
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # Python's and C's writes to stdout alike
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as error:  # the worker's own import will report it
                print(f"deepspark worker daemon: {name} did not import: {error}", file=sys.stderr)
            else:
                imported.append(name)
    finally:
        sys.stdout.flush()  # while fd 1 is still stderr
        os.dup2(saved, 1)
        os.close(saved)
    return imported


def main() -> None:
    preload()
    from pyspark import daemon

    daemon.manager()


if __name__ == "__main__":
    main()
