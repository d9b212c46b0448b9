"""Keras 3 models on Spark DataFrames: ``Estimator.from_keras`` builds a `KerasEstimator`.

On the torch backend the Keras model trains through deepspark's torch engine (DDP); on the
TensorFlow backend under ``tf.distribute``. Keras itself is imported only when a Keras model
is used (``pip install deepspark[keras]``; ``deepspark[tf]`` adds TensorFlow).

Importing this package registers the Keras model family with the engine
(`deepspark.training.model_families`): ``Estimator.from_keras`` and ``Estimator.load`` of a
``.keras`` file reach `KerasEstimator` through it.
"""

from deepspark.keras.keras_estimator import KerasEstimator, build_keras_estimator
from deepspark.persist.keras_estimator_dir import holds_keras_model
from deepspark.training.model_families import ModelFamily, register_family

register_family(
    ModelFamily(
        name="keras",
        build=build_keras_estimator,
        load=KerasEstimator.load,
        holds_saved_model=holds_keras_model,
    )
)

__all__ = ["KerasEstimator"]
