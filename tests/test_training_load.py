"""`load` called on the class gives a new estimator; called on an estimator (Orca's habit) it
loads into that estimator. Neither leaves the user with an untrained model."""

from __future__ import annotations

import cloudpickle
import numpy as np
import pytest
import torch

import _training_helpers as helpers
import deepspark as ds

cloudpickle.register_pickle_by_value(helpers)


def _driver_accuracy(est: ds.Estimator) -> float:
    """Test accuracy of the estimator's model, computed here with plain torch."""
    _, _, test_x, test_y = helpers.digits_arrays()
    model = est.get_model().eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_x)).argmax(dim=1).numpy()
    return float(np.mean(predicted == test_y))


def _new_estimator() -> ds.Estimator:
    torch.manual_seed(1)
    return ds.Estimator.from_torch(
        model=helpers.DigitsNet(),
        optimizer=lambda params: torch.optim.Adam(params, 1e-2),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
    )


@pytest.mark.slow
def test_load_on_the_class_and_on_an_estimator_both_give_the_trained_model(spark, tmp_path):
    train_df, test_df = helpers.digits_frames(spark)
    trained = _new_estimator()
    trained.fit(train_df, feature_cols="features", label_cols="label", epochs=3,
                batch_size=64, num_workers=2, seed=0)  # fmt: skip
    saved_accuracy = _driver_accuracy(trained)
    assert saved_accuracy > 0.85
    path = trained.save(str(tmp_path / "model"))

    by_class = ds.Estimator.load(path)
    assert _driver_accuracy(by_class) == pytest.approx(saved_accuracy)

    orca_user = _new_estimator()  # untrained: near chance
    assert _driver_accuracy(orca_user) < 0.3
    returned = orca_user.load(path)
    assert returned is orca_user
    assert _driver_accuracy(orca_user) == pytest.approx(saved_accuracy)
    scores = orca_user.evaluate(test_df, feature_cols="features", label_cols="label")
    assert scores["accuracy"] == pytest.approx(saved_accuracy, abs=1e-6)
    # it trains on from the saved optimizer state, as the class call's estimator does
    assert orca_user._optimizer_state == by_class._optimizer_state is not None


def test_load_into_an_estimator_of_another_kind_is_refused_with_the_right_call(tmp_path):
    from deepspark.persist.keras_files import import_keras

    keras = import_keras("torch")
    path = str(tmp_path / "dense.keras")
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    torch_estimator = ds.Estimator.from_torch(torch.nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"holds a KerasEstimator.*ds\.Estimator\.load\("):
        torch_estimator.load(path)
    assert type(ds.Estimator.load(path)).__name__ == "KerasEstimator"


def test_load_on_an_estimator_keeps_the_subclass(tmp_path):
    path = str(tmp_path / "linear.pt2")
    program = torch.export.export(torch.nn.Linear(4, 2), (torch.ones(2, 4),))
    torch.export.save(program, path)

    class Custom(ds.Estimator):
        pass

    custom = Custom(model=torch.nn.Linear(4, 2), optimizer=None, loss=None)
    assert isinstance(Custom.load(path), Custom)
    assert custom.load(path, metrics=["mse"]) is custom
    assert custom.metrics == ["mse"]
    assert tuple(custom.get_model()(torch.ones(2, 4)).shape) == (2, 2)
