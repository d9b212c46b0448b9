"""deepspark: distributed deep learning directly on Apache Spark DataFrames.

The front door's names are imported on first use (PEP 562), so ``import deepspark`` loads
neither pyspark nor torch; ``deepspark.Estimator`` loads the training engine when asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepspark.context import init_context, stop_context
    from deepspark.data.cache import cache, uncache
    from deepspark.errors import DeepsparkError
    from deepspark.inference import predict
    from deepspark.training import (
        Estimator,
        TrainingError,
        checkpoint,
        restore,
        run,
        shard,
    )

__version__ = "0.1.0"

# Each public name and the module it lives in.
_HOMES = {
    "DeepsparkError": "deepspark.errors",
    "Estimator": "deepspark.training",
    "TrainingError": "deepspark.training",
    "cache": "deepspark.data.cache",
    "checkpoint": "deepspark.training",
    "restore": "deepspark.training",
    "run": "deepspark.training",
    "shard": "deepspark.training",
    "init_context": "deepspark.context",
    "predict": "deepspark.inference",
    "stop_context": "deepspark.context",
    "uncache": "deepspark.data.cache",
}

__all__ = [
    "DeepsparkError",
    "Estimator",
    "TrainingError",
    "__version__",
    "cache",
    "checkpoint",
    "init_context",
    "predict",
    "restore",
    "run",
    "shard",
    "stop_context",
    "uncache",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'deepspark' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
