"""Tests of `onnxeps screen`: column order, MACs against hand counts, activation
memory, file size, latency, the Pareto front and the runtime-crasher check."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxeps.cli import main
from onnxeps.converters import nb201
from onnxeps.latency import find_runtime_crashers
from onnxeps.memory import peak_activation_bytes
from onnxeps.pareto import pareto_flags
from onnxeps.screen import mark_pareto, screen_model

_COLUMNS = [
    "model", "sha256", "epsilon", "reason", "weights", "batch_size", "input", "output",
    "preset", "provider", "warnings", "seconds", "params", "macs",
    "peak_activation_bytes", "file_bytes", "latency_ms_batch1", "latency_ms_batch",
    "pareto",
]  # fmt: skip
_OPSET = [helper.make_opsetid("", 17)]


def _initializer(name: str, shape: tuple[int, ...], seed: int = 0):
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(values, name)


def grouped_conv_matmul_model() -> onnx.ModelProto:
    """x (N, 4, 8, 8) -> Conv 4->8, 3x3, group 2, pad 1 -> Relu -> Flatten -> MatMul to 10."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "grouped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [_initializer("w", (8, 2, 3, 3)), _initializer("b", (8,), 1), _initializer("m", (512, 10), 2)],
    )
    model = helper.make_model(graph, opset_imports=_OPSET)
    onnx.checker.check_model(model, full_check=True)
    return model


def residual_chain_model() -> onnx.ModelProto:
    """x (N, 8) -> MatMul to 16 -> Relu -> MatMul to 8 -> Add x."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["z"]),
        helper.make_node("Add", ["z", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [_initializer("w1", (8, 16)), _initializer("w2", (16, 8), 1)],
    )
    model = helper.make_model(graph, opset_imports=_OPSET)
    onnx.checker.check_model(model, full_check=True)
    return model


def training_bn_model(outputs: list[str]) -> onnx.ModelProto:
    """x (N, 3, 4, 4) -> 1x1 Conv to 4 channels -> BatchNormalization(training_mode=1)."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "shift", "mean", "var"], outputs,
            training_mode=1,
        ),  # fmt: skip
    ]
    constants = [
        numpy_helper.from_array(np.ones(4, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(4, np.float32), "shift"),
        numpy_helper.from_array(np.zeros(4, np.float32), "mean"),
        numpy_helper.from_array(np.ones(4, np.float32), "var"),
    ]
    graph = helper.make_graph(
        nodes,
        "bn_training",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
        [_initializer("w", (4, 3, 1, 1)), *constants],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, folder, name: str) -> str:
    path = folder / name
    onnx.save_model(model, path)
    return str(path)


def invoke(*args: str):
    return CliRunner().invoke(main, ["screen", *args])


@pytest.fixture(scope="module")
def chain_path(tmp_path_factory) -> str:
    return save(residual_chain_model(), tmp_path_factory.mktemp("screen"), "chain.onnx")


# ----- columns and latency -----


def test_screen_json_columns_in_order(chain_path):
    result = invoke(chain_path, "--batch-size", "8", "--latency-runs", "2", "--format", "json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert list(record) == _COLUMNS


def test_screen_csv_columns_in_order(chain_path):
    result = invoke(chain_path, "--batch-size", "8", "--latency-runs", "1", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == _COLUMNS
    assert len(rows) == 2


def test_screen_latency_positive(chain_path):
    result = invoke(chain_path, "--batch-size", "8", "--latency-runs", "3", "--format", "json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert isinstance(record["latency_ms_batch1"], float)
    assert isinstance(record["latency_ms_batch"], float)
    assert record["latency_ms_batch1"] > 0
    assert record["latency_ms_batch"] > 0


def test_screen_latency_runs_zero_skips(chain_path):
    record = screen_model(chain_path, batch_size=8, latency_runs=0)
    assert record["latency_ms_batch1"] is None
    assert record["latency_ms_batch"] is None
    assert record["warnings"] == []


def test_screen_table_states_macs_convention(chain_path):
    result = invoke(chain_path, "--batch-size", "8", "--latency-runs", "1")
    assert result.exit_code == 0, result.output
    assert "multiply-accumulates per sample" in result.stdout
    assert "pareto: max epsilon, min macs" in result.stdout


# ----- MACs against hand counts -----


def conv_macs(out_h: int, out_w: int, c_out: int, c_in_per_group: int, kernel: int) -> int:
    """MACs of one convolution: each output element sums c_in/group * k * k products."""
    return out_h * out_w * c_out * c_in_per_group * kernel * kernel


# The NB201 network at one 32x32 image, counted convolution by convolution.
_STEM = conv_macs(32, 32, 16, 3, 3)
# Cell convolutions keep C channels at H x W: 16 at 32x32, 32 at 16x16, 64 at 8x8.
_CELL_3X3 = [conv_macs(32, 32, 16, 16, 3), conv_macs(16, 16, 32, 32, 3), conv_macs(8, 8, 64, 64, 3)]
_CELL_1X1 = [conv_macs(32, 32, 16, 16, 1), conv_macs(16, 16, 32, 32, 1), conv_macs(8, 8, 64, 64, 1)]
# Reduction blocks: 3x3 stride-2 conv_a, 3x3 conv_b, 1x1 shortcut after a 2x2 pool.
_REDUCTIONS = (
    conv_macs(16, 16, 32, 16, 3) + conv_macs(16, 16, 32, 32, 3) + conv_macs(16, 16, 32, 16, 1)
    + conv_macs(8, 8, 64, 32, 3) + conv_macs(8, 8, 64, 64, 3) + conv_macs(8, 8, 64, 32, 1)
)  # fmt: skip
_CLASSIFIER = 64 * 10
_CELLS_PER_STAGE = 5


def nb201_hand_count(conv3x3_per_cell: int, conv1x1_per_cell: int) -> int:
    cells = sum(
        _CELLS_PER_STAGE * (conv3x3_per_cell * conv3x3 + conv1x1_per_cell * conv1x1)
        for conv3x3, conv1x1 in zip(_CELL_3X3, _CELL_1X1)
    )
    return _STEM + _REDUCTIONS + _CLASSIFIER + cells


def test_nb201_hand_count_arithmetic():
    assert _STEM == 442_368
    assert _CELL_3X3 == [2_359_296] * 3
    assert _CELL_1X1 == [262_144] * 3
    assert _REDUCTIONS == 7_340_032
    assert nb201_hand_count(0, 0) == 7_783_040


@pytest.mark.parametrize(
    ("arch", "conv3x3", "conv1x1"),
    [
        ("|nor_conv_1x1~0|+|nor_conv_1x1~0|nor_conv_1x1~1|+|nor_conv_1x1~0|nor_conv_1x1~1|nor_conv_1x1~2|", 0, 6),
        ("|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|", 2, 1),
        ("|avg_pool_3x3~0|+|skip_connect~0|none~1|+|nor_conv_1x1~0|skip_connect~1|avg_pool_3x3~2|", 0, 1),
    ],
)
def test_screen_macs_nb201(arch, conv3x3, conv1x1):
    record = screen_model(nb201.build(arch, num_classes=10), batch_size=8, latency_runs=0)
    assert record["macs"] == nb201_hand_count(conv3x3, conv1x1)


def test_screen_macs_grouped_conv_matmul():
    record = screen_model(grouped_conv_matmul_model(), batch_size=8, latency_runs=0)
    # Conv: output 8x8 with 8 channels; each element sums 4/2 input channels x 3x3.
    conv = 8 * 8 * 8 * (4 // 2) * 3 * 3
    # MatMul: (1, 512) @ (512, 10) gives 10 elements of 512 products each.
    matmul = 10 * 512
    assert conv == 9_216
    assert record["macs"] == conv + matmul


def test_screen_macs_per_sample_whatever_batch():
    small = screen_model(grouped_conv_matmul_model(), batch_size=4, latency_runs=0)
    large = screen_model(grouped_conv_matmul_model(), batch_size=16, latency_runs=0)
    assert small["macs"] == large["macs"]


def test_screen_macs_fixed_batch_axis():
    model = grouped_conv_matmul_model()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    record = screen_model(model, batch_size=8, latency_runs=0)
    assert record["batch_size"] == 4
    assert record["macs"] == 8 * 8 * 8 * (4 // 2) * 3 * 3 + 10 * 512
    assert any("MACs are counted with it set to 1" in w for w in record["warnings"])


# ----- peak activation memory -----


# The chain at 2 samples of float32: x and z are 2*8*4 = 64 bytes, h and r 2*16*4 = 128.
# x stays live until the Add, so the peak is while Relu runs: x + h + r = 320 bytes.
_CHAIN_PEAK = 2 * 8 * 4 + 2 * 16 * 4 + 2 * 16 * 4


def test_peak_activation_chain():
    peak = peak_activation_bytes(residual_chain_model(), {"x": (2, 8)})
    assert _CHAIN_PEAK == 320
    assert peak.bytes == _CHAIN_PEAK
    assert peak.unknown == []


def test_peak_activation_scales_with_batch():
    peak = peak_activation_bytes(residual_chain_model(), {"x": (6, 8)})
    assert peak.bytes == 3 * _CHAIN_PEAK


def test_peak_activation_ignores_constants():
    # A Constant node's output is a weight, not an activation.
    model = residual_chain_model()
    constant = helper.make_node(
        "Constant", [], ["k"], value=numpy_helper.from_array(np.ones((1000,), np.float32))
    )
    model.graph.node.insert(0, constant)
    model.graph.node.append(helper.make_node("Identity", ["k"], ["k_out"]))
    model.graph.output.append(helper.make_tensor_value_info("k_out", TensorProto.FLOAT, [1000]))
    peak = peak_activation_bytes(model, {"x": (2, 8)})
    # k_out is an activation (Identity output, 4000 bytes), live at the end beside y.
    assert peak.bytes == max(_CHAIN_PEAK, 2 * 8 * 4 + 4000)


def test_screen_peak_at_scoring_batch(chain_path):
    record = screen_model(chain_path, batch_size=2, latency_runs=0)
    assert record["peak_activation_bytes"] == _CHAIN_PEAK


# ----- file size -----


def test_screen_file_bytes(chain_path):
    from pathlib import Path

    record = screen_model(chain_path, batch_size=4, latency_runs=0)
    assert record["file_bytes"] == Path(chain_path).stat().st_size


def test_screen_file_bytes_external_data(tmp_path):
    path = tmp_path / "external.onnx"
    onnx.save_model(
        residual_chain_model(), path, save_as_external_data=True,
        all_tensors_to_one_file=True, location="external.data", size_threshold=0,
    )  # fmt: skip
    record = screen_model(str(path), batch_size=4, latency_runs=1)
    expected = path.stat().st_size + (tmp_path / "external.data").stat().st_size
    assert (tmp_path / "external.data").stat().st_size == (8 * 16 + 16 * 8) * 4
    assert record["file_bytes"] == expected
    assert record["latency_ms_batch1"] > 0


# ----- Pareto front -----


def test_pareto_hand_built_records():
    records = [
        {"model": "a", "epsilon": 0.5, "macs": 100},
        {"model": "b", "epsilon": 0.4, "macs": 200},  # a is cheaper and better
        {"model": "c", "epsilon": 0.6, "macs": 300},
        {"model": "d", "epsilon": None, "macs": 10},  # undefined epsilon
        {"model": "e", "epsilon": 0.6, "macs": 300},  # ties with c
        {"model": "f", "epsilon": 0.5, "macs": 150},  # a is as good and cheaper
        {"model": "g", "epsilon": 0.9, "macs": None},  # no cost
        {"model": "h", "epsilon": 0.2, "macs": 50},  # the cheapest defined
    ]
    mark_pareto(records, "macs")
    front = {r["model"] for r in records if r["pareto"]}
    assert front == {"a", "c", "e", "h"}


def test_pareto_undefined_never_on_front():
    assert pareto_flags([(None, 1.0)]) == [False]
    assert pareto_flags([(float("nan"), 1.0), (0.1, 5.0)]) == [False, True]


def test_pareto_same_cost_keeps_best_only():
    assert pareto_flags([(0.3, 10), (0.5, 10), (0.5, 10)]) == [False, True, True]


def test_pareto_unknown_cost_column():
    with pytest.raises(ValueError, match="unknown cost column 'flops'"):
        mark_pareto([{"epsilon": 0.1, "flops": 1}], "flops")


def test_screen_cost_column_choice(chain_path):
    result = invoke(chain_path, "--cost-column", "flops")
    assert result.exit_code == 2


def test_screen_pareto_by_params(tmp_path, chain_path):
    grouped = save(grouped_conv_matmul_model(), tmp_path, "grouped.onnx")
    result = invoke(
        chain_path, grouped, "--batch-size", "8", "--latency-runs", "0",
        "--cost-column", "params", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["params"] for r in records] == [8 * 16 + 16 * 8, 8 * 2 * 9 + 8 + 512 * 10]
    assert isinstance(records[0]["pareto"], bool)
    assert isinstance(records[1]["pareto"], bool)


def test_screen_coverage_line_not_warning(tmp_path, chain_path):
    grouped = save(grouped_conv_matmul_model(), tmp_path, "grouped.onnx")
    args = [chain_path, grouped, "--batch-size", "8", "--latency-runs", "0"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "coverage: 2/2 models have a defined epsilon" in result.stderr
    assert "warning: coverage" not in result.stderr
    assert "coverage" not in invoke(*args, "-q").stderr


# ----- failures and the plot -----


def test_screen_failed_model_reported(tmp_path, chain_path):
    missing = str(tmp_path / "missing.onnx")
    result = invoke(chain_path, missing, "--batch-size", "8", "--latency-runs", "0", "--format", "json")
    assert result.exit_code == 1
    assert len(result.stdout.splitlines()) == 1
    assert "missing.onnx: file not found" in result.stderr


def test_screen_plot_png(tmp_path, chain_path):
    grouped = save(grouped_conv_matmul_model(), tmp_path, "grouped.onnx")
    plot = tmp_path / "front.png"
    result = invoke(
        chain_path, grouped, "--batch-size", "8", "--latency-runs", "0",
        "--plot", str(plot), "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- the training-mode BatchNormalization crasher -----


def test_crasher_found_for_empty_outputs():
    assert len(find_runtime_crashers(training_bn_model(["y", "", ""]))) == 1
    assert len(find_runtime_crashers(training_bn_model(["y", "", "var_out"]))) == 1


def test_crasher_not_found_for_named_outputs():
    assert find_runtime_crashers(training_bn_model(["y", "mean_out", "var_out"])) == []


def test_screen_refuses_training_bn_crasher(tmp_path):
    path = save(training_bn_model(["y", "", ""]), tmp_path, "bn_training.onnx")
    # A separate process, so that a regression crashes that process, not the test run.
    command = [
        sys.executable, "-c", "from onnxeps.cli import main; main()", "screen", path,
        "--batch-size", "8", "--latency-runs", "2", "--format", "json",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    assert record["latency_ms_batch1"] is None
    assert record["latency_ms_batch"] is None
    assert record["params"] == 4 * 3 + 4 + 4
    assert record["macs"] == 4 * 4 * 4 * 3
    assert any("training_mode=1" in warning for warning in record["warnings"])
    warning_lines = [line for line in completed.stderr.splitlines() if "training_mode=1" in line]
    assert len(warning_lines) == 1
