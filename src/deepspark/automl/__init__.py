"""AutoML on Spark: an Optuna search whose every trial is a deepspark distributed fit.

Needs the extra ``deepspark[automl]`` (Optuna; matplotlib for the plots).
"""

try:
    import optuna  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError("deepspark.automl needs Optuna: pip install 'deepspark[automl]'") from error

from deepspark.automl.search import AutoEstimator

__all__ = ["AutoEstimator"]
