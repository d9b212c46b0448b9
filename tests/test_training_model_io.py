"""The model in and out of an Estimator: weights, the optimizer state a second fit continues
from, save / load, and TorchScript / torch.export files loaded without the model's classes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import cloudpickle
import numpy as np
import pytest
import torch

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import DigitsNet, digits_arrays, digits_frames
from deepspark.persist.optimizer_state import (
    OptimizerStateMismatch,
    load_optimizer_state,
    optimizer_state_to_bytes,
)
from deepspark.persist.programs import ProgramKind, ProgramModule

# Spark's Python workers cannot import the tests folder: ship these helpers by value.
cloudpickle.register_pickle_by_value(helpers)

LR = 3e-3
FIT = {
    "feature_cols": "features",
    "label_cols": "label",
    "batch_size": 64,
    "num_workers": 2,
    "seed": 0,
    "progress": False,
}


def _estimator() -> ds.Estimator:
    torch.manual_seed(0)
    return ds.Estimator.from_torch(
        model=DigitsNet(),
        # trainable parameters only: freezing a layer changes what the factory builds
        optimizer=lambda params: torch.optim.Adam([p for p in params if p.requires_grad], lr=LR),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
    )


def _adam_steps(est: ds.Estimator) -> set[int]:
    """Adam's step counter of every parameter in the optimizer state the next fit gets."""
    return {int(entry["step"]) for entry in est.optimizer_state_dict()["state"].values()}


def _same_weights(first: ds.Estimator, second: ds.Estimator) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_second_fit_continues_the_optimizer_state(spark):
    train_df, _ = digits_frames(spark)
    est = _estimator()
    first = est.fit(train_df, epochs=3, **FIT)
    assert _adam_steps(est) == {int(first["steps"].sum())}
    # the same weights with a fresh optimizer, for comparison
    fresh = _estimator()
    fresh.load_state_dict(est.state_dict())
    assert fresh.optimizer_state_dict() is None

    second = est.fit(train_df, epochs=3, **FIT)
    assert _adam_steps(est) == {int(first["steps"].sum() + second["steps"].sum())}
    restarted = fresh.fit(train_df, epochs=3, **FIT)
    reference = _estimator().fit(train_df, epochs=6, **FIT)

    # Not bit for bit one 6-epoch fit: the second fit numbers its epochs from 0 again, so
    # its per-epoch shuffles repeat the first fit's instead of drawing those of epochs 3-5.
    # Its losses follow the 6-epoch curve closely all the same...
    carried = second["train_loss"].to_numpy()
    expected = reference["train_loss"].to_numpy()[3:]
    assert carried == pytest.approx(expected, rel=0.05)
    # ...much closer than the same weights with a fresh Adam, whose first steps jump
    gap_carried = abs(carried[0] - expected[0])
    gap_fresh = abs(restarted["train_loss"].iloc[0] - expected[0])
    assert gap_carried < gap_fresh / 3, (carried[0], restarted["train_loss"].iloc[0], expected[0])


@pytest.mark.slow
def test_saved_estimator_continues_where_it_stopped(spark, tmp_path):
    train_df, _ = digits_frames(spark)
    est = _estimator()
    first = est.fit(train_df, epochs=3, **FIT)
    path = str(tmp_path / "digits")
    est.save(path)
    assert (tmp_path / "digits" / "optimizer.pt").exists()

    loaded = ds.Estimator.load(path)
    assert _adam_steps(loaded) == {int(first["steps"].sum())}
    in_memory = est.fit(train_df, epochs=3, **FIT)
    from_disk = loaded.fit(train_df, epochs=3, **FIT)
    # the loaded estimator continues exactly as the one that stayed in memory
    assert from_disk["train_loss"].tolist() == in_memory["train_loss"].tolist()
    assert _same_weights(loaded, est)
    assert _adam_steps(loaded) == {int(first["steps"].sum() + from_disk["steps"].sum())}

    # an optimizer factory that now builds other parameter groups is refused on the driver
    for param in loaded.get_model().layers[0].parameters():
        param.requires_grad_(False)
    with pytest.raises(OptimizerStateMismatch, match=r"est\.reset_optimizer\(\)"):
        loaded.fit(train_df, epochs=1, **FIT)
    loaded.reset_optimizer()
    assert loaded.optimizer_state_dict() is None
    # saved again without one, the directory loses the old optimizer.pt
    loaded.save(path)
    assert not (tmp_path / "digits" / "optimizer.pt").exists()
    assert ds.Estimator.load(path).optimizer_state_dict() is None


@pytest.mark.slow
def test_state_dict_round_trip_reproduces_evaluate(spark):
    train_df, test_df = digits_frames(spark)
    est = _estimator()
    est.fit(train_df, epochs=2, **FIT)
    scores = est.evaluate(test_df, "features", "label")
    weights = est.state_dict()

    est.fit(train_df, epochs=1, **FIT)  # moves the weights, not the copy taken before
    assert est.evaluate(test_df, "features", "label") != scores
    est.load_state_dict(weights)
    assert est.evaluate(test_df, "features", "label") == scores

    untrained = _estimator()
    untrained.load_state_dict(weights)
    assert untrained.evaluate(test_df, "features", "label") == scores

    # a TorchScript module handed to from_torch travels to the ranks too
    scripted = torch.jit.trace(untrained.get_model().eval(), torch.zeros(1, 64))
    scripted_scores = ds.Estimator.from_torch(scripted, metrics=["accuracy"]).evaluate(
        test_df, "features", "label"
    )
    assert scripted_scores["accuracy"] == pytest.approx(scores["accuracy"], abs=1e-12)


# A fresh Python process: deepspark and sklearn, but no tests folder, so no DigitsNet.
_FRESH_PROCESS = """
import importlib.util, json, sys
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score
import deepspark as ds

assert importlib.util.find_spec("_training_helpers") is None, "the model class is importable"
data = np.load(sys.argv[1])
spark = ds.init_context(cores=2)
frame = pd.DataFrame({"features": list(data["x"].astype(np.float64)), "label": data["y"]})
test_df = spark.createDataFrame(frame, "features array<double>, label long")
results = {}
for path in sys.argv[2:]:
    est = ds.Estimator.load(path, metrics=["accuracy"])
    predicted = est.predict(test_df, feature_cols="features", output="class").toPandas()
    scores = est.evaluate(test_df, "features", "label")
    try:
        est.fit(test_df, feature_cols="features", label_cols="label")
        refusal = None
    except ValueError as error:
        refusal = str(error)
    results[path] = {
        "kind": est.get_model().kind.value,
        "sklearn_accuracy": accuracy_score(predicted["label"], predicted["prediction"]),
        "accuracy": scores["accuracy"],
        "refusal": refusal,
    }
ds.stop_context()
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow
def test_program_files_load_for_inference_without_the_model_class(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    est = _estimator()
    est.fit(train_df, epochs=3, **FIT)
    expected = est.evaluate(test_df, "features", "label")["accuracy"]
    _, _, test_x, test_y = digits_arrays()
    sample = torch.from_numpy(test_x[:8])
    paths = [
        est.export_torchscript(str(tmp_path / "digits.pt"), sample),
        est.export_program(str(tmp_path / "digits.pt2"), sample),
    ]
    np.savez(tmp_path / "test.npz", x=test_x, y=test_y)
    (tmp_path / "fresh.py").write_text(textwrap.dedent(_FRESH_PROCESS))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, str(tmp_path / "fresh.py"), str(tmp_path / "test.npz"), *paths],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert set(results) == set(paths)
    for result in results.values():
        assert result["accuracy"] == pytest.approx(result["sklearn_accuracy"], abs=1e-12)
        assert result["accuracy"] == pytest.approx(expected, abs=1e-12)
        assert "built for inference" in result["refusal"]
    assert [results[path]["kind"] for path in paths] == ["torchscript", "torch_export"]


@pytest.mark.parametrize("kind", list(ProgramKind))
def test_program_module_pickles_with_its_current_weights(tmp_path, kind):
    torch.manual_seed(0)
    model = DigitsNet().eval()
    sample = torch.rand(4, 64)
    est = ds.Estimator.from_torch(model)
    if kind is ProgramKind.TORCHSCRIPT:
        path = est.export_torchscript(str(tmp_path / "digits.pt"), sample)
    else:
        path = est.export_program(str(tmp_path / "digits.pt2"), sample)
    loaded = ProgramModule.load(path, kind)
    assert set(loaded.state_dict()) == set(model.state_dict())
    loaded.eval()  # an exported program's own module refuses eval(); the wrapper does not
    with torch.no_grad():
        assert torch.allclose(loaded(sample), model(sample), atol=1e-6)
        zeros = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
        loaded.load_state_dict(zeros)
        for copy in (
            pickle.loads(pickle.dumps(loaded)),
            cloudpickle.loads(cloudpickle.dumps(loaded)),
        ):
            assert isinstance(copy, ProgramModule)
            assert torch.count_nonzero(copy(sample)) == 0


def test_carried_state_that_no_longer_fits_is_refused_on_the_rank():
    model = DigitsNet()
    adam = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 64)).sum().backward()
    adam.step()
    saved = optimizer_state_to_bytes(adam.state_dict())
    # the rank's fresh optimizers: two groups where the last fit had one
    layers = model.layers
    regrouped = torch.optim.Adam(
        [{"params": layers[0].parameters()}, {"params": layers[2].parameters()}]
    )
    with pytest.raises(OptimizerStateMismatch, match=r"1 optimizer .*reset_optimizer"):
        load_optimizer_state(saved, [regrouped])
    same = torch.optim.Adam(model.parameters())
    load_optimizer_state(saved, [same])
    assert int(same.state_dict()["state"][0]["step"]) == 1
