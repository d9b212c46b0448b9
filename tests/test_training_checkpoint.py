"""Checkpoints on real file systems (local and memory://): round trips and crashed saves."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torch import nn

from deepspark.persist.weights import (
    load_model_weights,
    save_model_weights,
    weights_from_bytes,
    weights_to_bytes,
)
from deepspark.training.rank.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


@pytest.fixture(params=["local", "memory"])
def checkpoint_dir(request, tmp_path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "checkpoints")
        return
    url = f"memory://checkpoints-{uuid.uuid4().hex}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


class TiedNet(nn.Module):
    """An embedding tied to the output layer, plus a buffer, as language models have."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("scale", torch.arange(4.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(tokens))) * self.scale)


def make_training(seed: int):
    torch.manual_seed(seed)
    model = TiedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler=None) -> None:
    tokens = torch.tensor([0, 1, 2, 3, 4, 5])
    loss = nn.functional.cross_entropy(model(tokens), tokens.flip(0))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def draws() -> tuple[float, float, float]:
    return float(torch.rand(1)), float(np.random.rand()), random.random()


def test_round_trip_restores_weights_momentum_scheduler_and_rng(checkpoint_dir):
    model, optimizer, scheduler = make_training(seed=1)
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    info = save_checkpoint(
        checkpoint_dir, 3, nn.DataParallel(model), optimizer, scheduler, extra={"history": [1.5]}
    )
    expected_draws = draws()

    restored, restored_optimizer, restored_scheduler = make_training(seed=2)
    assert not torch.equal(restored.hidden.weight, model.hidden.weight)
    result = load_checkpoint(checkpoint_dir, restored, restored_optimizer, restored_scheduler)

    assert result["epoch"] == 3 and result["extra"] == {"history": [1.5]}
    assert result["path"] == info.path == checkpoint_dir + "/epoch-000003"
    assert draws() == expected_draws
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert restored.out.weight is restored.embed.weight  # still tied after loading
    assert restored_scheduler.last_epoch == scheduler.last_epoch == 2
    assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    # Momentum buffers came back: one more step lands on exactly the same weights.
    train_step(model, optimizer)
    train_step(restored, restored_optimizer)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_latest_follows_saves_and_keep_prunes_old_ones(checkpoint_dir):
    model = nn.Linear(3, 1)
    assert latest_checkpoint(checkpoint_dir) is None
    for epoch in range(4):
        save_checkpoint(checkpoint_dir, epoch, model, keep=2)
    assert [info.epoch for info in list_checkpoints(checkpoint_dir)] == [2, 3]
    assert latest_checkpoint(checkpoint_dir).epoch == 3
    # A new run that starts over replaces the later epochs of the old one.
    save_checkpoint(checkpoint_dir, 0, model, keep=2)
    assert latest_checkpoint(checkpoint_dir).epoch == 0
    assert [info.epoch for info in list_checkpoints(checkpoint_dir)] == [0]


class ExplodingScheduler:
    """Fails while the checkpoint is being written, after the weights and optimizer state."""

    def state_dict(self):
        raise RuntimeError("disk on fire")


def test_failed_save_leaves_the_previous_checkpoint_latest(checkpoint_dir):
    model = nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(checkpoint_dir, 0, model, optimizer)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(checkpoint_dir, 1, model, optimizer, ExplodingScheduler())
    assert latest_checkpoint(checkpoint_dir).epoch == 0
    assert [info.epoch for info in list_checkpoints(checkpoint_dir)] == [0]
    assert load_checkpoint(checkpoint_dir, nn.Linear(3, 1))["epoch"] == 0


def test_save_killed_midway_leaves_the_previous_checkpoint_latest(tmp_path):
    directory = tmp_path / "checkpoints"
    script = textwrap.dedent(
        f"""
        import os, torch
        from deepspark.training.rank.checkpoint import save_checkpoint

        class DieMidSave:
            def state_dict(self):
                os._exit(3)  # the process dies: no cleanup, no exception handler

        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        save_checkpoint({str(directory)!r}, 0, model, optimizer)
        save_checkpoint({str(directory)!r}, 1, model, optimizer, DieMidSave())
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 3, completed.stderr
    leftovers = [name for name in os.listdir(directory) if name.startswith(".tmp-")]
    assert leftovers, "the killed save should have left its partial files behind"
    partial_files = os.listdir(directory / leftovers[0])
    assert "model.safetensors" in partial_files and "checkpoint.json" not in partial_files

    assert latest_checkpoint(str(directory)).epoch == 0
    save_checkpoint(str(directory), 1, nn.Linear(3, 1))  # the retry succeeds and cleans up
    assert latest_checkpoint(str(directory)).epoch == 1
    assert not [name for name in os.listdir(directory) if name.startswith(".tmp-")]


def test_damaged_latest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path):
    directory = tmp_path / "checkpoints"
    model = nn.Linear(3, 1)
    save_checkpoint(str(directory), 0, model)
    save_checkpoint(str(directory), 1, model)
    weights = directory / "epoch-000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # truncated, as by a full disk
    assert latest_checkpoint(str(directory)).epoch == 0
    (directory / "LATEST").write_text("garbage")
    assert latest_checkpoint(str(directory)).epoch == 0
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_checkpoint(str(directory / "epoch-000001"), model)


def test_load_checkpoint_errors_name_what_is_missing(checkpoint_dir):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(checkpoint_dir, nn.Linear(3, 1))
    save_checkpoint(checkpoint_dir, 0, nn.Linear(3, 1))
    with pytest.raises(ValueError, match="holds no optimizer state"):
        model = nn.Linear(3, 1)
        load_checkpoint(checkpoint_dir, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="JSON-able"):
        save_checkpoint(checkpoint_dir, 1, nn.Linear(3, 1), extra={"model": nn.Linear(1, 1)})


def test_model_weights_keep_ties_and_store_views_and_non_contiguous_tensors(checkpoint_dir):
    fused = torch.arange(12.0)
    state = {
        "embed": torch.ones(3, 2),
        "transposed": torch.arange(6.0).reshape(2, 3).T,  # non-contiguous
        "first_half": fused[:6],  # two views of one buffer
        "second_half": fused[6:],
        "empty_a": torch.zeros(0),
        "empty_b": torch.zeros(0),
    }
    state["head"] = state["embed"]  # tied
    path = checkpoint_dir + "/weights.safetensors"
    save_model_weights(path, state)
    loaded = load_model_weights(path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["head"] is loaded["embed"]
    with pytest.raises(TypeError, match="not a tensor"):
        save_model_weights(path, {"step": 3})


def test_weights_file_is_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    path = Path(tmp_path) / "model.safetensors"
    state = nn.Linear(2, 2).state_dict()
    save_model_weights(str(path), state)
    loaded = load_file(str(path))
    assert sorted(loaded) == ["bias", "weight"]
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_weights_bytes_round_trip_keeps_ties_and_matches_the_file(tmp_path):
    model = TiedNet()
    state = model.state_dict()
    state["transposed"] = torch.arange(6.0).reshape(2, 3).T  # non-contiguous
    data = weights_to_bytes(state)
    loaded = weights_from_bytes(data)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["out.weight"] is loaded["embed.weight"]
    del loaded["transposed"]
    restored = TiedNet()
    restored.load_state_dict(loaded, strict=True)
    assert restored.out.weight is restored.embed.weight
    assert torch.equal(restored.embed.weight, model.embed.weight)
    # One format: save_model_weights writes the very same bytes.
    path = Path(tmp_path) / "model.safetensors"
    save_model_weights(str(path), state)
    assert path.read_bytes() == data


def test_weights_from_bytes_reads_plain_safetensors():
    from safetensors.torch import save

    loaded = weights_from_bytes(save({"weight": torch.ones(2, 2)}))
    assert list(loaded) == ["weight"] and torch.equal(loaded["weight"], torch.ones(2, 2))
