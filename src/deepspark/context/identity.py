"""Which session a Spark object belongs to: a Spark Connect client's or a classic one, and a key
naming it. The bottom of `deepspark.context`: `topology`, `workers` and `session` ask here.

Nothing here imports pyspark.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_connect", "session_identity"]


def is_connect(spark: Any) -> bool:
    """Whether `spark` (a session, or a DataFrame) is a Spark Connect client's object."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def session_identity(spark: Any) -> str:
    """A key naming `spark`'s workers: the application, or the Connect session.

    Per-session state (the workers' check, the DataFrame caches) is kept under it.
    """
    if is_connect(spark):
        return f"connect:{spark.session_id}"
    return f"classic:{spark.sparkContext.applicationId}"
