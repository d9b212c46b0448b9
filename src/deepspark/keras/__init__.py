"""Keras 3 models on Spark DataFrames: ``Estimator.from_keras`` builds a `KerasEstimator`.

On the torch backend the Keras model trains through deepspark's torch engine (DDP); on the
TensorFlow backend under ``tf.distribute``. Keras itself is imported only when a Keras model
is used (``pip install deepspark[keras]``; ``deepspark[tf]`` adds TensorFlow).
"""

from deepspark.keras.keras_estimator import KerasEstimator

__all__ = ["KerasEstimator"]
