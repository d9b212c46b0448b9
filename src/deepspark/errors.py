"""The root of deepspark's own exceptions.

Every error class the library defines derives from `DeepsparkError`, so one ``except
deepspark.DeepsparkError`` catches whatever deepspark raised on purpose. Each class keeps its
builtin base as well (``ValueError`` for bad input, ``RuntimeError`` for a failed job), so
code that catches those goes on working.

This module imports nothing: rank-side modules (no pyspark) and every floor of the layout can
derive from it.

Examples
--------
>>> import deepspark as ds
>>> from deepspark.data.spec import FeedError
>>> issubclass(FeedError, ds.DeepsparkError), issubclass(FeedError, ValueError)
(True, True)
"""

from __future__ import annotations

__all__ = ["DeepsparkError"]


class DeepsparkError(Exception):
    """Base class of the errors deepspark raises itself (``except deepspark.DeepsparkError``)."""
