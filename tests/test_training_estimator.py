"""Estimator construction and persistence (no Spark job needed)."""

from __future__ import annotations

import json

import fsspec
import pandas as pd
import pytest
import torch

import deepspark as ds
from _training_helpers import DigitsNet


def _trained_estimator() -> ds.Estimator:
    torch.manual_seed(0)
    est = ds.Estimator.from_torch(
        model=DigitsNet(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
        config={"hidden": 64},
    )
    with torch.no_grad():
        for parameter in est.get_model().parameters():
            parameter.add_(0.5)  # weights that differ from a fresh model's
    est.history = pd.DataFrame({"epoch": [0, 1], "train_loss": [1.0, 0.5]})
    est._feature_cols = ["features"]
    return est


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_save_and_load_round_trip(tmp_path, scheme):
    est = _trained_estimator()
    path = str(tmp_path / "model") if scheme == "file" else "memory://deepspark-test/model"
    est.save(path)
    fs, root = fsspec.core.url_to_fs(path)
    assert {name.rsplit("/", 1)[-1] for name in fs.ls(root, detail=False)} == {
        "metadata.json",
        "weights.safetensors",
        "model.pkl",
        "training.pkl",
    }
    metadata = json.loads(fs.cat_file(f"{root}/metadata.json"))
    assert metadata["model_class"].endswith("DigitsNet")
    loaded = ds.Estimator.load(path)
    sample = torch.rand(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded.get_model()(sample), est.get_model()(sample))
    assert loaded.history.to_dict() == est.history.to_dict()
    assert loaded.metrics == ["accuracy"]
    assert loaded.config == {"hidden": 64}
    optimizer = loaded._optimizer_factory(loaded.get_model().parameters())
    assert isinstance(optimizer, torch.optim.Adam)


def test_load_refuses_a_directory_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved deepspark model"):
        ds.Estimator.load(str(tmp_path))


def test_optimizer_instance_is_rebuilt_per_replica():
    model = DigitsNet()
    driver_optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    est = ds.Estimator.from_torch(
        model=model, optimizer=driver_optimizer, loss=torch.nn.CrossEntropyLoss()
    )
    replica = DigitsNet()
    rebuilt = est._optimizer_factory(replica.parameters())
    assert type(rebuilt) is torch.optim.SGD
    assert rebuilt.defaults["lr"] == 0.05 and rebuilt.defaults["momentum"] == 0.9
    assert rebuilt.param_groups[0]["params"][0] is next(replica.parameters())


def test_model_function_receives_the_config():
    est = ds.Estimator.from_torch(
        model=lambda config: DigitsNet(config["hidden"]),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        loss=torch.nn.CrossEntropyLoss(),
        config={"hidden": 7},
    )
    assert est.get_model().layers[0].out_features == 7


def test_from_torch_refuses_missing_loss_and_wrong_model():
    with pytest.raises(ValueError, match="loss="):
        ds.Estimator.from_torch(model=DigitsNet(), optimizer=lambda p: torch.optim.SGD(p, 0.1))
    with pytest.raises(TypeError, match="nn.Module"):
        ds.Estimator.from_torch(model=lambda config: "not a model", loss=torch.nn.MSELoss())
    with pytest.raises(TypeError, match="optimizer must be"):
        ds.Estimator.from_torch(model=DigitsNet(), optimizer=3, loss=torch.nn.MSELoss())


def test_exports_run_in_their_own_runtimes_like_torch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    est = ds.Estimator.from_torch(
        model=DigitsNet(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        loss=torch.nn.CrossEntropyLoss(),
    )
    sample = torch.rand(6, 64)
    with torch.no_grad():
        expected = est.get_model()(sample).numpy()

    onnx_path = est.export_onnx(str(tmp_path / "model.onnx"), sample)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
    assert got == pytest.approx(expected, abs=1e-5)

    script_path = est.export_torchscript(str(tmp_path / "model.pt"), sample)
    with torch.no_grad():
        scripted = torch.jit.load(script_path)(sample).numpy()
    assert scripted == pytest.approx(expected, abs=1e-5)

    program_path = est.export_program(str(tmp_path / "model.pt2"), sample)
    with torch.no_grad():
        exported = torch.export.load(program_path).module()(sample).numpy()
    assert exported == pytest.approx(expected, abs=1e-5)
