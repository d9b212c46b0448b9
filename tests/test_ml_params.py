"""deepspark.ml Params, copies, grids and the loss rules, without a Spark job."""

from __future__ import annotations

import pytest
import torch
from pyspark.ml.tuning import ParamGridBuilder

from deepspark.ml import TorchEstimator, TorchModel
from deepspark.ml.core import optimizer_factory
from deepspark.ml.losses import LossTask, TargetShapedLikeOutputs, default_output_kind, loss_task

OPTIONAL = {"checkpointDir", "featureShape", "model", "loss"}


def _estimator(**kwargs) -> TorchEstimator:
    return TorchEstimator(model=torch.nn.Linear(4, 3), loss=torch.nn.CrossEntropyLoss(), **kwargs)


def test_every_param_has_a_doc_and_a_default_unless_optional():
    for stage in (_estimator(), TorchModel()):
        for param in stage.params:
            assert len(param.doc) > 10, param.name
            assert stage.hasDefault(param) or param.name in OPTIONAL, param.name
    # the getters of optional Params answer None when unset, where Spark's getOrDefault raises
    est = TorchEstimator()
    assert est.getModel() is None and est.getLoss() is None
    assert est.getCheckpointDir() is None and est.getFeatureShape() is None


def test_constructor_is_keyword_only_and_set_params_keeps_unset_values():
    with pytest.raises(TypeError, match="keyword"):
        TorchEstimator(torch.nn.Linear(4, 3))  # type: ignore[misc]
    est = _estimator(epochs=3, featureShape=(1, 2, 2))
    assert est.getFeatureShape() == [1, 2, 2]
    est.setParams(learningRate=0.5, checkpointDir=None)
    assert (est.getEpochs(), est.getLearningRate(), est.getCheckpointDir()) == (3, 0.5, None)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": "resnet"}, TypeError, r"model must be a torch.nn.Module.*builtins.str"),
        ({"model": torch.nn.Linear}, TypeError, r"model must be a torch.nn.Module"),
        ({"loss": torch.nn.MSELoss}, TypeError, r"pass an instance, e.g. MSELoss\(\)"),
        ({"loss": 3}, TypeError, r"loss must be callable"),
        ({"optimizer": "torch.optim.Nope"}, ValueError, r"does not name an importable"),
        ({"metrics": "accuracy"}, TypeError, r"metrics must be a list"),
        ({"epochs": 0}, ValueError, r"epochs=0: give a positive integer"),
        ({"learningRate": -1.0}, ValueError, r"learningRate=-1.0"),
        ({"validationFraction": 1.0}, ValueError, r"validationFraction=1.0"),
        ({"outputKind": "logits"}, ValueError, r"outputKind='logits' is not known"),
        ({"optimizerParams": {"lr": 0.1}}, ValueError, r"with learningRate="),
        ({"featureShape": [0, 8]}, ValueError, r"featureShape"),
    ],
)
def test_bad_param_values_fail_when_set_with_the_param_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        TorchEstimator(**kwargs)


def test_an_optimizer_instance_is_refused_with_the_way_to_fix_it():
    net = torch.nn.Linear(4, 3)
    with pytest.raises(TypeError, match=r"optimizer class such as torch.optim.Adam"):
        TorchEstimator(optimizer=torch.optim.SGD(net.parameters(), lr=0.1))


def test_copy_and_param_grid_carry_values_and_objects():
    est = _estimator(metrics=["accuracy"])
    grid = (
        ParamGridBuilder()
        .addGrid(est.learningRate, [3e-3, 1e-7])
        .addGrid(est.optimizer, [torch.optim.Adam, "torch.optim.SGD"])
        .build()
    )
    assert len(grid) == 4
    copies = [est.copy(params) for params in grid]
    assert sorted({c.getLearningRate() for c in copies}) == [1e-7, 3e-3]
    assert {c.getOptimizer() for c in copies} == {torch.optim.Adam, "torch.optim.SGD"}
    assert all(c.getModel() is est.getModel() for c in copies)  # fit deep-copies, not copy()
    assert est.getLearningRate() == 1e-3 and est.getOptimizer() == "torch.optim.Adam"


def test_optimizer_factory_binds_the_learning_rate_and_extra_arguments():
    net = torch.nn.Linear(4, 3)
    built = optimizer_factory("torch.optim.SGD", 0.25, {"momentum": 0.5})(net.parameters())
    assert isinstance(built, torch.optim.SGD)
    assert built.defaults["lr"] == 0.25 and built.defaults["momentum"] == 0.5


def test_losses_decide_labels_and_default_output():
    assert loss_task(torch.nn.CrossEntropyLoss()) is LossTask.CLASSIFICATION
    assert loss_task(torch.nn.BCEWithLogitsLoss()) is LossTask.BINARY
    assert loss_task(torch.nn.HuberLoss()) is LossTask.REGRESSION
    assert loss_task(lambda out, y: (out - y).abs().mean()) is LossTask.OTHER
    assert [default_output_kind(task) for task in LossTask] == ["class", "class", "double", "auto"]

    mse = TargetShapedLikeOutputs(torch.nn.MSELoss())
    outputs, targets = torch.zeros(5, 1), torch.arange(5.0)
    # without the reshape MSELoss would broadcast (5, 1) against (5,) to (5, 5)
    assert float(mse(outputs, targets)) == pytest.approx(float((targets**2).mean()))
    assert float(mse(torch.zeros(5, 2), torch.ones(5, 2))) == 1.0


def test_torch_model_without_a_network_says_where_to_get_one():
    with pytest.raises(ValueError, match=r"holds no network.*TorchModel\(module="):
        _ = TorchModel().module
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module"):
        TorchModel(module=object())
