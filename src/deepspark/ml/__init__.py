"""Spark ML Pipeline stages: `TorchEstimator` trains a PyTorch network, `TorchModel` applies it.

>>> from deepspark.ml import TorchEstimator, TorchModel
"""

try:
    import pyspark.ml  # noqa: F401
except ImportError as error:  # e.g. a worker image with torch but without pyspark
    raise ImportError(
        "deepspark.ml needs pyspark with its ML package (and numpy): pip install 'pyspark>=3.5'"
    ) from error

from deepspark.ml.estimator import TorchEstimator, TorchModel

__all__ = ["TorchEstimator", "TorchModel"]
