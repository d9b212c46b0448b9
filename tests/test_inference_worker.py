"""The inference loop inside a task, on plain pyarrow batches (no Spark)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepspark.data import TensorSpec
from deepspark.inference import (
    ModelInputError,
    OutputKind,
    PredictSpec,
    cache_info,
    model_source,
    predict_partition,
)
from deepspark.inference.worker import PredictError, resolve_output, whole_batches

FEATURES = 6


def make_mlp(outputs: int) -> torch.nn.Module:
    torch.manual_seed(outputs)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, outputs)
    ).eval()


def partition(sizes: list[int], start: int = 0) -> list[pa.RecordBatch]:
    """Record batches of the given sizes: an id, a feature array and a label string."""
    rng = np.random.default_rng(start)
    batches, next_id = [], start
    for size in sizes:
        ids = np.arange(next_id, next_id + size, dtype=np.int64)
        values = rng.standard_normal((size, FEATURES), dtype=np.float32)
        offsets = np.arange(0, size * FEATURES + 1, FEATURES, dtype=np.int32)
        features = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))
        names = pa.array([f"row-{i}" for i in ids])
        batches.append(
            pa.RecordBatch.from_arrays([pa.array(ids), features, names], ["id", "x", "name"])
        )
        next_id += size
    return batches


def features_of(batches: list[pa.RecordBatch]) -> torch.Tensor:
    rows = [np.asarray(b.column("x").to_pylist(), dtype=np.float32) for b in batches if len(b)]
    return torch.from_numpy(np.concatenate(rows).reshape(-1, FEATURES))


def spec_for(model, output: OutputKind, **options) -> PredictSpec:
    values = {"passthrough_cols": ("id", "name"), "batch_size": 4, **options}
    return PredictSpec(
        model=model_source(model),
        features=(TensorSpec("x", "array", (FEATURES,)),),
        output_col="prediction",
        output=output,
        **values,
    )


def run(batches, spec) -> pa.Table:
    produced = list(predict_partition(iter(batches), spec))
    # one output batch per input batch, runs of batches under batch_size rows joined
    expected = [batch.num_rows for batch in whole_batches(batches, spec.batch_size)]
    assert [batch.num_rows for batch in produced] == expected
    return pa.Table.from_batches(produced)


def test_rows_keep_their_order_and_passthrough_columns():
    batches = partition([5, 0, 7, 1, 3])  # batches larger, smaller and equal to batch_size
    model = make_mlp(outputs=3)
    table = run(batches, spec_for(model, OutputKind.ARRAY))
    assert table.column_names == ["id", "name", "prediction"]
    assert table.column("id").to_pylist() == list(range(16))
    assert table.column("name").to_pylist() == [f"row-{i}" for i in range(16)]
    assert table.schema.field("prediction").type == pa.list_(pa.float32())
    with torch.no_grad():
        expected = model(features_of(batches))
    predicted = torch.tensor(table.column("prediction").to_pylist())
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=0)


def test_each_output_kind_has_its_type_and_values():
    batches = partition([6, 3])
    inputs = features_of(batches)
    regressor, classifier = make_mlp(outputs=1), make_mlp(outputs=4)
    with torch.no_grad():
        scores, logits = regressor(inputs)[:, 0], classifier(inputs)

    doubles = run(batches, spec_for(regressor, OutputKind.DOUBLE)).column("prediction")
    assert doubles.type == pa.float64()
    np.testing.assert_allclose(doubles.to_numpy(), scores.numpy(), atol=1e-5)

    classes = run(batches, spec_for(classifier, OutputKind.CLASS)).column("prediction")
    assert classes.type == pa.int32()
    assert classes.to_pylist() == logits.argmax(dim=1).tolist()

    probabilities = run(batches, spec_for(classifier, OutputKind.PROBABILITIES))
    values = np.asarray(probabilities.column("prediction").to_pylist())
    np.testing.assert_allclose(values, torch.softmax(logits, dim=1).numpy(), atol=1e-6)
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-6)

    binary = run(batches, spec_for(regressor, OutputKind.PROBABILITIES)).column("prediction")
    positive = torch.sigmoid(scores).numpy()
    np.testing.assert_allclose(np.asarray(binary.to_pylist())[:, 1], positive, atol=1e-6)
    binary_ids = run(batches, spec_for(regressor, OutputKind.CLASS)).column("prediction")
    assert binary_ids.to_pylist() == (scores > 0).int().tolist()


def test_an_empty_partition_loads_no_model():
    before = cache_info().loads
    spec = spec_for(make_mlp(outputs=2), OutputKind.ARRAY)
    assert list(predict_partition(iter([]), spec)) == []
    assert list(predict_partition(iter(partition([0, 0])), spec)) == []
    assert cache_info().loads == before


def test_the_model_loads_once_across_partitions():
    spec = spec_for(make_mlp(outputs=5), OutputKind.ARRAY)
    before = cache_info()
    for start in (0, 100, 200):
        run(partition([3, 4], start=start), spec)
    after = cache_info()
    assert after.loads - before.loads == 1


def test_the_task_thread_count_is_applied():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # so that the check below fails if num_threads is ignored
        spec = spec_for(make_mlp(outputs=2), OutputKind.ARRAY, num_threads=1)
        run(partition([2]), spec)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_a_feature_shape_the_model_cannot_take_is_reported():
    spec = PredictSpec(
        model=model_source(torch.nn.Linear(4, 2)),
        features=(TensorSpec("x", "array", (FEATURES,)),),
        output_col="prediction",
        output=OutputKind.ARRAY,
    )
    with pytest.raises(PredictError, match=r"'x' \(N=3, 6\) float32.*expects \(N, 4\)") as info:
        run(partition([3]), spec)
    assert isinstance(info.value.__cause__, ModelInputError)


class FailingModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"cannot score {x.shape[0]} rows")


def test_a_failing_model_is_summed_up_in_one_line_naming_the_partition():
    spec = spec_for(FailingModel(), OutputKind.ARRAY)
    with pytest.raises(PredictError) as info:
        list(predict_partition(iter(partition([3])), spec, partition_id=7))
    summary = str(info.value).splitlines()[0]
    assert summary == "deepspark predict: partition 7: ValueError: cannot score 3 rows"
    assert isinstance(info.value.__cause__.__cause__, ValueError)  # through ModelInputError


def test_output_kinds_are_checked_against_the_output_shape():
    assert resolve_output("auto", (5,)) is OutputKind.DOUBLE
    assert resolve_output("auto", (5, 1)) is OutputKind.DOUBLE
    assert resolve_output("auto", (5, 3)) is OutputKind.ARRAY
    assert resolve_output("array", (5, 2, 2)) is OutputKind.ARRAY
    with pytest.raises(ModelInputError, match="output='double' needs one value per row"):
        resolve_output("double", (5, 3))
    with pytest.raises(ModelInputError, match="needs outputs of shape"):
        resolve_output("class", (5, 3, 2))
    with pytest.raises(ValueError, match="output='vector' is not known"):
        resolve_output("vector", (5, 3))


def test_whole_batches_joins_small_batches_and_never_copies_a_large_one():
    stream = [
        pa.record_batch({"v": list(range(a, b))}) for a, b in [(0, 2), (2, 3), (3, 3), (3, 12)]
    ]
    stream.append(pa.record_batch({"v": [12]}))
    whole = list(whole_batches(stream, 4))
    assert [b.num_rows for b in whole] == [3, 9, 1]
    assert [v for b in whole for v in b.column("v").to_pylist()] == list(range(13))
    assert whole[1].column("v").buffers()[1].address == stream[3].column("v").buffers()[1].address


MODEL_CALLS: list[int] = []


class RecordingSum(torch.nn.Module):
    """Sums each row's features and records the rows of each call."""

    def forward(self, x):
        MODEL_CALLS.append(x.shape[0])
        return x.sum(dim=1, keepdim=True)


def test_a_large_arrow_batch_is_predicted_in_model_batches_with_its_rows_in_order():
    MODEL_CALLS.clear()
    batches = partition([11, 2, 1])  # one large Arrow batch, then two small ones joined
    table = run(batches, spec_for(RecordingSum(), OutputKind.DOUBLE))
    assert MODEL_CALLS == [4, 4, 3, 3]
    assert table.column("id").to_pylist() == list(range(14))
    np.testing.assert_allclose(
        table.column("prediction").to_numpy(), features_of(batches).sum(dim=1).numpy(), rtol=1e-6
    )


class FirstRowOnly(torch.nn.Module):
    """Returns one row whatever the batch: its outputs cannot be matched to the rows."""

    def forward(self, x):
        return x[:1].sum(dim=1, keepdim=True)


def test_a_model_that_drops_rows_fails_naming_the_batch_dimension():
    spec = spec_for(FirstRowOnly(), OutputKind.DOUBLE)
    with pytest.raises(PredictError, match=r"shape \(1, 1\) for a batch of 4 rows") as caught:
        list(predict_partition(iter(partition([11])), spec, partition_id=3))
    assert "partition 3" in str(caught.value)
    assert "batch dimension first" in str(caught.value)
