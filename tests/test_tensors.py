"""Tensors from arrays, cached converter attributes and lazily converted types."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxeps.converters._builder import _attribute
from onnxeps.infer import TensorType, infer_types
from onnxeps.tensors import tensor_from_array

ARRAYS = {
    "float32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "float16": np.array([0.5, -2.0], dtype=np.float16),
    "bool": np.array([True, False]),
    "scalar": np.array(3.5),
    "transposed": np.arange(6.0).reshape(2, 3).T,
    "bfloat16": np.array([1.5, -3.0], dtype=ml_dtypes.bfloat16),
    "int4": np.array([1, -2, 3], dtype=ml_dtypes.int4),
}


@pytest.mark.parametrize("values", ARRAYS.values(), ids=ARRAYS.keys())
def test_tensor_from_array_equals_from_array(values):
    tensor = tensor_from_array(values, "t")
    assert tensor.SerializeToString() == numpy_helper.from_array(values, "t").SerializeToString()


def test_tensor_from_array_big_endian_stored_little():
    # numpy_helper.from_array rejects big-endian dtypes, so only the values are compared.
    values = np.arange(4, dtype=">i8")
    tensor = tensor_from_array(values, "t")
    assert tensor.data_type == TensorProto.INT64
    assert np.array_equal(numpy_helper.to_array(tensor), values)


@pytest.mark.parametrize(
    ("a", "b"),
    [(0.0, -0.0), (1, 1.0), ([1], [1.0]), ([0.0], [-0.0]), (True, 1)],
    ids=["signed-zero", "int-float", "int-list-float-list", "signed-zero-list", "bool-int"],
)
def test_cached_attribute_keeps_values_apart(a, b):
    for value in (a, b, a):
        expected = helper.make_attribute("k", value).SerializeToString()
        assert _attribute("k", value).SerializeToString() == expected


def test_cached_attribute_nan():
    assert np.isnan(_attribute("k", float("nan")).f)


def test_infer_types_typed_value_not_hidden():
    # Two If branches output "o": a tensor in one, a sequence in the other.
    constant = helper.make_tensor("v", TensorProto.FLOAT, [2], [1, 2])
    tensor_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["o"], value=constant)], "tensor", [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    sequence_branch = helper.make_graph(
        [helper.make_node("SequenceEmpty", [], ["o"], dtype=TensorProto.FLOAT)],
        "sequence", [],
        [helper.make_tensor_sequence_value_info("o", TensorProto.FLOAT, None)],
    )  # fmt: skip
    branches = {"then_branch": sequence_branch, "else_branch": tensor_branch}
    node = helper.make_node("If", ["c"], ["r"], **branches)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
    )  # fmt: skip
    types = infer_types(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert "o" in types
    assert types["o"] == TensorType(TensorProto.FLOAT, (2,))
    assert set(types) == {"c", "r", "o"}
    assert len(types) == 3
