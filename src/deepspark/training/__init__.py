"""Distributed PyTorch training inside Spark: `Estimator` (driver) and the rank-side engine."""

from deepspark.training.driver.estimator import Estimator, TrainingError

__all__ = ["Estimator", "TrainingError"]
