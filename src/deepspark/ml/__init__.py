"""Spark ML Pipeline stages: `TorchEstimator` trains a PyTorch network, `TorchModel` applies it.

>>> from deepspark.ml import TorchEstimator, TorchModel

The stages need pyspark's ML package; the names are imported on first use, so that the few
pieces training tasks unpickle (:mod:`deepspark.ml.losses`) load without pyspark.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepspark.ml.stages import TorchEstimator, TorchModel

__all__ = ["TorchEstimator", "TorchModel"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'deepspark.ml' has no attribute {name!r}")
    try:
        import pyspark.ml  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"deepspark.ml.{name} needs pyspark with its ML package (and numpy): "
            "pip install 'pyspark>=3.5'"
        ) from error
    from deepspark.ml import stages

    return getattr(stages, name)
