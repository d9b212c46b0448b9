"""Model sources, the runtimes, the per-process cache and verified export (no Spark)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepspark.inference import (
    ExportMismatchError,
    ModelInputError,
    ModelKind,
    ModelSource,
    cache_info,
    clear_cache,
    export_onnx,
    export_program,
    export_torchscript,
    load_model,
    model_source,
)
from deepspark.inference._cache import SizedLRUCache
from deepspark.inference.models import ModelIntegrityError, private_model_dir
from deepspark.inference.runtimes import torchscript_deprecation_silenced


def make_mlp(features: int = 6, outputs: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, outputs)
    ).eval()


@pytest.fixture(scope="module")
def mlp() -> torch.nn.Module:
    return make_mlp()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mlp) -> dict[ModelKind, str]:
    """The same MLP in each file format, each export verified by its own runtime."""
    root = tmp_path_factory.mktemp("exported")
    sample = torch.randn(4, 6)
    return {
        ModelKind.ONNX: export_onnx(mlp, str(root / "mlp.onnx"), sample, input_names=["x"]),
        ModelKind.TORCHSCRIPT: export_torchscript(mlp, str(root / "mlp.ts"), sample),
        ModelKind.TORCH_EXPORT: export_program(mlp, str(root / "mlp.pt2"), sample),
    }


@pytest.mark.parametrize("kind", [ModelKind.ONNX, ModelKind.TORCHSCRIPT, ModelKind.TORCH_EXPORT])
def test_every_file_kind_is_recognised_and_predicts_like_torch(exported, mlp, kind):
    source = model_source(exported[kind])
    assert source.kind is kind and source.payload is None
    inputs = torch.randn(37, 6)  # a batch size the export never saw
    output = load_model(source)((inputs,))
    with torch.no_grad():
        expected = mlp(inputs)
    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)


def test_in_memory_models_travel_as_bytes_and_predict_like_torch(mlp):
    inputs = torch.randn(9, 6)
    with torch.no_grad():
        expected = mlp(inputs)
    with torchscript_deprecation_silenced():
        scripted = torch.jit.trace(mlp, inputs)
    program = torch.export.export(mlp, (inputs,))
    for model, kind in [
        (mlp, ModelKind.TORCH),
        (scripted, ModelKind.TORCHSCRIPT),
        (program, ModelKind.TORCH_EXPORT),
    ]:
        source = model_source(model)
        assert source.kind is kind and source.payload is not None
        torch.testing.assert_close(load_model(source)((inputs,)), expected, atol=1e-5, rtol=0)


def test_identity_follows_content_not_object(mlp):
    assert model_source(mlp).identity == model_source(mlp).identity
    other = make_mlp()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    assert model_source(other).identity != model_source(mlp).identity


def test_an_estimator_stands_for_its_trained_model_and_anything_else_is_refused(mlp):
    import deepspark as ds

    estimator = ds.Estimator.from_torch(model=mlp)
    assert model_source(estimator).identity == model_source(mlp).identity
    with pytest.raises(TypeError, match="model is of type dict; .*a fitted Estimator"):
        model_source({"weights": 1})


def test_a_file_changed_in_place_gets_a_new_identity(tmp_path):
    path = str(tmp_path / "m.ts")
    export_torchscript(make_mlp(), path, torch.randn(2, 6))
    before = ModelSource.from_path(path).identity
    export_torchscript(make_mlp(outputs=2), path, torch.randn(2, 6))
    assert ModelSource.from_path(path).identity != before


def test_missing_model_path_is_refused(tmp_path):
    missing = str(tmp_path / "nowhere.onnx")
    with pytest.raises(FileNotFoundError, match="nowhere.onnx.*does not exist"):
        model_source(missing)


def test_a_torch_save_pickle_is_refused_not_unpickled(tmp_path):
    path = str(tmp_path / "module.pt")
    torch.save(make_mlp(), path)
    with pytest.raises(ValueError, match="torch.save pickle is not loaded"):
        model_source(path)


def test_a_large_model_spills_to_the_directory_and_loads_from_there(tmp_path, mlp):
    small_limit = 1024  # the MLP pickles to a few KiB
    with pytest.raises(ValueError, match="spill_dir="):
        model_source(mlp, max_inline_bytes=small_limit)
    spilled = model_source(mlp, spill_dir=str(tmp_path / "spill"), max_inline_bytes=small_limit)
    assert spilled.payload is None and spilled.path is not None
    assert os.path.getsize(spilled.path) == spilled.nbytes
    assert spilled.identity == model_source(mlp).identity  # same model, same cache entry
    again = model_source(mlp, spill_dir=str(tmp_path / "spill"), max_inline_bytes=small_limit)
    assert again.path == spilled.path and len(os.listdir(tmp_path / "spill")) == 1
    inputs = torch.randn(5, 6)
    clear_cache()
    with torch.no_grad():
        torch.testing.assert_close(load_model(spilled)((inputs,)), mlp(inputs))


def test_models_of_the_same_size_spill_to_files_named_by_their_content(tmp_path):
    first, second = make_mlp(), make_mlp()
    with torch.no_grad():
        second[0].weight.add_(1.0)
    spill = str(tmp_path / "spill")
    sources = [model_source(m, spill_dir=spill, max_inline_bytes=1024) for m in (first, second)]
    assert sources[0].nbytes == sources[1].nbytes  # same size, different bytes
    assert sources[0].path != sources[1].path and sources[0].sha256 != sources[1].sha256
    for source in sources:
        assert source.sha256 in os.path.basename(source.path)
    inputs = torch.randn(3, 6)
    clear_cache()
    with torch.no_grad():
        for model, source in zip((first, second), sources, strict=True):
            torch.testing.assert_close(load_model(source)((inputs,)), model(inputs))


def test_a_spilled_model_file_changed_on_disk_is_refused(tmp_path, mlp):
    spill = str(tmp_path / "spill")
    source = model_source(mlp, spill_dir=spill, max_inline_bytes=1024)
    data = bytearray(Path(source.path).read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes
    Path(source.path).write_bytes(data)
    clear_cache()
    with pytest.raises(ModelIntegrityError, match="changed after it was written.*not loaded"):
        load_model(source)
    # Describing the model again rewrites the file, which then loads.
    again = model_source(mlp, spill_dir=spill, max_inline_bytes=1024)
    assert again.path == source.path
    inputs = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(load_model(again)((inputs,)), mlp(inputs))


def test_the_private_model_directory_is_this_users_alone(tmp_path):
    path = private_model_dir(str(tmp_path))
    assert os.path.basename(path).startswith("deepspark-models-")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert private_model_dir(str(tmp_path)) == path
    # Left world-writable (not by deepspark): whatever others put there goes, the mode is fixed.
    planted = os.path.join(path, "deepspark-model-planted.pkl")
    Path(planted).write_bytes(b"not a model")
    os.chmod(path, 0o777)
    assert private_model_dir(str(tmp_path)) == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700 and os.listdir(path) == []
    # A symlink in its place, e.g. to another user's directory, is refused.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    linked_base = tmp_path / "linked"
    linked_base.mkdir()
    os.symlink(elsewhere, os.path.join(linked_base, os.path.basename(path)))
    with pytest.raises(PermissionError, match="not a plain directory"):
        private_model_dir(str(linked_base))
    if os.getuid() == 0:  # root can hand the directory to another user
        os.chown(path, 12345, -1)
        with pytest.raises(PermissionError, match="belongs to another user"):
            private_model_dir(str(tmp_path))


def test_the_cache_loads_each_model_once(mlp):
    clear_cache()
    source = model_source(mlp)
    before = cache_info()
    first = load_model(source)
    second = load_model(model_source(mlp))  # a new source object, the same content
    after = cache_info()
    assert first is second
    assert (after.loads - before.loads, after.hits - before.hits) == (1, 1)


def test_the_cache_evicts_least_recently_used_past_its_budget():
    loads: list[str] = []

    def loader(key: str):
        return lambda: loads.append(key) or key

    cache: SizedLRUCache[str] = SizedLRUCache(budget_bytes=20, size_of=lambda _: 10)
    for key in ["a", "b", "a", "c", "a", "b"]:
        assert cache.get_or_load(key, loader(key)) == key
    # "b" was evicted by "c" (a was used more recently), then reloaded.
    assert loads == ["a", "b", "c", "b"]
    info = cache.info()
    assert (info.entries, info.nbytes, info.evictions) == (2, 20, 2)
    cache.resize(10)  # the least recently used ("a") goes; "b" stays, and is still a hit
    assert cache.get_or_load("b", loader("b")) == "b" and loads == ["a", "b", "c", "b"]
    info = cache.info()
    assert (info.entries, info.nbytes, info.evictions, info.budget_bytes) == (1, 10, 3, 10)
    oversized: SizedLRUCache[str] = SizedLRUCache(budget_bytes=5, size_of=lambda _: 10)
    oversized.get_or_load("big", lambda: "big")
    assert oversized.info().entries == 1  # the newest model stays even over budget
    assert oversized.get_or_load("big", lambda: "reloaded") == "big"  # and is a hit
    oversized.get_or_load("next", lambda: "next")
    assert (oversized.info().entries, oversized.info().evictions) == (1, 1)


@pytest.mark.parametrize("kind", [ModelKind.ONNX, ModelKind.TORCHSCRIPT, ModelKind.TORCH_EXPORT])
def test_wrong_feature_shape_names_the_column_and_the_expected_input(exported, kind):
    predictor = load_model(model_source(exported[kind]))
    with pytest.raises(ModelInputError) as raised:
        predictor((torch.randn(3, 5),), column_names=["features"])
    message = str(raised.value)
    assert "'features' (N=3, 5) float32" in message
    assert "6" in message.split("expects", 1)[1]  # the model's 6 input features


def test_wrong_feature_shape_for_an_eager_module(mlp):
    predictor = load_model(model_source(mlp))
    with pytest.raises(ModelInputError, match=r"\(N=2, 4\).*expects \(N, 6\)"):
        predictor((torch.randn(2, 4),), column_names=["features"])


def test_onnx_input_names_must_match_the_model(exported):
    predictor = load_model(model_source(exported[ModelKind.ONNX]))
    with pytest.raises(ModelInputError, match=r"input_names=\['pixels'\].*'x'"):
        predictor.check_input_names(["pixels"])
    predictor.check_input_names(["x"])
    with pytest.raises(ModelInputError, match="takes 1 input"):
        predictor((torch.randn(2, 6), torch.randn(2, 6)))


def test_input_names_are_refused_for_torch_models(mlp):
    with pytest.raises(ModelInputError, match="ONNX models only"):
        load_model(model_source(mlp)).check_input_names(["x"])


def test_export_that_disagrees_with_torch_raises(tmp_path):
    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)

    with pytest.raises(ExportMismatchError, match="differs from the torch model"):
        export_torchscript(Noisy(), str(tmp_path / "noisy.ts"), torch.zeros(4, 3))


def test_export_onnx_refuses_names_that_do_not_fit_the_inputs(tmp_path, mlp):
    with pytest.raises(ValueError, match="one distinct name per sample input"):
        export_onnx(mlp, str(tmp_path / "m.onnx"), torch.randn(2, 6), input_names=["a", "b"])


def test_worker_modules_do_not_import_pyspark():
    code = (
        "import sys; import deepspark.inference.worker, deepspark.inference.models; "
        "import deepspark.inference.predict; "
        "assert 'pyspark' not in sys.modules, sorted(m for m in sys.modules if 'spark' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
