"""Control of the training loop (issue #11): step limits, step-wise validation and checkpoints
with a resume mid-epoch, gradient accumulation, clipping, bf16, several optimizers and
schedulers, a custom train/eval step, a collate hook, and an estimator built for inference.

Every test runs real Spark jobs on 2 workers with scikit-learn's digits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import DigitsNet, digits_frames

cloudpickle.register_pickle_by_value(helpers)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# every test trains on Spark
pytestmark = pytest.mark.slow

BATCH, LR = 64, 3e-3
# 1,437 training rows over 2 ranks, 32 rows each per step: 23 steps an epoch
STEPS_PER_EPOCH = 23


def _estimator(**options) -> ds.Estimator:
    torch.manual_seed(0)
    settings = {
        "model": DigitsNet(),
        "optimizer": lambda params: torch.optim.Adam(params, lr=LR),
        "loss": torch.nn.CrossEntropyLoss(),
        "metrics": ["accuracy"],
    }
    settings.update(options)
    return ds.Estimator.from_torch(**settings)


def _fit(est, train_df, **options):
    settings = {
        "feature_cols": "features",
        "label_cols": "label",
        "batch_size": BATCH,
        "num_workers": 2,
        "seed": 0,
        "progress": False,
    }
    settings.update(options)
    return est.fit(train_df, **settings)


def _accuracy(est, test_df) -> float:
    scores = est.evaluate(test_df, feature_cols="features", label_cols="label", num_workers=2)
    return scores["accuracy"]


# --- step limits and step-wise validation ------------------------------------------------


def test_max_steps_and_steps_per_epoch_bound_the_fit(spark):
    train_df, _ = digits_frames(spark)
    history = _fit(_estimator(), train_df, epochs=10, steps_per_epoch=5, max_steps=12)
    assert history["steps"].tolist() == [5, 5, 2]
    assert history["train_rows"].tolist() == [5 * BATCH, 5 * BATCH, 2 * BATCH]


def test_validation_every_steps_records_each_validation(spark):
    train_df, test_df = digits_frames(spark)
    est = _estimator()
    history = _fit(est, train_df, epochs=2, validation_data=test_df, validate_every_steps=10)
    # validating within the first epoch loses none of its rows (it once ended a streamed first
    # epoch with the rows still queued: 960 of 1,437)
    assert history["train_rows"].tolist() == [1437, 1437]
    steps = est.step_history
    assert steps["global_step"].tolist() == [10, 20, 30, 40]
    assert steps["epoch"].tolist() == [0, 0, 1, 1]
    assert steps["val_loss"].iloc[-1] < steps["val_loss"].iloc[0]
    # the epoch-end validation is still there, and agrees with a later evaluate
    assert history["val_accuracy"].iloc[-1] == pytest.approx(_accuracy(est, test_df), abs=1e-9)


# --- a step checkpoint resumed after a killed rank -----------------------------------------


class RecordOrder:
    """A collate hook that notes each training batch's labels, per rank and process."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, features, labels):
        import torch.distributed as dist

        if not dist.is_initialized():  # the driver's dry run, not a rank
            return features, labels
        rank = dist.get_rank()
        line = f"{os.getpid()} {hash(tuple(labels[0].tolist()))}\n"
        with open(os.path.join(self.directory, f"rank{rank}.txt"), "a") as handle:
            handle.write(line)
        return features, labels


def _order(directory: Path, rank: int) -> list[tuple[int, int]]:
    lines = (directory / f"rank{rank}.txt").read_text().split()
    return [(int(pid), int(value)) for pid, value in zip(lines[::2], lines[1::2], strict=True)]


def test_step_checkpoint_resume_after_a_killed_rank_trains_every_step_once(spark, tmp_path):
    train_df, _ = digits_frames(spark)
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference_dir.mkdir()
    resumed_dir.mkdir()
    common = {"epochs": 2, "checkpoint_every_steps": 5, "max_failures": 1}

    reference = _estimator(collate_fn=RecordOrder(str(reference_dir)))
    expected = _fit(reference, train_df, checkpoint_dir=str(tmp_path / "ckpt-a"), **common)

    # rank 1 dies after its 9th step of epoch 1 (global step 32); the last step checkpoint
    # is at global step 30, so the second attempt must start at epoch 1, step 7
    killer = helpers.KillRankOnce(str(tmp_path / "killed"), rank=1, epoch=1, step=8)
    resumed = _estimator(collate_fn=RecordOrder(str(resumed_dir)))
    history = _fit(
        resumed,
        train_df,
        checkpoint_dir=str(tmp_path / "ckpt-b"),
        callbacks=[killer],
        **common,
    )
    assert resumed.attempts_ == 2
    assert history["steps"].tolist() == [STEPS_PER_EPOCH, STEPS_PER_EPOCH]
    assert history["attempt"].tolist() == [1, 2]

    killed_pid = int((tmp_path / "killed").read_text())
    reference_order = [value for _, value in _order(reference_dir, 1)]
    second_attempt = [value for pid, value in _order(resumed_dir, 1) if pid != killed_pid]
    assert second_attempt == reference_order[30:], "the resumed order differs"

    # every step exactly once: the same weights and the same epoch loss as without the kill
    for name, value in reference.get_model().state_dict().items():
        torch.testing.assert_close(resumed.get_model().state_dict()[name], value)
    assert history["train_loss"].tolist() == pytest.approx(expected["train_loss"].tolist())


# --- what each step does --------------------------------------------------------------------


class CountingSGD(torch.optim.SGD):
    """SGD that notes, at each step, the total gradient norm it is about to apply."""

    def __init__(self, params, lr: float, log: str) -> None:
        super().__init__(params, lr=lr)
        self.log = log

    def step(self, closure=None):
        import torch.distributed as dist

        grads = [
            p.grad.reshape(-1) for g in self.param_groups for p in g["params"] if p.grad is not None
        ]
        norm = float(torch.cat(grads).norm()) if grads else 0.0
        if dist.get_rank() == 0:
            with open(self.log, "a") as handle:
                handle.write(f"{norm}\n")
        return super().step(closure)


def _norms(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().split()]


def test_gradient_accumulation_steps_the_optimizer_once_per_group(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    log = str(tmp_path / "steps.txt")
    est = _estimator(optimizer=lambda params: CountingSGD(params, lr=0.5, log=log))
    history = _fit(est, train_df, epochs=3, batch_size=16, accumulate_steps=4)
    steps = history["steps"].tolist()
    # 1,437 rows in batches of 16: 90 steps an epoch; groups of 4 and the rest flushed
    assert steps == [90, 90, 90]
    assert len(_norms(tmp_path / "steps.txt")) == 3 * 23
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert _accuracy(est, test_df) >= 0.9


def test_gradient_clipping_bounds_every_step(spark, tmp_path):
    train_df, _ = digits_frames(spark)
    free, clipped = tmp_path / "free.txt", tmp_path / "clipped.txt"
    for path, clip in ((free, None), (clipped, 0.05)):
        est = _estimator(optimizer=lambda params, p=str(path): CountingSGD(params, 0.1, p))
        _fit(est, train_df, epochs=1, clip_grad_norm=clip)
    assert max(_norms(free)) > 0.2  # without clipping the gradients are larger
    assert max(_norms(clipped)) <= 0.05 + 1e-6
    assert len(_norms(clipped)) == STEPS_PER_EPOCH


class AutocastProbe(DigitsNet):
    """Notes the autocast dtype its forward runs under while training."""

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.seen_dtype = out.dtype
        return out


class WriteDtype(ds.training.callbacks.Callback):
    rank_zero_only = True

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, state) -> None:
        Path(self.path).write_text(str(state.model.seen_dtype))


def test_bf16_autocast_trains_on_cpu(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    torch.manual_seed(0)
    est = _estimator(model=AutocastProbe())
    _fit(est, train_df, epochs=6, precision="bf16", callbacks=[WriteDtype(str(tmp_path / "d"))])
    assert (tmp_path / "d").read_text() == "torch.bfloat16"
    assert _accuracy(est, test_df) >= 0.9
    with pytest.raises(ValueError, match=r'precision="fp16" needs use_gpu=True'):
        _fit(_estimator(), train_df, precision="fp16")
    with pytest.raises(ValueError, match=r"precision='fp8'"):
        _fit(_estimator(), train_df, precision="fp8")


class TwoPart(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


def test_several_optimizers_and_step_and_plateau_schedulers(spark):
    train_df, test_df = digits_frames(spark)
    torch.manual_seed(0)
    est = ds.Estimator.from_torch(
        model=TwoPart(),
        optimizer=lambda model: [
            torch.optim.Adam(model.body.parameters(), lr=LR),
            torch.optim.SGD(model.head.parameters(), lr=0.1),
        ],
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
        # the first optimizer's rate decays per step; the second's drops on a plateau that
        # never ends (an improvement must beat the best accuracy by 10)
        scheduler=lambda optimizers: [
            torch.optim.lr_scheduler.StepLR(optimizers[0], step_size=1, gamma=0.98),
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizers[1],
                mode="max",
                factor=0.5,
                patience=0,
                threshold=10,
                threshold_mode="abs",
            ),
        ],
        scheduler_interval="step",
        scheduler_monitor="val_accuracy",
    )
    history = _fit(est, train_df, epochs=4, steps_per_epoch=20, validation_data=test_df)
    assert history["lr"].tolist() == pytest.approx([LR * 0.98 ** (20 * e) for e in (1, 2, 3, 4)])
    assert history["lr_1"].tolist() == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert history["val_accuracy"].iloc[-1] >= 0.85


# --- a custom step, a collate hook, an inference estimator ----------------------------------


def multitask_step(model, batch, optimizers, loss_fn):
    """Two optimizers stepped by hand, and an extra value reported beside the loss."""
    features, labels = batch
    for optimizer in optimizers:
        optimizer.zero_grad()
    logits = model(features)
    loss = loss_fn(logits, labels)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    accuracy = (logits.argmax(1) == labels).float().mean()
    return {"loss": loss, "hits": accuracy}


def outputs_step(model, batch, loss_fn):
    features, labels = batch
    logits = model(features)
    return {"loss": loss_fn(logits, labels), "outputs": logits}


class ParamChecksum(ds.training.callbacks.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, state) -> None:
        total = sum(float(p.double().sum()) for p in state.model.parameters())
        Path(self.directory, f"rank{state.rank}").write_text(repr(total))


def test_custom_train_step_keeps_replicas_in_step(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    torch.manual_seed(0)
    est = ds.Estimator.from_torch(
        model=TwoPart(),
        optimizer=lambda model: [
            torch.optim.Adam(model.body.parameters(), lr=LR),
            torch.optim.Adam(model.head.parameters(), lr=LR),
        ],
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
        train_step=multitask_step,
        eval_step=outputs_step,
    )
    history = _fit(
        est, train_df, epochs=8, validation_data=test_df, callbacks=[ParamChecksum(str(tmp_path))]
    )
    assert history["train_hits"].iloc[-1] >= 0.9
    assert history["val_accuracy"].iloc[-1] >= 0.9
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text()
    with pytest.raises(ValueError, match=r'step_policy="pad" cannot run a custom train_step'):
        _fit(est, train_df, step_policy="pad")


def one_hot_labels(features, labels):
    """Labels to float one-hot rows, for a loss that wants them (runs inside the rank)."""
    return features, (torch.nn.functional.one_hot(labels[0], 10).float(),)


def test_collate_hook_reshapes_labels_for_the_loss(spark):
    train_df, test_df = digits_frames(spark)
    est = _estimator(loss=torch.nn.BCEWithLogitsLoss(), metrics=[], collate_fn=one_hot_labels)
    _fit(est, train_df, epochs=8)
    model = est.get_model().eval()
    test = test_df.toPandas()
    with torch.no_grad():
        logits = model(torch.tensor(np.stack(test["features"]), dtype=torch.float32))
    assert accuracy_score(test["label"], logits.argmax(1).numpy()) >= 0.9


def test_inference_estimator_predicts_and_evaluates_but_does_not_fit(spark):
    train_df, test_df = digits_frames(spark)
    trained = _estimator()
    _fit(trained, train_df, epochs=6)
    inference = ds.Estimator.from_torch(trained.get_model(), metrics=["accuracy"])
    scores = inference.evaluate(test_df, feature_cols="features", label_cols="label")
    assert "loss" not in scores
    predicted = inference.predict(test_df, feature_cols="features", output="class").toPandas()
    expected = accuracy_score(predicted["label"], predicted["prediction"])
    assert scores["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert scores["accuracy"] >= 0.9
    with pytest.raises(ValueError, match="built for inference"):
        _fit(inference, train_df)
