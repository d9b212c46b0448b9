"""deepspark: distributed deep learning directly on Apache Spark DataFrames."""

# deepspark.ray registers the start of Ray that init_context(ray=...) asks for; Ray itself is
# imported only then.
import deepspark.ray  # noqa: F401
from deepspark.context import init_context, stop_context
from deepspark.data.cache import cache, uncache
from deepspark.training import Estimator, TrainingError, checkpoint, restore, run, shard

__version__ = "0.1.0"

__all__ = [
    "Estimator",
    "TrainingError",
    "__version__",
    "cache",
    "checkpoint",
    "init_context",
    "restore",
    "run",
    "shard",
    "stop_context",
    "uncache",
]


def __getattr__(name: str):
    # `deepspark.predict` lives with the inference layer, imported on first use.
    if name == "predict":
        from deepspark.inference import predict

        return predict
    raise AttributeError(f"module 'deepspark' has no attribute {name!r}")
