"""Tests of the memory limit: size parsing, tensor sizes from dims and data types, the
default limit, and the check before scoring materialises the weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxeps
from onnxeps.cli import main
from onnxeps.errors import InputError, MemoryLimitError
from onnxeps.limits import (
    AUTO,
    PEAK_COPIES_COLLAPSE,
    PEAK_COPIES_FULL,
    available_memory,
    check_weight_memory,
    format_bytes,
    parse_memory_limit,
    tensor_bytes,
    weight_bytes,
)
from onnxeps.load import load_model

vi = helper.make_tensor_value_info
# Bytes of the two float32 weights of mlp_model: 4 x 5 and 5 x 3 values.
MLP_WEIGHT_BYTES = 4 * (4 * 5 + 5 * 3)


def mlp_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "W2"),
    ]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
         helper.make_node("MatMul", ["t", "W2"], ["y"])],
        "mlp", [vi("x", TensorProto.FLOAT, ["batch", 4])],
        [vi("y", TensorProto.FLOAT, ["batch", 3])], weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def external_tensor(name: str, dims: list[int], location: str) -> onnx.TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3GB", 3 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5 GiB", 3 * 2**29),
        ("2tb", 2 * 10**12),
        ("64kB", 64_000),
        ("1000", 1000),
        ("1000B", 1000),
        (2**30, 2**30),
        (np.int64(7), 7),
        ("none", None),
        ("None", None),
        (None, None),
        ("auto", AUTO),
        (" AUTO ", AUTO),
    ],
)
def test_parse_memory_limit_valid(text, expected):
    assert parse_memory_limit(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GB", "3XB", "3 G", "-1GB", "0", "0MB", "1e9", "inf", "nan", 1.5, True, -4]
)  # fmt: skip
def test_parse_memory_limit_invalid(text):
    with pytest.raises(ValueError, match="invalid memory limit"):
        parse_memory_limit(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 bytes"), (999, "999 bytes"), (1000, "1.0 kB"), (5.2e9, "5.2 GB"),
     (2**31, "2.1 GB"), (4.4e12, "4.4 TB")],
)  # fmt: skip
def test_format_bytes_decimal_units(size, text):
    assert format_bytes(size) == text


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((2, 3), np.float32), 24),
        (np.zeros((5,), np.float16), 10),
        (np.zeros((), np.int64), 8),
        (np.zeros((3,), bool), 3),
        (np.zeros((0, 7), np.float64), 0),
        (np.array([b"ab", b"cde"], dtype=object), 5),
    ],
    ids=["float32", "float16", "int64-scalar", "bool", "empty", "string"],
)
def test_tensor_bytes_inline(array, expected):
    assert tensor_bytes(numpy_helper.from_array(array, "t")) == expected


def test_tensor_bytes_external_not_read(tmp_path):
    """The size comes from the dims: the data file does not even exist."""
    tensor = external_tensor("big", [1000, 2**20], str(tmp_path / "missing.data"))
    assert tensor_bytes(tensor) == 4 * 1000 * 2**20


def test_tensor_bytes_unknown_type_zero():
    assert tensor_bytes(TensorProto(name="t", data_type=99, dims=[10])) == 0


def test_weight_bytes_constants_and_subgraphs():
    """Initializers, Constant-node values and If-branch initializers all count."""
    branch_weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "Wt")
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wt"], ["yt"])], "then", [],
        [vi("yt", TensorProto.FLOAT, ["batch", 3])], [branch_weight],
    )  # fmt: skip
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["ye"], value=numpy_helper.from_array(
            np.zeros((1, 3), np.float64), "ye_value"))],
        "else", [], [vi("ye", TensorProto.DOUBLE, [1, 3])],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "branches", [vi("x", TensorProto.FLOAT, ["batch", 4])],
        [vi("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array(True), "c")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert weight_bytes(model) == 1 + 4 * 12 + 8 * 3


def test_weight_bytes_mlp():
    assert weight_bytes(mlp_model()) == MLP_WEIGHT_BYTES


def test_check_rejects_with_both_numbers():
    loaded = load_model(mlp_model())
    with pytest.raises(MemoryLimitError) as caught:
        check_weight_memory(loaded, "100B", collapse=True)
    message = str(caught.value)
    need = format_bytes(MLP_WEIGHT_BYTES * PEAK_COPIES_COLLAPSE)
    weights = format_bytes(MLP_WEIGHT_BYTES)
    assert message.startswith("mlp: the weights need about ")
    assert f"need about {need} of memory" in message
    assert f"({weights} of tensors, held about 4 times)" in message
    assert "the memory limit is 100 bytes." in message
    assert "--no-collapse" in message


def test_check_full_graph_fewer_copies():
    loaded = load_model(mlp_model())
    with pytest.raises(MemoryLimitError, match="held about 2.5 times") as caught:
        check_weight_memory(loaded, 100, collapse=False)
    assert "--no-collapse" not in str(caught.value)


def test_check_limit_at_need_passes():
    loaded = load_model(mlp_model())
    need = int(MLP_WEIGHT_BYTES * PEAK_COPIES_FULL)
    check_weight_memory(loaded, need, collapse=False)
    with pytest.raises(MemoryLimitError):
        check_weight_memory(loaded, need - 1, collapse=False)


def test_check_no_limit_passes(tmp_path):
    """No limit lets a declared 4 TB of external weights through the check."""
    model = mlp_model()
    model.graph.initializer.append(external_tensor("huge", [2**40], "huge.data"))
    check_weight_memory(load_model(model), None, collapse=True)


def test_check_auto_names_available_memory():
    model = mlp_model()
    model.graph.initializer.append(external_tensor("huge", [2**50], "huge.data"))
    with pytest.raises(MemoryLimitError, match=r"\(the memory available now\)\."):
        check_weight_memory(load_model(model), AUTO, collapse=True)


def test_check_invalid_limit_input_error():
    with pytest.raises(InputError, match="invalid memory limit '3XB'"):
        check_weight_memory(load_model(mlp_model()), "3XB", collapse=True)


def test_available_memory_positive():
    available = available_memory()
    assert available is not None
    assert available > 0


def test_available_memory_under_address_space_limit():
    """Under ulimit -v 2 GiB the default limit is below 2 GiB."""
    code = "from onnxeps.limits import available_memory; print(available_memory())"
    done = subprocess.run(
        ["/bin/sh", "-c", 'ulimit -v 2097152 && exec "$0" "$@"', sys.executable, "-c", code],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    available = int(done.stdout)
    assert 0 < available < 2**31


def test_score_memory_limit_rejects():
    with pytest.raises(MemoryLimitError, match=r"the memory limit is 100 bytes\."):
        onnxeps.score(mlp_model(), batch_size=8, memory_limit="100B")


def test_score_memory_limit_does_not_change_score():
    limited = onnxeps.score(mlp_model(), batch_size=8, memory_limit="1GB")
    unlimited = onnxeps.score(mlp_model(), batch_size=8, memory_limit=None)
    assert limited.epsilon is not None
    assert limited.epsilon == unlimited.epsilon


def test_cli_invalid_memory_limit_usage_error(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(mlp_model(), str(path))
    result = CliRunner().invoke(main, ["score", str(path), "--memory-limit", "3XB"])
    assert result.exit_code == 2
    assert "invalid memory limit '3XB'" in result.output
