"""Metrics equal scikit-learn's on real models and data: in one process, reduced across two real
gloo ranks, and end to end through Estimator.fit / evaluate on Spark."""

from __future__ import annotations

import math
import multiprocessing
import queue
import time
import traceback

import numpy as np
import pytest
import torch
from sklearn import datasets
from sklearn import metrics as skm

import deepspark as ds
from deepspark.training.rank.metrics import CallableMetric, get_metric, reduce_metrics
from deepspark.training.rank.rendezvous import RendezvousSpec, free_port, process_group

BATCH = 64
CLASSIFICATION = ("accuracy", "precision", "recall", "f1", "auc")


def _standardised(features: np.ndarray) -> np.ndarray:
    return ((features - features.mean(0)) / features.std(0)).astype(np.float32)


def breast_cancer() -> tuple[torch.Tensor, torch.Tensor]:
    data = datasets.load_breast_cancer()
    return torch.from_numpy(_standardised(data.data)), torch.from_numpy(data.target)


def _train(model: torch.nn.Module, loss_fn, features, targets, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(features), targets).backward()
        optimizer.step()


def binary_case(head: str) -> dict[str, torch.Tensor]:
    """A breast-cancer classifier: ``head="sigmoid"`` (BCELoss) or ``"logits"``
    (BCEWithLogitsLoss). Outputs are (N, 1); the targets both as (N,) ints and (N, 1) floats."""
    features, labels = breast_cancer()
    torch.manual_seed(0)
    layers = [torch.nn.Linear(features.shape[1], 1)]
    if head == "sigmoid":
        layers.append(torch.nn.Sigmoid())
    model = torch.nn.Sequential(*layers)
    loss = torch.nn.BCELoss() if head == "sigmoid" else torch.nn.BCEWithLogitsLoss()
    float_labels = labels.float().unsqueeze(1)
    _train(model, loss, features, float_labels, steps=40, lr=0.01)
    with torch.no_grad():
        outputs = model(features)
    return {"outputs": outputs, "int_labels": labels, "float_labels": float_labels}


def digits_case() -> dict[str, torch.Tensor]:
    data = datasets.load_digits()
    features, labels = (
        torch.from_numpy(_standardised(data.data + 1e-3)),
        torch.from_numpy(data.target),
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    _train(model, torch.nn.CrossEntropyLoss(), features, labels, steps=15, lr=0.01)
    with torch.no_grad():
        return {"outputs": model(features), "labels": labels}


def diabetes_case() -> dict[str, torch.Tensor]:
    features, targets = datasets.load_diabetes(return_X_y=True)
    features = torch.from_numpy(_standardised(features))
    targets = torch.from_numpy(targets.astype(np.float32))
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1)
    _train(model, torch.nn.MSELoss(), features, targets.unsqueeze(1), steps=300, lr=2.0)
    with torch.no_grad():
        return {"outputs": model(features), "labels": targets}


def sklearn_binary(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    scores = scores.astype(np.float64)
    predicted = (scores > threshold).astype(int)
    return {
        "accuracy": skm.accuracy_score(labels, predicted),
        "precision": skm.precision_score(labels, predicted),
        "recall": skm.recall_score(labels, predicted),
        "f1": skm.f1_score(labels, predicted),
        "auc": skm.roc_auc_score(labels, scores),
    }


def sklearn_multiclass(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    logits = logits.astype(np.float64)
    predicted = logits.argmax(1)
    probabilities = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    return {
        "accuracy": skm.accuracy_score(labels, predicted),
        "top3_accuracy": skm.top_k_accuracy_score(labels, logits, k=3),
        "precision": skm.precision_score(labels, predicted, average="macro"),
        "recall": skm.recall_score(labels, predicted, average="macro"),
        "f1": skm.f1_score(labels, predicted, average="macro"),
        "auc": skm.roc_auc_score(labels, probabilities, multi_class="ovr"),
    }


def sklearn_regression(outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    outputs, targets = outputs.astype(np.float64), targets.astype(np.float64)
    mse = skm.mean_squared_error(targets, outputs[:, 0])
    return {
        "mse": mse,
        "mae": skm.mean_absolute_error(targets, outputs[:, 0]),
        "rmse": math.sqrt(mse),
        "r2": skm.r2_score(targets, outputs[:, 0]),
    }


def computed(names, outputs: torch.Tensor, labels: torch.Tensor, rows=slice(None)) -> dict:
    """The metrics fed ``rows`` in batches, reduced over the current process group (if any)."""
    metrics = [get_metric(name) for name in names]
    for batch in torch.arange(len(outputs))[rows].split(BATCH):
        for metric in metrics:
            metric.update(outputs[batch], labels[batch])
    return reduce_metrics(metrics)


def assert_close(values: dict[str, float], expected: dict[str, float]) -> None:
    assert set(values) == set(expected)
    for name, value in expected.items():
        # AUC's curve is computed by torchmetrics in float32; everything else is float64
        tolerance = 1e-6 if name == "auc" else 1e-9
        assert values[name] == pytest.approx(value, rel=tolerance, abs=tolerance), name


# --- one process ------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", ["int_labels", "float_labels"])
def test_sigmoid_outputs_trained_with_bce_loss_match_sklearn(labels):
    case = binary_case("sigmoid")
    outputs, targets = case["outputs"], case[labels]
    values = computed(CLASSIFICATION, outputs, targets)
    expected = sklearn_binary(outputs.numpy()[:, 0], case["int_labels"].numpy(), threshold=0.5)
    assert_close(values, expected)
    # thresholding probabilities at 0 would call every row positive: accuracy 0.63
    assert values["accuracy"] > 0.9
    assert skm.accuracy_score(case["int_labels"], outputs[:, 0] > 0) < 0.7


def test_logits_trained_with_bce_with_logits_loss_match_sklearn():
    case = binary_case("logits")
    outputs = case["outputs"]
    assert (outputs.abs() > 1).any()  # real logits, so the sigmoid rule applies
    values = computed(CLASSIFICATION, outputs, case["float_labels"])
    assert_close(values, sklearn_binary(outputs.numpy()[:, 0], case["int_labels"].numpy(), 0.0))
    assert values["accuracy"] > 0.9


def test_multiclass_logits_match_sklearn():
    case = digits_case()
    names = ("accuracy", "top3_accuracy", "precision", "recall", "f1", "auc")
    values = computed(names, case["outputs"], case["labels"])
    assert_close(values, sklearn_multiclass(case["outputs"].numpy(), case["labels"].numpy()))
    assert 0.5 < values["accuracy"] < 0.99  # learnt something, but not everything
    column_targets = computed(["accuracy"], case["outputs"], case["labels"].unsqueeze(1))
    assert column_targets["accuracy"] == values["accuracy"]


def test_a_raw_multiclass_head_whose_first_batch_lies_in_0_1_is_read_as_logits():
    case = digits_case()
    logits, labels = case["outputs"], case["labels"]
    # the first batch squeezed into [0, 1] (its rows do not sum to 1), the rest as they are
    first = (logits[:BATCH] - logits[:BATCH].min()) / (logits[:BATCH].max() - logits[:BATCH].min())
    raw = torch.cat([first, logits[BATCH:]])
    assert ((raw[:BATCH] >= 0) & (raw[:BATCH] <= 1)).all() and (raw[BATCH:] > 1).any()
    values = computed(("accuracy", "auc"), raw, labels)
    expected = sklearn_multiclass(raw.numpy(), labels.numpy())
    assert_close(values, {name: expected[name] for name in ("accuracy", "auc")})
    softmax = get_metric("auc")  # real probabilities stay probabilities: no second softmax
    softmax.update(logits[:BATCH].softmax(1), labels[:BATCH])
    assert softmax.task is not None and not softmax.task.logits


def test_regression_matches_sklearn():
    case = diabetes_case()
    values = computed(("mse", "mae", "rmse", "r2"), case["outputs"], case["labels"])
    assert_close(values, sklearn_regression(case["outputs"].numpy(), case["labels"].numpy()))
    assert 0.3 < values["r2"] < 0.9


def test_multilabel_outputs_use_exact_match_accuracy_and_macro_auc():
    case = digits_case()
    labels, probabilities = case["labels"], case["outputs"].softmax(1)
    # two labels per image, "even" and "at least 5", with their probabilities under the model
    targets = torch.stack([labels % 2 == 0, labels >= 5], dim=1).float()
    scores = torch.stack([probabilities[:, ::2].sum(1), probabilities[:, 5:].sum(1)], dim=1)
    values = computed(("accuracy", "auc", "f1"), scores.clamp(0, 1), targets)
    predicted = (scores > 0.5).numpy()
    assert_close(
        values,
        {
            "accuracy": skm.accuracy_score(targets.numpy(), predicted),
            "auc": skm.roc_auc_score(targets.numpy(), scores.numpy(), average="macro"),
            "f1": skm.f1_score(targets.numpy(), predicted, average="macro"),
        },
    )


def test_targets_that_do_not_fit_the_task_raise():
    with pytest.raises(ValueError, match="whole numbers"):
        get_metric("accuracy").update(torch.rand(3, 1), torch.tensor([[0.0], [0.7], [1.0]]))
    with pytest.raises(RuntimeError, match="expected only"):
        get_metric("accuracy").update(torch.rand(3), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="do not match targets"):
        get_metric("accuracy").update(torch.zeros(4, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="different sizes"):
        get_metric("mse").update(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="top5_accuracy needs multiclass"):
        get_metric("top5_accuracy").update(torch.rand(3), torch.tensor([0, 1, 1]))
    changing = get_metric("accuracy")
    changing.update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="earlier batches"):
        changing.update(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_a_function_is_averaged_exactly_over_rows():
    metric = get_metric(torch.nn.functional.l1_loss)
    metric.update(torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3))  # batch mean 1 over 3 rows
    metric.update(torch.tensor([4.0]), torch.zeros(1))  # batch mean 4 over 1 row
    metric.update(torch.zeros(0), torch.zeros(0))  # an empty batch adds nothing
    assert metric.name == "l1_loss"
    assert reduce_metrics([metric]) == {"l1_loss": pytest.approx(7 / 4)}
    per_row = get_metric(lambda outputs, targets: (outputs - targets).abs())
    per_row.update(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert per_row.compute() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scalar batch mean or one value per row"):
        get_metric(lambda outputs, targets: torch.zeros(2)).update(torch.zeros(3), torch.zeros(3))
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own warning
        assert math.isnan(get_metric(CallableMetric(torch.nn.functional.l1_loss)).compute())


def test_a_torchmetrics_object_is_used_as_it_is():
    from torchmetrics.classification import BinaryF1Score

    metric = get_metric(BinaryF1Score())
    assert metric.name == "binary_f1_score"
    metric.update(torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1, 0, 0]))
    assert reduce_metrics([metric]) == {"binary_f1_score": pytest.approx(2 / 3)}
    metric.reset()
    metric.update(torch.tensor([0.9]), torch.tensor([1]))
    assert metric.compute() == pytest.approx(1.0)


def test_get_metric_and_reduce_metrics_guard_their_inputs():
    assert get_metric("Top5_Accuracy").name == "top5_accuracy"
    existing = get_metric("mse")
    assert get_metric(existing) is existing
    with pytest.raises(ValueError, match="unknown metric 'f2'"):
        get_metric("f2")
    with pytest.raises(TypeError, match="got int"):
        get_metric(3)
    with pytest.raises(ValueError, match="distinct"):
        reduce_metrics([get_metric("mse"), get_metric("mse")])
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        reduce_metrics([get_metric("mse")], world_size=2)
    assert math.isnan(reduce_metrics([get_metric("auc")])["auc"])  # nothing seen


# --- two real ranks over gloo -----------------------------------------------------------------


def all_cases() -> dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]]:
    sigmoid, logits = binary_case("sigmoid"), binary_case("logits")
    digits, diabetes = digits_case(), diabetes_case()
    return {
        "sigmoid": (CLASSIFICATION, sigmoid["outputs"], sigmoid["float_labels"]),
        "logits": (CLASSIFICATION, logits["outputs"], logits["int_labels"]),
        "digits": (("accuracy", "top3_accuracy", "f1", "auc"), digits["outputs"], digits["labels"]),
        "diabetes": (("mse", "mae", "rmse", "r2"), diabetes["outputs"], diabetes["labels"]),
    }


def _rank_main(rank: int, port: int, cases, results) -> None:
    try:
        torch.set_num_threads(1)
        with process_group(RendezvousSpec("127.0.0.1", port, 2, timeout_s=60), rank):
            values = {}
            for name, (names, outputs, labels) in cases.items():
                cut = int(0.3 * len(outputs))  # uneven: 30% on rank 0, 70% on rank 1
                rows = slice(0, cut) if rank == 0 else slice(cut, None)
                values[name] = computed(names, outputs, labels, rows)
                # rank 1 has no rows at all: it learns the task from rank 0
                everything = slice(None) if rank == 0 else slice(0, 0)
                values[f"{name}_one_rank"] = computed(names, outputs, labels, everything)
        results.put((rank, "ok", values))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_two_ranks(cases, timeout_s: float = 180.0) -> dict[int, dict]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, port, cases, results), daemon=True)
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    payloads: dict[int, dict] = {}
    try:
        while len(payloads) < 2:
            try:
                rank, status, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"ranks {sorted({0, 1} - set(payloads))} silent for {timeout_s:g} s")
            payloads[rank] = (status, payload)
    finally:
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    failures = [
        f"rank {rank}:\n{value}" for rank, (status, value) in payloads.items() if status != "ok"
    ]
    if failures:
        pytest.fail("\n".join(failures))
    return {rank: value for rank, (_, value) in payloads.items()}


def test_metrics_reduced_over_two_gloo_ranks_equal_sklearn_on_all_rows():
    cases = all_cases()
    payloads = run_two_ranks(cases)
    sigmoid, logits = cases["sigmoid"][1].numpy()[:, 0], cases["logits"][1].numpy()[:, 0]
    labels = cases["logits"][2].numpy()
    expected = {
        "sigmoid": sklearn_binary(sigmoid, labels, 0.5),
        "logits": sklearn_binary(logits, labels, 0.0),
        "digits": sklearn_multiclass(cases["digits"][1].numpy(), cases["digits"][2].numpy()),
        "diabetes": sklearn_regression(cases["diabetes"][1].numpy(), cases["diabetes"][2].numpy()),
    }
    del expected["digits"]["precision"], expected["digits"]["recall"]
    for rank in (0, 1):
        for name, values in expected.items():
            assert_close(payloads[rank][name], values)
            assert_close(payloads[rank][f"{name}_one_rank"], values)


# --- end to end on Spark ----------------------------------------------------------------------


@pytest.mark.slow
def test_fit_and_evaluate_a_sigmoid_net_on_spark_match_sklearn(spark):
    import pandas as pd

    features, labels = breast_cancer()
    frame = pd.DataFrame(
        {
            "features": list(features.numpy().astype(np.float64)),
            "label": [[float(label)] for label in labels.tolist()],  # array<double>[1]: (N, 1)
        }
    )
    df = spark.createDataFrame(frame, "features array<double>, label array<double>")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1), torch.nn.Sigmoid()
    )
    est = ds.Estimator.from_torch(
        model=net,
        loss=torch.nn.BCELoss(),
        metrics=["accuracy", "auc"],
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
    )
    history = est.fit(
        df, feature_cols="features", label_cols="label", epochs=3, batch_size=64, num_workers=2
    )
    assert history["train_accuracy"].iloc[-1] > 0.9
    scores = est.evaluate(df, feature_cols="features", label_cols="label", num_workers=2)
    with torch.no_grad():
        probabilities = est.get_model()(features).numpy()[:, 0]
    assert scores["accuracy"] == pytest.approx(
        skm.accuracy_score(labels, probabilities > 0.5), abs=1e-6
    )
    assert scores["auc"] == pytest.approx(skm.roc_auc_score(labels, probabilities), abs=1e-4)
    assert scores["accuracy"] > 0.9  # thresholding probabilities at 0 would give 0.63
