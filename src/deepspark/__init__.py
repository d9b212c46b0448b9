"""deepspark: distributed deep learning directly on Apache Spark DataFrames."""

from deepspark.context import init_context, stop_context

__version__ = "0.1.0"

__all__ = ["__version__", "init_context", "stop_context"]
