"""Metrics equal scikit-learn's, in one process and reduced across two real gloo ranks."""

from __future__ import annotations

import math
import multiprocessing
import queue
import time
import traceback

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from deepspark.training.rank.metrics import (
    AUC,
    Accuracy,
    CallableMetric,
    Mean,
    Metric,
    get_metric,
    metric_names,
    reduce_metrics,
)
from deepspark.training.rank.rendezvous import RendezvousSpec, free_port, process_group

ROWS = 100
CLASSES = 4


def make_data() -> dict[str, torch.Tensor]:
    """The same predictions in every process: fixed seed, scores rounded so AUC has ties."""
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    logits = torch.randn(ROWS, CLASSES, generator=generator)
    logits[torch.arange(ROWS), labels] += 0.8  # better than chance, not perfect
    binary_labels = torch.randint(0, 2, (ROWS,), generator=generator).float()
    binary_logits = (torch.randn(ROWS, generator=generator) + binary_labels).mul(4).round() / 4
    regression_targets = torch.randn(ROWS, generator=generator)
    regression_outputs = regression_targets.unsqueeze(1) + 0.3 * torch.randn(
        ROWS, 1, generator=generator
    )
    return {
        "labels": labels,
        "logits": logits,
        "binary_labels": binary_labels,
        "binary_logits": binary_logits,
        "regression_targets": regression_targets,
        "regression_outputs": regression_outputs,
    }


def abs_error_per_row(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.reshape(-1) - targets.reshape(-1)).abs()


def build_metrics() -> dict[str, list[Metric]]:
    return {
        "classes": [get_metric("accuracy"), get_metric("top2_accuracy")],
        "binary": [
            Accuracy(name="binary_accuracy"),
            get_metric("auc"),
            Accuracy(threshold=0.5, name="probability_accuracy"),
        ],
        "regression": [
            get_metric("mse"),
            get_metric("mae"),
            get_metric("rmse"),
            get_metric(abs_error_per_row),
            Mean("loss"),
        ],
    }


def feed(metrics: dict[str, list[Metric]], data: dict[str, torch.Tensor], rows: slice) -> None:
    """Update every metric with ``rows`` of the data, in batches of 16."""
    indices = torch.arange(ROWS)[rows]
    for batch in indices.split(16):
        for metric in metrics["classes"]:
            metric.update(data["logits"][batch], data["labels"][batch])
        for metric in metrics["binary"]:
            outputs = data["binary_logits"][batch]
            if metric.name == "probability_accuracy":
                outputs = torch.sigmoid(outputs).unsqueeze(1)
            metric.update(outputs, data["binary_labels"][batch])
        outputs, targets = data["regression_outputs"][batch], data["regression_targets"][batch]
        for metric in metrics["regression"]:
            if isinstance(metric, Mean):
                metric.update(torch.nn.functional.mse_loss(outputs.squeeze(1), targets), len(batch))
            else:
                metric.update(outputs, targets)


def expected_values() -> dict[str, float]:
    data = {name: tensor.double().numpy() for name, tensor in make_data().items()}
    mse = skm.mean_squared_error(data["regression_targets"], data["regression_outputs"][:, 0])
    binary_predictions = (data["binary_logits"] > 0).astype(float)
    return {
        "accuracy": skm.accuracy_score(data["labels"], data["logits"].argmax(1)),
        "top2_accuracy": skm.top_k_accuracy_score(
            data["labels"], data["logits"], k=2, labels=np.arange(CLASSES)
        ),
        "binary_accuracy": skm.accuracy_score(data["binary_labels"], binary_predictions),
        "probability_accuracy": skm.accuracy_score(data["binary_labels"], binary_predictions),
        "auc": skm.roc_auc_score(data["binary_labels"], data["binary_logits"]),
        "mse": mse,
        "mae": skm.mean_absolute_error(
            data["regression_targets"], data["regression_outputs"][:, 0]
        ),
        "rmse": math.sqrt(mse),
        "abs_error_per_row": skm.mean_absolute_error(
            data["regression_targets"], data["regression_outputs"][:, 0]
        ),
        "loss": mse,
    }


def all_values(metrics: dict[str, list[Metric]], world_size: int) -> dict[str, float]:
    flat = [metric for group in metrics.values() for metric in group]
    return reduce_metrics(flat, world_size=world_size)


def assert_values_match(values: dict[str, float], expected: dict[str, float]) -> None:
    assert set(expected) <= set(values)
    for name, value in expected.items():
        # The loss goes in as float32 batch means; everything else is summed in float64.
        tolerance = 1e-6 if name == "loss" else 1e-9
        assert values[name] == pytest.approx(value, rel=tolerance, abs=1e-12), name


def test_metrics_equal_scikit_learn_in_one_process():
    metrics = build_metrics()
    feed(metrics, make_data(), slice(None))
    values = all_values(metrics, world_size=1)
    assert_values_match(values, expected_values())
    # The data is not trivial: a metric that ignored its input would not pass by luck.
    assert 0.3 < values["accuracy"] < 0.95
    assert 0.6 < values["auc"] < 0.99


# --- two real ranks ---------------------------------------------------------------------------

SPLITS = {
    "uneven": (slice(0, 37), slice(37, ROWS)),
    "empty_rank": (slice(0, ROWS), slice(0, 0)),
    "no_rows_anywhere": (slice(0, 0), slice(0, 0)),
}


def _rank_main(rank: int, world_size: int, port: int, results) -> None:
    try:
        spec = RendezvousSpec("127.0.0.1", port, world_size, timeout_s=60)
        torch.set_num_threads(1)
        with process_group(spec, rank):
            data = make_data()
            payload: dict[str, dict[str, float]] = {}
            for split_name, split in SPLITS.items():
                metrics = build_metrics()
                feed(metrics, data, split[rank])
                payload[split_name] = all_values(metrics, world_size)
            payload["torchmetrics"] = _torchmetrics_values(data, rank)
        results.put((rank, "ok", payload))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _torchmetrics_values(data: dict[str, torch.Tensor], rank: int) -> dict[str, float]:
    try:
        from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy
    except ImportError:
        return {}
    metrics = [
        get_metric(MulticlassAccuracy(num_classes=CLASSES, average="micro")),
        get_metric(BinaryAUROC()),
    ]
    rows = SPLITS["uneven"][rank]
    metrics[0].update(data["logits"][rows], data["labels"][rows])
    metrics[1].update(data["binary_logits"][rows], data["binary_labels"][rows].long())
    return reduce_metrics(metrics, world_size=2)


def run_ranks(target, world_size: int, timeout_s: float = 120.0) -> dict[int, object]:
    """Run ``target(rank, world_size, port, results)`` in spawned processes; bounded."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=target, args=(rank, world_size, port, results), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    payloads: dict[int, object] = {}
    try:
        while len(payloads) < world_size:
            try:
                rank, status, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"ranks {sorted(set(range(world_size)) - set(payloads))} silent")
            if status != "ok":
                pytest.fail(f"rank {rank} failed:\n{payload}")
            payloads[rank] = payload
    finally:
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    return payloads


def test_metrics_reduced_across_two_ranks_equal_scikit_learn():
    payloads = run_ranks(_rank_main, world_size=2)
    expected = expected_values()
    for rank in (0, 1):
        assert_values_match(payloads[rank]["uneven"], expected)
        assert_values_match(payloads[rank]["empty_rank"], expected)
        nothing = payloads[rank]["no_rows_anywhere"]
        assert set(nothing) == set(expected) and all(map(math.isnan, nothing.values()))
    torchmetrics_values = payloads[0]["torchmetrics"]
    if torchmetrics_values:
        assert torchmetrics_values == payloads[1]["torchmetrics"]
        assert torchmetrics_values["multiclass_accuracy"] == pytest.approx(expected["accuracy"])
        assert torchmetrics_values["binary_auroc"] == pytest.approx(expected["auc"], abs=1e-6)


# --- single-process behaviour -----------------------------------------------------------------


def test_accuracy_accepts_one_hot_and_column_targets_and_class_dim_one():
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0]])
    one_hot = torch.eye(3)[[0, 2, 2]]
    for targets in (torch.tensor([0, 2, 2]), torch.tensor([[0], [2], [2]]), one_hot):
        metric = get_metric("accuracy")
        metric.update(logits, targets)
        assert metric.compute() == pytest.approx(2 / 3)
    sequence = get_metric("accuracy")  # (N, C, T) outputs against (N, T) targets
    sequence.update(logits.T.unsqueeze(0), torch.tensor([[0, 2, 1]]))
    assert sequence.compute() == pytest.approx(1 / 3)


def test_shape_mismatches_raise_clear_errors():
    with pytest.raises(ValueError, match="targets of shape"):
        get_metric("accuracy").update(torch.zeros(4, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="different sizes"):
        get_metric("mse").update(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="0/1 targets"):
        AUC().update(torch.zeros(3), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="binary ROC AUC"):
        AUC().update(torch.zeros(3, 3), torch.tensor([0, 1, 1]))


def test_auc_of_one_class_is_nan_and_two_column_logits_use_the_margin():
    single = AUC()
    single.update(torch.tensor([0.2, 0.9]), torch.tensor([1, 1]))
    assert math.isnan(single.compute())
    margins = AUC()
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    labels = torch.tensor([1, 0, 0, 1])
    margins.update(logits, labels)
    expected = skm.roc_auc_score(labels.numpy(), torch.softmax(logits, 1)[:, 1].numpy())
    assert margins.compute() == pytest.approx(expected)


def test_state_round_trip_and_reset():
    original = get_metric("mse")
    original.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    copy = get_metric("mse")
    copy.load_state(original.state())
    assert copy.compute() == original.compute() == pytest.approx(2.5)
    original.reset()
    assert math.isnan(original.compute())
    with pytest.raises(ValueError, match="statistics"):
        copy.load_state(torch.zeros(3))
    auc = AUC()
    auc.update(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0, 1, 1]))
    restored = AUC()
    restored.load_state(auc.state())
    assert restored.compute() == auc.compute() == 1.0


def test_callable_metric_weights_batch_means_by_rows():
    metric = CallableMetric(torch.nn.functional.l1_loss)
    metric.update(torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3))  # batch mean 1 over 3 rows
    metric.update(torch.tensor([4.0]), torch.zeros(1))  # batch mean 4 over 1 row
    assert metric.name == "l1_loss"
    assert metric.compute() == pytest.approx(7 / 4)
    with pytest.raises(ValueError, match="scalar batch mean or one value per row"):
        CallableMetric(lambda outputs, targets: torch.zeros(2), name="bad").update(
            torch.zeros(3), torch.zeros(3)
        )


def test_get_metric_and_reduce_metrics_guard_their_inputs():
    assert {"accuracy", "auc", "mae", "mse", "rmse", "top5_accuracy"} <= set(metric_names())
    assert get_metric("Top5_Accuracy").k == 5
    existing = Mean("loss")
    assert get_metric(existing) is existing
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        get_metric("f1")
    with pytest.raises(TypeError, match="got int"):
        get_metric(3)
    with pytest.raises(ValueError, match="distinct"):
        reduce_metrics([get_metric("mse"), get_metric("mse")])
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        reduce_metrics([get_metric("mse")], world_size=2)


def test_torchmetrics_objects_are_wrapped():
    torchmetrics = pytest.importorskip("torchmetrics")
    metric = get_metric(torchmetrics.MeanSquaredError())
    assert metric.name == "mean_squared_error"
    metric.update(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))
    assert reduce_metrics([metric]) == {"mean_squared_error": pytest.approx(5.0)}
    metric.reset()
    metric.update(torch.tensor([1.0]), torch.tensor([0.0]))
    assert metric.compute() == pytest.approx(1.0)
