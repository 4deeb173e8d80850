"""Robustness of scoring on generated models with unusual structure and on hostile input.

The models cover external data, a weight over 2 GiB, initializers listed as graph
inputs, weights in Constant nodes, a tensor read in two roles, and weights inside If,
Loop and Scan bodies. Others have inputs of mixed types, symbolic axes, no parameters,
training-mode BatchNormalization with empty optional outputs, or QDQ quantization by
onnxruntime.quantization. Where the score can be worked out by hand, numpy computes
the reference outputs and onnxeps.epsilon the expected value.

Command-line cases run as subprocesses, two at a time, started together when the first
test requests one. Each checks the rule that a file either scores (exit 0, one JSON
record) or fails with exactly one ``error:`` line, and that no input file changes.
Set ``ONNXEPS_BIG=1`` to also score the 2 GiB model, which needs about 5 GB of memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxeps
from onnxeps.errors import MemoryLimitError, ModelLoadError, PlanError
from onnxeps.load import load_model
from onnxeps.report import atomic_write
from onnxeps.roles import Action, Role

SCORE_KEYS = [
    "model", "sha256", "epsilon", "reason", "weights", "batch_size", "input", "output",
    "preset", "provider", "warnings", "seconds",
]  # fmt: skip
WEIGHTS = (1e-7, 1.0)
BATCH = 8
# Scores of two exactly equivalent graphs agree within this relative tolerance.
EXACT_RTOL = 1e-5
# A float64 numpy reference and the float32 runtime agree within this tolerance.
REFERENCE_RTOL = 1e-4
CLI_WORKERS = 2
CLI_TIMEOUT_SECONDS = 180
# A float32 weight of this shape is 2 GiB + 64 KiB, over the protobuf limit, while the
# MatMul that reads it keeps small inputs and outputs.
BIG_SHAPE = (2**14, 2**15 + 1)
BIG_BYTES = 4 * BIG_SHAPE[0] * BIG_SHAPE[1]
# An address-space limit that the big model's weight alone exceeds.
MEMORY_LIMIT_KIB = 3 * 1024 * 1024

vi = helper.make_tensor_value_info
rng = np.random.default_rng(7)


def floats(values, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def int64s(values, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def sha256_of(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def grey(shape: tuple[int, ...], batch_axis: int = 0) -> np.ndarray:
    """Return the grey synthetic input: sample i is the constant i/B."""
    size = shape[batch_axis]
    view = [1] * len(shape)
    view[batch_axis] = size
    return np.broadcast_to((np.arange(size) / size).reshape(view), shape).astype(np.float64)


def reference_epsilon(forward: Callable[[float], np.ndarray]) -> float:
    """Return epsilon of the outputs ``forward`` computes for the two weights."""
    return onnxeps.epsilon(forward(WEIGHTS[0]), forward(WEIGHTS[1])).value


def assert_close(actual: float, expected: float, rtol: float) -> None:
    assert abs(actual - expected) <= rtol * abs(expected), f"{actual} != {expected}"


# Models


def conv_bn_model(training_mode: int | None = None, empty_outputs: bool = False):
    """Return Conv, BatchNormalization, Relu, global pooling and Flatten."""
    attributes = {} if training_mode is None else {"training_mode": training_mode}
    bn_outputs = ["bn", "", ""] if empty_outputs else ["bn"]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], bn_outputs, **attributes),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    initializers = [
        floats(rng.standard_normal((4, 3, 3, 3)), "W"),
        floats(np.ones(4), "s"), floats(np.zeros(4), "b"),
        floats(np.zeros(4), "m"), floats(np.ones(4), "v"),
    ]  # fmt: skip
    return make_model(
        nodes, [vi("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [vi("y", TensorProto.FLOAT, ["batch", 4])], initializers,
    )  # fmt: skip


def mlp_model(storage: str = "initializer") -> onnx.ModelProto:
    """Return MatMul, Tanh, MatMul with weights stored as ``storage``.

    ``storage`` is "initializer", "Constant" (Constant nodes) or "graph input"
    (initializers also listed as graph inputs).
    """
    weights = [floats(rng.standard_normal((4, 5)), "W1"), floats(rng.standard_normal((5, 3)), "W2")]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "W2"], ["y"]),
    ]
    inputs = [vi("x", TensorProto.FLOAT, ["batch", 4])]
    initializers = weights
    if storage == "Constant":
        constants = [helper.make_node("Constant", [], [w.name], value=w) for w in weights]
        nodes = constants + nodes
        initializers = []
    elif storage == "graph input":
        inputs += [vi(w.name, TensorProto.FLOAT, list(w.dims)) for w in weights]
    return make_model(nodes, inputs, [vi("y", TensorProto.FLOAT, ["batch", 3])], initializers)


def matmul_tanh_body(state: str, weight: str, out: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("MatMul", [state, weight], [f"{out}_linear"]),
        helper.make_node("Tanh", [f"{out}_linear"], [out]),
    ]


def if_model() -> onnx.ModelProto:
    """Return an If whose then branch (taken: the synthetic bool is true) is tanh(x W)."""
    then_branch = helper.make_graph(
        matmul_tanh_body("x", "Wt", "yt"), "then", [],
        [vi("yt", TensorProto.FLOAT, ["batch", 3])], [floats(rng.standard_normal((4, 3)), "Wt")],
    )  # fmt: skip
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "We"], ["ye"])], "else", [],
        [vi("ye", TensorProto.FLOAT, ["batch", 3])], [floats(rng.standard_normal((4, 3)), "We")],
    )  # fmt: skip
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)
    inputs = [vi("x", TensorProto.FLOAT, ["batch", 4]), vi("c", TensorProto.BOOL, [])]
    return make_model([node], inputs, [vi("y", TensorProto.FLOAT, ["batch", 3])])


LOOP_STEPS = 3


def loop_model(trip_count: int = LOOP_STEPS) -> onnx.ModelProto:
    """Return a Loop that applies h = tanh(h Wb) ``trip_count`` times."""
    body = helper.make_graph(
        [*matmul_tanh_body("h_in", "Wb", "h_out"), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [vi("i", TensorProto.INT64, []), vi("c_in", TensorProto.BOOL, []),
         vi("h_in", TensorProto.FLOAT, ["batch", 4])],
        [vi("c_out", TensorProto.BOOL, []), vi("h_out", TensorProto.FLOAT, ["batch", 4])],
        [floats(rng.standard_normal((4, 4)), "Wb")],
    )  # fmt: skip
    node = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)
    initializers = [int64s(trip_count, "trip"), numpy_helper.from_array(np.array(True), "cond")]
    return make_model(
        [node], [vi("x", TensorProto.FLOAT, ["batch", 4])],
        [vi("y", TensorProto.FLOAT, ["batch", 4])], initializers,
    )  # fmt: skip


def scan_model() -> onnx.ModelProto:
    """Return a Scan over steps: s = tanh((s + x_t) Ws), emitting s at every step."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["a"]),
         *matmul_tanh_body("a", "Ws", "s_out"),
         helper.make_node("Identity", ["s_out"], ["o"])],
        "body",
        [vi("s_in", TensorProto.FLOAT, ["batch", 4]), vi("x_t", TensorProto.FLOAT, ["batch", 4])],
        [vi("s_out", TensorProto.FLOAT, ["batch", 4]), vi("o", TensorProto.FLOAT, ["batch", 4])],
        [floats(rng.standard_normal((4, 4)), "Ws")],
    )  # fmt: skip
    node = helper.make_node("Scan", ["s0", "x"], ["s_last", "y"], body=body, num_scan_inputs=1)
    inputs = [vi("s0", TensorProto.FLOAT, ["batch", 4]), vi("x", TensorProto.FLOAT, ["steps", "batch", 4])]
    return make_model([node], inputs, [vi("y", TensorProto.FLOAT, ["steps", "batch", 4])])


def mixed_inputs_model() -> onnx.ModelProto:
    """Return a model of a float image, int64 token ids (an embedding) and a bool mask."""
    nodes = [
        helper.make_node("Conv", ["image", "Wc"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["image_features"]),
        helper.make_node("Gather", ["E", "ids"], ["e"]),
        helper.make_node("Cast", ["mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "last"], ["mask_3d"]),
        helper.make_node("Mul", ["e", "mask_3d"], ["masked"]),
        helper.make_node("ReduceMean", ["masked"], ["text_features"], axes=[1], keepdims=0),
        helper.make_node("Concat", ["image_features", "text_features"], ["z"], axis=1),
        helper.make_node("Gemm", ["z", "Wg"], ["y"], transB=1),
    ]
    initializers = [
        floats(rng.standard_normal((4, 3, 3, 3)), "Wc"), floats(rng.random((10, 5)), "E"),
        floats(rng.standard_normal((2, 9)), "Wg"), int64s([2], "last"),
    ]  # fmt: skip
    inputs = [
        vi("image", TensorProto.FLOAT, ["batch", 3, 8, 8]),
        vi("ids", TensorProto.INT64, ["batch", "tokens"]),
        vi("mask", TensorProto.BOOL, ["batch", "tokens"]),
    ]
    return make_model(nodes, inputs, [vi("y", TensorProto.FLOAT, ["batch", 2])], initializers)


def sum_pixels_model(shape) -> onnx.ModelProto:
    """Return tanh(sum of each sample's pixels per channel, times W), for any axes."""
    nodes = [
        helper.make_node("ReduceSum", ["x", "spatial"], ["s"], keepdims=0),
        *matmul_tanh_body("s", "W", "y"),
    ]
    initializers = [int64s([2, 3], "spatial"), floats(rng.standard_normal((3, 2)), "W")]
    return make_model(
        nodes, [vi("x", TensorProto.FLOAT, shape)],
        [vi("y", TensorProto.FLOAT, [shape[0], 2])], initializers,
    )  # fmt: skip


def shared_two_roles_model(shared: bool) -> onnx.ModelProto:
    """Return Conv and BatchNormalization where one tensor is both the Conv bias and
    the BatchNormalization scale (``shared``), or two equal tensors."""
    values = rng.uniform(0.5, 1.5, 4)
    bias, scale = ("T", "T") if shared else ("T_bias", "T_scale")
    nodes = [
        helper.make_node("Conv", ["x", "W", bias], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", scale, "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    tensors = {bias: values, scale: values}
    initializers = [floats(v, name) for name, v in tensors.items()] + [
        floats(np.linspace(-1, 1, 108).reshape(4, 3, 3, 3), "W"),
        floats(np.zeros(4), "b"), floats(np.zeros(4), "m"), floats(np.ones(4), "v"),
    ]  # fmt: skip
    return make_model(
        nodes, [vi("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [vi("y", TensorProto.FLOAT, ["batch", 4])], initializers,
    )  # fmt: skip


def relu_only_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [vi("x", TensorProto.FLOAT, ["batch", 4])], [vi("y", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip


def save_external(model: onnx.ModelProto, path: Path, location: str) -> Path:
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=location, size_threshold=0,
    )  # fmt: skip
    return path


def big_model(folder: Path) -> Path:
    """Save a MatMul whose weight of 2 GiB + 64 KiB sits in a sparse external file.

    The file has its full size but no data blocks, so the model takes neither disk
    space nor memory until something reads and materialises the weight.
    """
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(BIG_SHAPE))
    weight.data_location = TensorProto.EXTERNAL
    length = BIG_BYTES
    for key, value in (("location", "big.data"), ("offset", "0"), ("length", str(length))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
        [vi("x", TensorProto.FLOAT, ["batch", BIG_SHAPE[0]])],
        [vi("y", TensorProto.FLOAT, ["batch", BIG_SHAPE[1]])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    onnx.save_model(model, str(path))
    with open(folder / "big.data", "wb") as stream:
        stream.truncate(length)
    return path


def qdq_cnn(folder: Path) -> Path:
    """Quantize a small float CNN with onnxruntime.quantization.quantize_static (QDQ)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            batches = [{"x": rng.random((1, 3, 6, 6), dtype=np.float32)} for _ in range(4)]
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    float_path = folder / "float_cnn.onnx"
    onnx.save_model(conv_bn_model(), str(float_path))
    quantized = folder / "qdq_cnn.onnx"
    quantize_static(
        str(float_path), str(quantized), Calibration(), quant_format=QuantFormat.QDQ,
        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
    )  # fmt: skip
    return quantized


# Command-line cases


def onnxeps_command() -> list[str]:
    script = Path(sys.executable).with_name("onnxeps")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from onnxeps.cli import main; main()"]


@dataclass
class CliCase:
    """An onnxeps command line and the input files it must leave unchanged."""

    args: list[str]
    inputs: list[Path]
    memory_limit_kib: int | None = None
    outputs: list[Path] = field(default_factory=list)


@dataclass
class CliRun:
    case: CliCase
    returncode: int | None
    stdout: str
    stderr: str
    sha256_before: str
    sha256_after: str
    seconds: float = 0.0


def run_case(case: CliCase, cwd: Path) -> CliRun:
    command = [*onnxeps_command(), *case.args]
    if case.memory_limit_kib is not None:
        command = ["/bin/sh", "-c", f'ulimit -v {case.memory_limit_kib} && exec "$0" "$@"', *command]
    files = [path for path in case.inputs if path.is_file()]
    before = sha256_of(*files)
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True,
            timeout=CLI_TIMEOUT_SECONDS, check=False,
        )  # fmt: skip
        run = CliRun(case, done.returncode, done.stdout, done.stderr, before, "")
    except subprocess.TimeoutExpired:
        run = CliRun(case, None, "", f"no exit after {CLI_TIMEOUT_SECONDS} s", before, "")
    run.seconds = time.monotonic() - started
    run.sha256_after = sha256_of(*files)
    return run


def _score(model: Path, *options: str) -> list[str]:
    return ["score", str(model), "--batch-size", str(BATCH), "--format", "json", *options]


def _case_empty_file(folder: Path) -> CliCase:
    path = folder / "empty.onnx"
    path.write_bytes(b"")
    return CliCase(_score(path), [path])


def _case_truncated(folder: Path) -> CliCase:
    path = folder / "truncated.onnx"
    path.write_bytes(conv_bn_model().SerializeToString()[:300])
    return CliCase(_score(path), [path])


def _case_random_bytes(folder: Path) -> CliCase:
    path = folder / "random.onnx"
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    return CliCase(_score(path), [path])


def _case_directory(folder: Path) -> CliCase:
    path = folder / "model.onnx"
    path.mkdir()
    return CliCase(_score(path), [])


def _case_pickled_npy(folder: Path) -> CliCase:
    model = folder / "model.onnx"
    onnx.save_model(mlp_model(), str(model))
    batch = folder / "batch.npy"
    np.save(batch, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return CliCase(_score(model, "--input", str(batch)), [model, batch])


def _case_missing_external_data(folder: Path) -> CliCase:
    (folder / "full").mkdir()
    saved = save_external(conv_bn_model(), folder / "full" / "model.onnx", "model.data")
    alone = folder / "model.onnx"
    alone.write_bytes(saved.read_bytes())
    return CliCase(_score(alone), [alone])


def _case_huge_batch(folder: Path) -> CliCase:
    """A batch of 10**9 images; the address-space limit keeps the attempt cheap."""
    model = folder / "model.onnx"
    onnx.save_model(conv_bn_model(), str(model))
    args = ["score", str(model), "--batch-size", str(10**9), "--format", "json"]
    return CliCase(args, [model], MEMORY_LIMIT_KIB)


def _case_timeout(folder: Path) -> CliCase:
    model = folder / "loop.onnx"
    onnx.save_model(loop_model(trip_count=10**9), str(model))
    return CliCase(_score(model, "--timeout", "2"), [model])


def _case_runtime_failure(folder: Path) -> CliCase:
    """MatMul of a (batch, K) input by a (4, 3) weight: K takes --seq-len 70."""
    model = folder / "mismatch.onnx"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    saved = make_model(
        nodes, [vi("x", TensorProto.FLOAT, ["batch", "K"])],
        [vi("y", TensorProto.FLOAT, ["batch", 3])], [floats(np.ones((4, 3)), "W")],
    )  # fmt: skip
    onnx.save_model(saved, str(model))
    return CliCase(_score(model), [model])


def _case_non_utf8_op_type(folder: Path) -> CliCase:
    data = mlp_model().SerializeToString()
    assert data.count(b"Tanh") == 1
    model = folder / "op_type.onnx"
    model.write_bytes(data.replace(b"Tanh", b"Ta\xffh"))
    return CliCase(_score(model), [model])


def _case_untyped_value_info(folder: Path) -> CliCase:
    """An If model with a value_info entry of element type UNDEFINED."""
    saved = if_model()
    saved.graph.value_info.append(vi("y", TensorProto.UNDEFINED, None))
    model = folder / "if_value_info.onnx"
    onnx.save_model(saved, str(model))
    return CliCase(_score(model), [model])


def _case_untyped_input(folder: Path) -> CliCase:
    saved = mlp_model()
    saved.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    model = folder / "untyped_input.onnx"
    onnx.save_model(saved, str(model))
    return CliCase(_score(model), [model])


def _node_without_outputs(folder: Path) -> Path:
    saved = mlp_model()
    saved.graph.node.append(helper.make_node("Relu", ["x"], []))
    model = folder / "no_outputs.onnx"
    onnx.save_model(saved, str(model))
    return model


def _case_score_node_without_outputs(folder: Path) -> CliCase:
    model = _node_without_outputs(folder)
    return CliCase(_score(model), [model])


def _case_plan_non_utf8_initializer(folder: Path) -> CliCase:
    data = mlp_model().SerializeToString()
    model = folder / "initializer_name.onnx"
    model.write_bytes(data.replace(b"W1", b"\xff1"))
    return CliCase(["plan", str(model), "--format", "json"], [model])


def _case_external_data(folder: Path) -> CliCase:
    model = save_external(mlp_model(), folder / "model.onnx", "weights.bin")
    return CliCase(_score(model), [model, folder / "weights.bin"])


def _case_zero_parameters(folder: Path) -> CliCase:
    model = folder / "relu.onnx"
    onnx.save_model(relu_only_model(), str(model))
    return CliCase(_score(model), [model])


def _case_batchnorm_training(folder: Path) -> CliCase:
    model = folder / "bn_training.onnx"
    onnx.save_model(conv_bn_model(training_mode=1, empty_outputs=True), str(model))
    return CliCase(_score(model), [model])


def _case_qdq_cnn(folder: Path) -> CliCase:
    model = qdq_cnn(folder)
    return CliCase(_score(model), [model])


def _case_output_file(folder: Path) -> CliCase:
    model = folder / "model.onnx"
    onnx.save_model(mlp_model(), str(model))
    output = folder / "records.json"
    output.write_text("old content\n")
    args = ["score", str(model), "--batch-size", str(BATCH), "-o", str(output)]
    return CliCase(args, [model], outputs=[output])


def _case_big_memory_limit(folder: Path) -> CliCase:
    model = big_model(folder)
    args = ["score", str(model), "--batch-size", "2", "--format", "json"]
    return CliCase(args, [model], MEMORY_LIMIT_KIB)


def _case_memory_limit_option(folder: Path) -> CliCase:
    model = folder / "model.onnx"
    onnx.save_model(mlp_model(), str(model))
    return CliCase(_score(model, "--memory-limit", "100B"), [model])


def _case_big_model(folder: Path) -> CliCase:
    """Score without the channel collapse, which doubles the peak memory here: 4.3 GB
    resident without it and 8.5 GB with it, measured with onnxruntime 1.32 on CPU."""
    model = big_model(folder)
    args = ["score", str(model), "--batch-size", "2", "--format", "json", "--no-collapse"]
    return CliCase(args, [model])


CASES: dict[str, Callable[[Path], CliCase]] = {
    "empty-file": _case_empty_file,
    "truncated": _case_truncated,
    "random-bytes": _case_random_bytes,
    "directory": _case_directory,
    "pickled-npy": _case_pickled_npy,
    "missing-external-data": _case_missing_external_data,
    "huge-batch": _case_huge_batch,
    "timeout": _case_timeout,
    "runtime-failure": _case_runtime_failure,
    "non-utf8-op-type": _case_non_utf8_op_type,
    "untyped-value-info": _case_untyped_value_info,
    "untyped-input": _case_untyped_input,
    "node-without-outputs": _case_score_node_without_outputs,
    "plan-non-utf8-initializer": _case_plan_non_utf8_initializer,
    "external-data": _case_external_data,
    "zero-parameters": _case_zero_parameters,
    "batchnorm-training": _case_batchnorm_training,
    "qdq-cnn": _case_qdq_cnn,
    "output-file": _case_output_file,
    "big-memory-limit": _case_big_memory_limit,
    "memory-limit-option": _case_memory_limit_option,
    "big-model": _case_big_model,
}

HOSTILE = [
    "empty-file",
    "truncated",
    "random-bytes",
    "pickled-npy",
    "missing-external-data",
    "huge-batch",
    "timeout",
    "runtime-failure",
    "non-utf8-op-type",
    "untyped-value-info",
    "untyped-input",
    "node-without-outputs",
]
# The cases each non-parametrized test reads, so that a selection (-k) runs only those.
CASES_OF_TEST = {
    "test_plan_command_no_traceback": ["plan-non-utf8-initializer"],
    "test_timeout_stops_endless_loop": ["timeout"],
    "test_directory_without_models_usage_error": ["directory"],
    "test_external_data_cli_one_record": ["external-data"],
    "test_zero_parameter_graph_one_error_line": ["zero-parameters"],
    "test_batchnorm_training_empty_outputs_scores": ["batchnorm-training"],
    "test_qdq_cnn_rejected_as_quantized": ["qdq-cnn"],
    "test_output_file_replaced_atomically": ["output-file"],
    "test_big_model_address_space_limit_one_line": ["big-memory-limit"],
    "test_memory_limit_option_one_line": ["memory-limit-option"],
    "test_big_model_scores": ["big-model"],
}


def _selected_cases(request) -> list[str]:
    names: list[str] = []
    for item in request.session.items:
        if item.module is not request.module:
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "case" in callspec.params:
            names.append(callspec.params["case"])
        names += CASES_OF_TEST.get(item.originalname, [])
    if os.environ.get("ONNXEPS_BIG") != "1" and "big-model" in names:
        names.remove("big-model")
    return list(dict.fromkeys(names))


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory):
    """Build the files of every selected case, start its run and map its name to the future."""
    pool = ThreadPoolExecutor(max_workers=CLI_WORKERS)
    futures: dict[str, Future] = {}
    for name in _selected_cases(request):
        folder = tmp_path_factory.mktemp(name)
        # The working directory is not the model's folder, as for most users.
        futures[name] = pool.submit(run_case, CASES[name](folder), folder.parent)
    yield futures
    pool.shutdown(wait=True)


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_error_line(run: CliRun) -> str:
    """Check the failure contract and return the error line."""
    errors = nonempty_lines(run.stderr)
    assert run.returncode == 1, f"exit code {run.returncode}: {run.stderr[-2000:]}"
    assert run.stdout == "", f"stdout on failure: {run.stdout[:2000]}"
    assert len(errors) == 1, f"stderr is not one line: {run.stderr[:2000]}"
    assert errors[0].startswith("error:"), errors[0]
    assert "internal error" not in errors[0], errors[0]
    # run_passes words an unexpected exception inside a pass as "rewrite pass X failed".
    assert "rewrite pass" not in errors[0], errors[0]
    assert "Traceback" not in run.stderr
    assert run.sha256_after == run.sha256_before, "an input file changed"
    return errors[0]


def assert_one_record(run: CliRun) -> dict:
    """Check the success contract and return the record."""
    records = nonempty_lines(run.stdout)
    assert run.returncode == 0, f"exit code {run.returncode}: {run.stderr[-2000:]}"
    assert len(records) == 1, f"stdout is not one JSON line: {run.stdout[:2000]}"
    assert "Traceback" not in run.stderr
    assert run.sha256_after == run.sha256_before, "an input file changed"
    record = json.loads(records[0])
    assert list(record) == SCORE_KEYS
    return record


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_scores_or_one_error_line(case, cli_runs):
    run = cli_runs[case].result()
    if run.returncode == 0:
        assert_one_record(run)
    else:
        assert_one_error_line(run)


def test_timeout_stops_endless_loop(cli_runs):
    """A Loop of 10**9 steps stops at --timeout 2 with a timed-out error."""
    run = cli_runs["timeout"].result()
    assert run.returncode == 1
    assert "timed out after 2 s" in run.stderr
    assert run.seconds < 60


@pytest.mark.parametrize("case", ["empty-file", "truncated", "random-bytes"])
def test_hostile_file_rejected(case, cli_runs):
    assert cli_runs[case].result().returncode == 1


def test_directory_without_models_usage_error(cli_runs):
    """A folder names the models below it, so one without .onnx files is a usage error."""
    run = cli_runs["directory"].result()
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert "no .onnx file in this folder or below" in run.stderr
    assert "Traceback" not in run.stderr


def test_plan_command_no_traceback(cli_runs):
    run = cli_runs["plan-non-utf8-initializer"].result()
    assert "Traceback" not in run.stderr
    assert_one_error_line(run)


# External data and models over 2 GB


def test_external_data_score_matches_inline(tmp_path):
    model = mlp_model()
    inline = onnxeps.score(model, batch_size=BATCH)
    path = save_external(model, tmp_path / "model.onnx", "model.data")
    external = onnxeps.score(path, batch_size=BATCH)
    assert external.epsilon is not None
    assert external.epsilon == inline.epsilon


def test_external_data_sha256_covers_data_file(tmp_path):
    path = save_external(mlp_model(), tmp_path / "model.onnx", "model.data")
    result = onnxeps.score(path, batch_size=BATCH)
    assert result.sha256 == sha256_of(path, tmp_path / "model.data")


def test_external_data_kept_tensors_other_folder(tmp_path):
    """Score from a working directory other than the model's folder (pytest's)."""
    assert Path.cwd() != tmp_path
    path = save_external(conv_bn_model(), tmp_path / "model.onnx", "model.data")
    result = onnxeps.score(path, batch_size=BATCH)
    assert result.epsilon is not None


def test_external_data_outside_folder_rejected(tmp_path):
    (tmp_path / "model").mkdir()
    saved = save_external(conv_bn_model(), tmp_path / "model.onnx", "model.data")
    model = onnx.load(str(saved), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../model.data"
    onnx.save_model(model, str(tmp_path / "model" / "escape.onnx"))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(tmp_path / "model" / "escape.onnx")


def test_external_data_cli_one_record(cli_runs):
    record = assert_one_record(cli_runs["external-data"].result())
    assert record["epsilon"] is not None


@pytest.fixture(scope="module")
def big_model_path(tmp_path_factory) -> Path:
    return big_model(tmp_path_factory.mktemp("big"))


def _sha256_of_big_model(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes())
    zeros = bytes(1 << 20)
    remaining = BIG_BYTES
    while remaining:
        chunk = min(remaining, len(zeros))
        digest.update(zeros[:chunk])
        remaining -= chunk
    return digest.hexdigest()


def test_big_model_loads_and_plans(big_model_path):
    """Load, hash and plan a model over 2 GiB without reading its weight into memory."""
    loaded = load_model(big_model_path)
    plan = onnxeps.plan(loaded.proto)
    (entry,) = plan.entries
    assert loaded.sha256 == _sha256_of_big_model(big_model_path)
    assert entry.shape == BIG_SHAPE
    assert entry.action is Action.WEIGHT


def test_big_model_stays_sparse(big_model_path):
    allocated = os.stat(big_model_path.with_name("big.data")).st_blocks * 512
    assert allocated < 1 << 20


def test_big_model_address_space_limit_one_line(cli_runs):
    """Under ulimit -v the default memory limit is the address space left."""
    line = assert_one_error_line(cli_runs["big-memory-limit"].result())
    assert "the memory limit is" in line
    assert "(the memory available now)" in line


# Prints the error and the peak resident memory in KiB of scoring the model at argv[1].
# VmHWM counts this process only: ru_maxrss also keeps the parent's peak from before
# exec, which is large late in a test session.
_SCORE_PEAK_RSS = """
import sys
import onnxeps
try:
    onnxeps.score(sys.argv[1], batch_size=2, memory_limit="1GB")
except onnxeps.OnnxepsError as error:
    print(error)
with open("/proc/self/status") as status:
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def test_big_model_memory_limit_before_reading(big_model_path):
    """The limit rejects the 2 GiB weight before it is read or allocated."""
    done = subprocess.run(
        [sys.executable, "-c", _SCORE_PEAK_RSS, str(big_model_path)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS, check=True,
    )  # fmt: skip
    message, peak_kib = done.stdout.splitlines()
    assert "the weights need about 8.6 GB of memory" in message
    assert "(2.1 GB of tensors, held about 4 times)" in message
    assert "the memory limit is 1.0 GB." in message
    assert int(peak_kib) < 512 * 1024, f"peak resident memory {peak_kib} KiB"


def test_memory_limit_option_one_line(cli_runs):
    line = assert_one_error_line(cli_runs["memory-limit-option"].result())
    assert "the memory limit is 100 bytes." in line


@pytest.mark.skipif(
    os.environ.get("ONNXEPS_BIG") != "1",
    reason="scoring a 2 GiB weight needs about 5 GB of memory; set ONNXEPS_BIG=1",
)
def test_big_model_scores(cli_runs):
    assert_one_record(cli_runs["big-model"].result())


def huge_weight_model(folder: Path) -> Path:
    """Save a MatMul whose weight is declared as 4 TiB, with 16 bytes of data."""
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1, 2**40])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.data"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "huge",
        [vi("x", TensorProto.FLOAT, ["batch", 1])], [vi("y", TensorProto.FLOAT, ["batch", 2**40])],
        [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(folder / "huge.onnx"))
    (folder / "w.data").write_bytes(bytes(16))
    return folder / "huge.onnx"


def test_weight_too_large_for_memory_limit(tmp_path):
    with pytest.raises(MemoryLimitError, match=r"\(4\.4 TB of tensors"):
        onnxeps.score(huge_weight_model(tmp_path), batch_size=2)


def test_weight_too_large_without_limit_reported(tmp_path):
    """Without a memory limit, the 4 TiB weight fails to allocate in the rewrite."""
    with pytest.raises(onnxeps.OnnxepsError, match="out of memory"):
        onnxeps.score(huge_weight_model(tmp_path), batch_size=2, memory_limit=None)


# Where the weights are stored


def test_initializer_graph_input_feed_ignored():
    model = mlp_model("graph input")
    batch = np.linspace(0, 1, BATCH * 4, dtype=np.float32).reshape(BATCH, 4)
    fed = onnxeps.score(model, {"x": batch, "W1": np.full((4, 5), 100, np.float32)})
    plain = onnxeps.score(model, {"x": batch})
    assert fed.epsilon == plain.epsilon


def test_initializer_graph_input_scores_as_initializer():
    batch = np.linspace(0, 1, BATCH * 4, dtype=np.float32).reshape(BATCH, 4)
    listed = onnxeps.score(mlp_model("graph input"), batch)
    plain = onnxeps.score(mlp_model("initializer"), batch)
    assert listed.epsilon == plain.epsilon


def test_initializer_graph_input_planned_as_weight():
    entries = {entry.tensor: entry for entry in onnxeps.plan(mlp_model("graph input")).entries}
    assert entries["W1"].action is Action.WEIGHT
    assert entries["W2"].action is Action.WEIGHT


def test_constant_node_weights_match_initializers():
    constants = onnxeps.score(mlp_model("Constant"), batch_size=BATCH)
    initializers = onnxeps.score(mlp_model("initializer"), batch_size=BATCH)
    assert constants.epsilon is not None
    assert_close(constants.epsilon, initializers.epsilon, EXACT_RTOL)


def test_constant_node_weights_planned():
    entries = onnxeps.plan(mlp_model("Constant")).entries
    assert [entry.tensor for entry in entries] == ["W1", "W2"]
    assert all(entry.source.startswith("Constant node") for entry in entries)
    assert all(entry.action is Action.WEIGHT for entry in entries)


def test_shared_initializer_split_by_role():
    entries = [e for e in onnxeps.plan(shared_two_roles_model(shared=True)).entries if e.tensor == "T"]
    assert {entry.role for entry in entries} == {Role.BIAS, Role.NORM_SCALE}
    assert all(entry.split for entry in entries)


def test_shared_initializer_matches_copies():
    shared = onnxeps.score(shared_two_roles_model(shared=True), batch_size=BATCH)
    copies = onnxeps.score(shared_two_roles_model(shared=False), batch_size=BATCH)
    assert shared.epsilon is not None
    assert_close(shared.epsilon, copies.epsilon, EXACT_RTOL)


# Weights in If, Loop and Scan bodies


def test_if_branch_weights_rewritten():
    result = onnxeps.score(if_model(), batch_size=BATCH)
    x = grey((BATCH, 4))
    expected = reference_epsilon(lambda w: np.tanh(x @ np.full((4, 3), w)))
    assert result.input == "synthetic:x=grey,c=ones"
    assert_close(result.epsilon, expected, REFERENCE_RTOL)


def test_loop_body_weights_rewritten():
    result = onnxeps.score(loop_model(), batch_size=BATCH)

    def forward(w: float) -> np.ndarray:
        h = grey((BATCH, 4))
        for _ in range(LOOP_STEPS):
            h = np.tanh(h @ np.full((4, 4), w))
        return h

    assert_close(result.epsilon, reference_epsilon(forward), REFERENCE_RTOL)


def test_scan_body_weights_rewritten():
    steps = 5
    result = onnxeps.score(scan_model(), batch_size=BATCH, seq_len=steps)

    def forward(w: float) -> np.ndarray:
        state = grey((BATCH, 4))
        x = grey((steps, BATCH, 4), batch_axis=1)
        outputs = []
        for t in range(steps):
            state = np.tanh((state + x[t]) @ np.full((4, 4), w))
            outputs.append(state)
        return np.stack(outputs)

    assert_close(result.epsilon, reference_epsilon(forward), REFERENCE_RTOL)


# Inputs


def test_mixed_inputs_synthetic_kinds():
    result = onnxeps.score(mixed_inputs_model(), batch_size=BATCH, seq_len=6)
    assert result.input == "synthetic:image=grey,ids=tokens,mask=ones"
    assert result.batch_size == BATCH
    assert result.epsilon is not None


def test_mixed_inputs_planned_roles():
    entries = {entry.tensor: entry for entry in onnxeps.plan(mixed_inputs_model()).entries}
    assert entries["E"].role is Role.EMBEDDING
    assert entries["Wc"].action is Action.WEIGHT
    assert entries["Wg"].action is Action.WEIGHT


@pytest.mark.parametrize(
    "shape",
    [["batch", 3, "height", "width"], [None, 3, 4, 4], ["N", 3, None, "W"]],
    ids=["named", "unnamed-batch", "mixed"],
)
def test_symbolic_dims_take_batch_and_seq_len(shape):
    """The batch axis takes the batch size and other symbolic axes --seq-len."""
    seq_len = 5
    result = onnxeps.score(sum_pixels_model(shape), batch_size=BATCH, seq_len=seq_len)
    sizes = [seq_len if not isinstance(d, int) else d for d in shape[2:]]
    x = grey((BATCH, 3, *sizes))
    expected = reference_epsilon(lambda w: np.tanh(x.sum(axis=(2, 3)) @ np.full((3, 2), w)))
    assert result.batch_size == BATCH
    assert_close(result.epsilon, expected, REFERENCE_RTOL)


def test_zero_parameter_graph_plan_error():
    with pytest.raises(PlanError, match="no constant weights"):
        onnxeps.score(relu_only_model(), batch_size=BATCH)


def test_zero_parameter_graph_one_error_line(cli_runs):
    line = assert_one_error_line(cli_runs["zero-parameters"].result())
    assert "no constant weights" in line


# BatchNormalization, quantized models and output files


def test_batchnorm_training_empty_outputs_scores(cli_runs):
    """ONNX Runtime 1.32 segfaults on empty optional outputs of training-mode
    BatchNormalization when graph optimisation is off, so this runs in a subprocess.
    The score must equal inference mode's: both normalise with the batch's statistics."""
    record = assert_one_record(cli_runs["batchnorm-training"].result())
    inference = onnxeps.score(conv_bn_model(training_mode=0), batch_size=BATCH)
    assert record["epsilon"] is not None
    assert_close(record["epsilon"], inference.epsilon, EXACT_RTOL)


def test_qdq_cnn_rejected_as_quantized(cli_runs):
    line = assert_one_error_line(cli_runs["qdq-cnn"].result())
    assert "quantized" in line


def test_output_file_replaced_atomically(cli_runs):
    run = cli_runs["output-file"].result()
    (output,) = run.case.outputs
    folder = output.parent
    lines = output.read_text().splitlines()
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".records.json.")]
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    assert run.sha256_after == run.sha256_before
    assert len(lines) == 1
    assert list(json.loads(lines[0])) == SCORE_KEYS
    assert leftovers == []


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "records.json"
    target.write_text("old content\n")

    def fail_halfway(stream) -> None:
        stream.write(b'{"model": "partial')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail_halfway)
    assert target.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["records.json"]


def test_score_leaves_model_unchanged(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_model(), str(path))
    before = sha256_of(path)
    result = onnxeps.score(path, batch_size=BATCH)
    assert result.sha256 == before
    assert sha256_of(path) == before
    assert math.isfinite(result.epsilon)
