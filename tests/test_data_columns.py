"""Arrow columns to tensors: every column kind, dtype and shape case, and every refusal."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepspark.data import ColumnKind, FeedError, TensorSpec, batch_to_tensors

VECTOR_TYPE = pa.struct(
    [
        pa.field("type", pa.int8(), nullable=False),
        ("size", pa.int32()),
        ("indices", pa.list_(pa.int32())),
        ("values", pa.list_(pa.float64())),
    ]
)


def dense(values):
    return {"type": 1, "size": None, "indices": None, "values": list(values)}


def sparse(size, indices, values):
    return {"type": 0, "size": size, "indices": list(indices), "values": list(values)}


def convert(batch, *specs):
    return batch_to_tensors(batch, list(specs))


# --- scalars ----------------------------------------------------------------------------------

NUMERIC_TYPES = [
    pa.int8(),
    pa.int16(),
    pa.int32(),
    pa.int64(),
    pa.uint8(),
    pa.float16(),
    pa.float32(),
    pa.float64(),
]
DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8"]


@pytest.mark.parametrize("arrow_type", NUMERIC_TYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_columns_convert_to_every_dtype(arrow_type, dtype):
    values = [0, 1, 2, 3, 100, 7]
    data = np.array(values).astype(arrow_type.to_pandas_dtype())
    batch = pa.record_batch({"x": pa.array(data, type=arrow_type)})
    (tensor,) = convert(batch, TensorSpec("x", "scalar", dtype=dtype))
    assert tensor.dtype == getattr(torch, dtype)
    assert tensor.shape == (6,)
    assert tensor.to(torch.float64).tolist() == [float(v) for v in values]


def test_boolean_scalars_become_numbers():
    batch = pa.record_batch({"flag": [True, False, True]})
    (as_float,) = convert(batch, TensorSpec("flag", "scalar"))
    (as_bool,) = convert(batch, TensorSpec("flag", "scalar", dtype="bool"))
    assert as_float.tolist() == [1.0, 0.0, 1.0]
    assert as_bool.tolist() == [True, False, True]


def test_matching_fixed_width_column_is_zero_copy():
    column = pa.array(np.arange(1000, dtype=np.float32))
    batch = pa.record_batch({"x": column, "y": pa.array(np.arange(1000, dtype=np.int64))})
    x, y = convert(batch, TensorSpec("x", "scalar"), TensorSpec("y", "scalar", dtype="int64"))
    assert x.data_ptr() == column.buffers()[1].address
    assert y.data_ptr() == batch.column(1).buffers()[1].address
    (cast,) = convert(batch, TensorSpec("y", "scalar"))  # int64 -> float32 must copy
    assert cast.data_ptr() != batch.column(1).buffers()[1].address


def test_scalar_columns_stack_into_one_tensor():
    batch = pa.record_batch(
        {"a": pa.array([1, 2], pa.int32()), "b": [0.5, 1.5], "c": pa.array([True, False])}
    )
    spec = TensorSpec(("a", "b", "c"), "scalar")
    assert spec.shape == (3,)
    (tensor,) = convert(batch, spec)
    assert tensor.tolist() == [[1.0, 0.5, 1.0], [2.0, 1.5, 0.0]]


def test_scalar_with_shape_one_gets_a_column_dimension():
    batch = pa.record_batch({"y": [0.5, 1.5, 2.5]})
    (tensor,) = convert(batch, TensorSpec("y", "scalar", (1,)))
    assert tensor.shape == (3, 1)


def test_a_sliced_batch_converts_only_its_rows():
    batch = pa.record_batch(
        {
            "x": pa.array(np.arange(10, dtype=np.float32)),
            "a": pa.array([[float(i), float(-i)] for i in range(10)]),
            "v": pa.array([dense([i, 0, 0]) for i in range(10)], VECTOR_TYPE),
        }
    ).slice(3, 4)
    x, a, v = convert(
        batch,
        TensorSpec("x", "scalar"),
        TensorSpec("a", "array", (2,)),
        TensorSpec("v", "vector"),
    )
    assert x.tolist() == [3.0, 4.0, 5.0, 6.0]
    assert a[:, 0].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert v[:, 0].tolist() == [3.0, 4.0, 5.0, 6.0]


# --- arrays -----------------------------------------------------------------------------------


def image_rows(rows, side=4):
    return [list(np.arange(side * side, dtype=np.float64) + 100 * r) for r in range(rows)]


@pytest.mark.parametrize(
    "list_type",
    [
        pa.list_(pa.float64()),
        pa.large_list(pa.float64()),
        pa.list_(pa.float64(), 16),
        pa.list_(pa.float32()),
        pa.list_(pa.int32()),
    ],
    ids=str,
)
def test_array_columns_reshape_to_the_declared_shape(list_type):
    batch = pa.record_batch({"img": pa.array(image_rows(3), list_type)})
    (tensor,) = convert(batch, TensorSpec("img", "array", (1, 4, 4)))
    assert tensor.shape == (3, 1, 4, 4) and tensor.dtype == torch.float32
    expected = np.array(image_rows(3), dtype=np.float32).reshape(3, 1, 4, 4)
    assert np.array_equal(tensor.numpy(), expected)


def test_flat_float32_array_is_a_view_of_the_arrow_values():
    values = pa.array(np.arange(12, dtype=np.float32))
    offsets = pa.array(np.arange(0, 13, 4, dtype=np.int32))
    batch = pa.record_batch({"x": pa.ListArray.from_arrays(offsets, values)})
    (tensor,) = convert(batch, TensorSpec("x", "array", (2, 2)))
    assert tensor.data_ptr() == values.buffers()[1].address


def test_nested_arrays_keep_their_dimensions():
    rows = [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0], [1.0, 1.0, 1.0]]]
    batch = pa.record_batch({"m": pa.array(rows)})
    (declared,) = convert(batch, TensorSpec("m", "array", (2, 3)))
    (inferred,) = convert(batch, TensorSpec("m", "array"))
    (flat,) = convert(batch, TensorSpec("m", "array", (6,)))
    assert declared.tolist() == rows and inferred.tolist() == rows
    assert flat.shape == (2, 6)


def test_array_without_shape_takes_the_row_length():
    batch = pa.record_batch({"x": pa.array([[1, 2, 3], [4, 5, 6]], pa.list_(pa.int64()))})
    (tensor,) = convert(batch, TensorSpec("x", "array", dtype="int64"))
    assert tensor.shape == (2, 3) and tensor.dtype == torch.int64


def test_ragged_arrays_are_refused_with_expected_and_found_lengths():
    rows = [[1.0] * 4, [1.0] * 4, [1.0] * 3, [1.0] * 4]
    batch = pa.record_batch({"img": pa.array(rows)})
    with pytest.raises(FeedError) as declared:
        convert(batch, TensorSpec("img", "array", (2, 2)))
    message = str(declared.value)
    assert "'img'" in message and "ragged" in message
    assert "length 4" in message and "found length 3" in message and "row 2" in message
    with pytest.raises(FeedError, match=r"'img' is ragged: expected arrays of length 4"):
        convert(batch, TensorSpec("img", "array"))


def test_nested_ragged_arrays_are_refused():
    batch = pa.record_batch({"m": pa.array([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0]]])})
    with pytest.raises(FeedError, match=r"'m' is ragged.*depth 1"):
        convert(batch, TensorSpec("m", "array", (2, 2)))


def test_array_of_the_wrong_size_for_the_declared_shape_is_refused():
    batch = pa.record_batch({"img": pa.array(image_rows(2), pa.list_(pa.float64(), 16))})
    with pytest.raises(FeedError, match=r"'img'.*shape \(1, 28, 28\) needs 784.*16"):
        convert(batch, TensorSpec("img", "array", (1, 28, 28)))


# --- nulls --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "spec", "what"),
    [
        (pa.array([1.0, None, None, 4.0]), TensorSpec("c", "scalar"), "2 null values"),
        (pa.array([[1.0], None, [2.0], [3.0]]), TensorSpec("c", "array", (1,)), "1 null arrays"),
        (
            pa.array([[1.0], [None], [2.0], [3.0]]),
            TensorSpec("c", "array", (1,)),
            "1 null array elements",
        ),
        (
            pa.array([dense([1.0]), None, dense([2.0]), None], VECTOR_TYPE),
            TensorSpec("c", "vector"),
            "2 null vectors",
        ),
        (
            pa.array([b"a", None, b"b", b"c"]),
            TensorSpec("c", "binary", decode=lambda b: [len(b)]),
            "1 null values",
        ),
    ],
    ids=["scalar", "array", "element", "vector", "binary"],
)
def test_nulls_are_refused_with_column_and_count(column, spec, what):
    batch = pa.record_batch({"c": column})
    with pytest.raises(FeedError) as error:
        convert(batch, spec)
    assert "'c'" in str(error.value) and what in str(error.value)
    assert "na.drop" in str(error.value)


# --- vectors ------------------------------------------------------------------------------------


def test_dense_and_sparse_vectors_become_dense_rows():
    rows = [dense([1, 2, 3, 4]), sparse(4, [1, 3], [5, 6]), sparse(4, [], []), dense([0, 0, 9, 0])]
    batch = pa.record_batch({"v": pa.array(rows, VECTOR_TYPE)})
    (tensor,) = convert(batch, TensorSpec("v", "vector"))
    assert tensor.dtype == torch.float32
    assert tensor.tolist() == [[1, 2, 3, 4], [0, 5, 0, 6], [0, 0, 0, 0], [0, 0, 9, 0]]
    (declared,) = convert(batch, TensorSpec("v", "vector", (4,), dtype="float64"))
    assert declared.dtype == torch.float64 and declared.shape == (4, 4)


def test_random_sparse_vectors_match_a_reference():
    rng = np.random.default_rng(3)
    expected = np.where(rng.random((200, 30)) < 0.2, rng.standard_normal((200, 30)), 0.0)
    rows = []
    for position, row in enumerate(expected):
        if position % 3 == 0:
            rows.append(dense(row))
        else:
            nonzero = np.flatnonzero(row)
            rows.append(sparse(30, nonzero, row[nonzero]))
    batch = pa.record_batch({"v": pa.array(rows, VECTOR_TYPE)})
    (tensor,) = convert(batch, TensorSpec("v", "vector", dtype="float64"))
    assert np.array_equal(tensor.numpy(), expected)


def test_vectors_of_different_sizes_are_refused():
    rows = [dense([1, 2, 3]), sparse(5, [0], [1.0]), dense([1, 2, 3])]
    batch = pa.record_batch({"v": pa.array(rows, VECTOR_TYPE)})
    with pytest.raises(FeedError, match=r"'v' has vectors of different sizes: expected 3.*5"):
        convert(batch, TensorSpec("v", "vector"))
    with pytest.raises(FeedError, match=r"expected 4 \(shape \(4,\)\)"):
        convert(batch, TensorSpec("v", "vector", (4,)))


def test_sparse_index_out_of_range_is_refused():
    batch = pa.record_batch({"v": pa.array([sparse(3, [5], [1.0])], VECTOR_TYPE)})
    with pytest.raises(FeedError, match="outside 0..2"):
        convert(batch, TensorSpec("v", "vector"))


# --- binary and string ------------------------------------------------------------------------


def test_binary_columns_go_through_the_decoder():
    images = [np.full((2, 3), fill, dtype=np.uint8) for fill in (1, 2, 3)]
    batch = pa.record_batch({"img": [image.tobytes() for image in images]})

    def decode(data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).reshape(2, 3)

    (as_float,) = convert(batch, TensorSpec("img", "binary", (2, 3), decode=decode))
    (as_uint8,) = convert(batch, TensorSpec("img", "binary", dtype="uint8", decode=decode))
    assert as_float.dtype == torch.float32 and as_float[:, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (3, 2, 3)


def test_string_columns_go_through_the_decoder():
    vocabulary = {"a": 1, "b": 2, "c": 3}

    def tokenize(text: str) -> list[int]:
        ids = [vocabulary[token] for token in text.split()][:4]
        return ids + [0] * (4 - len(ids))

    batch = pa.record_batch({"text": ["a b", "c", "a a a a a"]})
    (tokens,) = convert(batch, TensorSpec("text", "string", (4,), "int64", tokenize))
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [[1, 2, 0, 0], [3, 0, 0, 0], [1, 1, 1, 1]]


def test_decoder_output_of_inconsistent_shape_is_refused():
    batch = pa.record_batch({"text": ["a b", "c"]})
    spec = TensorSpec("text", "string", decode=lambda text: [1.0] * len(text.split()))
    with pytest.raises(FeedError, match=r"'text'.*returned shape \(1,\).*\(2,\) was expected"):
        convert(batch, spec)


@pytest.mark.parametrize("kind", ["binary", "string"])
def test_binary_and_string_need_a_decoder(kind):
    with pytest.raises(FeedError, match=rf"'raw' is a {kind} column and needs a decode"):
        TensorSpec("raw", kind)


# --- refusals of the spec or the data -----------------------------------------------------


def test_missing_column_lists_the_available_ones():
    batch = pa.record_batch({"a": [1.0], "b": [2.0]})
    with pytest.raises(FeedError, match=r"'z' is not in the data; available columns: a, b"):
        convert(batch, TensorSpec("z", "scalar"))


@pytest.mark.parametrize(
    ("column", "match"),
    [
        (pa.array([1, 2], pa.timestamp("us")), "not numeric"),
        (pa.array([1, 2], pa.decimal128(5, 2)), "cast it to double"),
        (pa.array(["1", "2"]), "not numeric"),
    ],
    ids=["timestamp", "decimal", "string"],
)
def test_unsupported_scalar_types_are_refused(column, match):
    batch = pa.record_batch({"c": column})
    with pytest.raises(FeedError, match=match):
        convert(batch, TensorSpec("c", "scalar"))


def test_kind_that_does_not_match_the_data_is_refused():
    batch = pa.record_batch({"x": [1.0, 2.0]})
    with pytest.raises(FeedError, match="not an array of numbers"):
        convert(batch, TensorSpec("x", "array", (1,)))
    with pytest.raises(FeedError, match="not a Spark ML vector"):
        convert(batch, TensorSpec("x", "vector"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"columns": "x", "kind": "tensor"}, "kind='tensor' is not known"),
        ({"columns": "x", "kind": "scalar", "dtype": "complex64"}, "dtype 'complex64'"),
        ({"columns": "x", "kind": "scalar", "shape": (3,)}, "scalar column"),
        ({"columns": ("x", "y"), "kind": "array"}, "only scalar columns can be stacked"),
        ({"columns": "x", "kind": "array", "shape": (0, 3)}, "positive integers"),
        ({"columns": "x", "kind": "array", "decode": len}, "decode functions apply"),
        ({"columns": (), "kind": "scalar"}, "non-empty names"),
    ],
)
def test_invalid_specs_are_refused(kwargs, match):
    with pytest.raises(FeedError, match=match):
        TensorSpec(**kwargs)


def test_spec_accepts_torch_dtypes_and_aliases():
    assert TensorSpec("x", ColumnKind.SCALAR, dtype=torch.int64).dtype == "int64"
    assert TensorSpec("x", "scalar", dtype="double").dtype == "float64"


def test_tables_with_several_chunks_and_empty_tables_convert():
    first = pa.record_batch({"x": pa.array([[1.0, 2.0]]), "y": [1]})
    second = pa.record_batch({"x": pa.array([[3.0, 4.0], [5.0, 6.0]]), "y": [2, 3]})
    table = pa.Table.from_batches([first, second])
    x, y = convert(table, TensorSpec("x", "array", (2,)), TensorSpec("y", "scalar", dtype="int64"))
    assert x.tolist() == [[1, 2], [3, 4], [5, 6]] and y.tolist() == [1, 2, 3]
    x, y = convert(
        table.schema.empty_table(),
        TensorSpec("x", "array", (2,)),
        TensorSpec("y", "scalar", dtype="int64"),
    )
    assert x.shape == (0, 2) and y.shape == (0,)
