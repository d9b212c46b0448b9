"""What differs between the PySpark releases deepspark supports (3.5 and 4.x), answered once.

Driver side. The core (fit, evaluate, predict, the Spark ML stages) runs on PySpark 3.5 as well
as 4.x; the few calls that 4.0 added are bridged here, and a capability that needs a newer
release refuses up front with `require_pyspark`, naming the release it needs.

Examples
--------
>>> from deepspark.context.spark_versions import pyspark_version
>>> pyspark_version() >= (3, 5)
True
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from deepspark.errors import DeepsparkError

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

__all__ = ["PySparkVersionError", "collect_arrow", "pyspark_version", "require_pyspark"]


class PySparkVersionError(DeepsparkError, RuntimeError):
    """A capability needs a newer PySpark than the one installed."""


def pyspark_version() -> tuple[int, int]:
    """The installed PySpark's (major, minor) release: the client's, which sets the API."""
    import pyspark

    found = re.match(r"(\d+)\.(\d+)", pyspark.__version__)
    if found is None:  # a development build without a release number: the newest API
        return (99, 0)
    return int(found.group(1)), int(found.group(2))


def require_pyspark(minimum: tuple[int, int], capability: str) -> None:
    """Refuse `capability` before it starts when PySpark is older than `minimum`.

    Raises
    ------
    PySparkVersionError
        Naming the capability, the release it needs and the one installed.
    """
    import pyspark

    if pyspark_version() < minimum:
        needed = ".".join(str(part) for part in minimum)
        raise PySparkVersionError(
            f"{capability} needs PySpark >= {needed}, but PySpark {pyspark.__version__} is "
            f"installed; run `pip install 'pyspark>={needed}'` (fit, evaluate, predict and the "
            "Spark ML stages also run on PySpark 3.5)"
        )


def collect_arrow(df: DataFrame) -> pa.Table:
    """A DataFrame's rows on the driver as one pyarrow Table, on every supported PySpark.

    ``DataFrame.toArrow`` is new in PySpark 4.0; on 3.5 a classic DataFrame collects its Arrow
    batches (``_collect_as_arrow``, what ``toPandas`` uses) and a Connect DataFrame asks its
    client for the table (what its ``toPandas`` uses). Only for results that fit in the
    driver's memory.
    """
    # The class, not the instance: a classic DataFrame answers unknown attributes with its
    # columns, so a column named "toArrow" would look like the method.
    if getattr(type(df), "toArrow", None) is not None:
        return df.toArrow()
    if type(df).__module__.startswith("pyspark.sql.connect"):
        client = df._session.client
        table, _ = client.to_table(df._plan.to_proto(client))
        return table
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = to_arrow_schema(df.schema)
    batches = df._collect_as_arrow()
    if not batches:
        return schema.empty_table()
    return pa.Table.from_batches(batches).cast(schema)
