"""Property tests of onnxeps on corrupted files and on random valid graphs.

Two contracts are checked with Hypothesis:

- Corrupted bytes of small valid models (truncated, bytes flipped, junk inserted) given
  to ``load_model``, ``onnxeps.plan`` and ``onnxeps.score`` give a result or raise
  :class:`onnxeps.OnnxepsError`, never another exception.
- Random valid float graphs (chains of Conv, BatchNormalization, Gemm, MatMul, pooling,
  Concat, activations, ...) keep passing ``onnx.checker`` after each rewrite pass, and
  score to a finite or undefined epsilon. The collapsed and the full evaluation agree
  on definedness and within |a - b| <= 1e-4 |b| + 1e-6.

One run checks 3,900 generated cases in about 30 s on two busy cores. Defects found by these
properties are pinned down by the deterministic xfail tests at the end of this file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxeps
from onnxeps.errors import ModelLoadError, OnnxepsError, RewriteError, RuntimeFailure
from onnxeps.load import load_model
from onnxeps.passes.batchnorm import BatchNormToBatchStatistics
from onnxeps.passes.collapse import CollapseChannels
from onnxeps.passes.constants import ApplyConstants, fill_weights
from onnxeps.passes.dropout import RemoveDropout
from onnxeps.passes.graph_inputs import DetachInitializerInputs
from onnxeps.passes.output import ExposeOutput, PruneUnused, scored_output_name
from onnxeps.plan import build_plan
from onnxeps.roles import Action

LOAD_CASES = 1000
PLAN_CASES = 1000
SCORE_CORRUPTED_CASES = 500
REWRITE_CASES = 1000
SCORE_RANDOM_CASES = 400
# Under CI the cases are drawn from a fixed seed, so a landing does not depend on the
# draw; elsewhere each run draws new cases.
FUZZ_SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=bool(os.environ.get("CI")),
)
EPSILON_RTOL = 1e-4
EPSILON_ATOL = 1e-6
# Two runs whose outputs are proportional in exact arithmetic give epsilon 0. Float32
# rounding leaves more than EPSILON_ATOL: a Concat, Sigmoid, MatMul graph on 4 samples
# gave 1.3e-6 for the full graph and 5.4e-8 for the collapsed one.
ROUNDING_FLOOR = 1e-5

vi = helper.make_tensor_value_info


def make_model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def floats(values, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


# Seed models for byte corruption


def _seed_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "G", "gb"], ["y"], transB=1),
    ]
    initializers = [
        floats(rng.standard_normal((4, 3, 3, 3)), "W"),
        floats(np.zeros(4), "B"),
        floats(np.ones(4), "s"),
        floats(np.zeros(4), "b"),
        floats(np.zeros(4), "m"),
        floats(np.ones(4), "v"),
        floats(rng.standard_normal((2, 36)), "G"),
        floats(np.zeros(2), "gb"),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat"),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [vi("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [vi("y", TensorProto.FLOAT, ["N", 2])], initializers,
    )  # fmt: skip
    return make_model(graph)


def _seed_mlp_constants() -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        mlp (float[batch,4] x) => (float[batch,3] y) {
            w = Constant <value = float[4,3] {1,2,3,4,5,6,7,8,9,10,11,12}> ()
            h = MatMul (x, w)
            t = Tanh (h)
            d = Dropout (t)
            y = Sigmoid (d)
        }"""
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _seed_if() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wt"], ["m"]), helper.make_node("Tanh", ["m"], ["yt"])],
        "then", [], [vi("yt", TensorProto.FLOAT, ["N", 3])],
        [floats(rng.standard_normal((4, 3)), "Wt")],
    )  # fmt: skip
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "We"], ["ye"])],
        "else", [], [vi("ye", TensorProto.FLOAT, ["N", 3])],
        [floats(rng.standard_normal((4, 3)), "We")],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "branches",
        [vi("x", TensorProto.FLOAT, ["N", 4]), vi("c", TensorProto.BOOL, [])],
        [vi("y", TensorProto.FLOAT, ["N", 3])],
    )  # fmt: skip
    return make_model(graph)


SEED_MODELS = [
    model.SerializeToString()
    for model in (_seed_cnn(), _seed_mlp_constants(), _seed_if())
]


@st.composite
def corrupted_bytes(draw) -> bytes:
    """Return a seed model truncated, with bytes flipped, or with junk inserted."""
    data = bytearray(draw(st.sampled_from(SEED_MODELS)))
    kind = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            offset = draw(st.integers(0, len(data) - 1))
            data[offset] ^= draw(st.integers(1, 255))
        return bytes(data)
    offset = draw(st.integers(0, len(data)))
    junk = draw(st.binary(min_size=1, max_size=16))
    return bytes(data[:offset]) + junk + bytes(data[offset:])


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "model.onnx"


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@settings(max_examples=LOAD_CASES, **FUZZ_SETTINGS)
@given(data=corrupted_bytes())
def test_load_corrupted_result_or_onnxeps_error(fuzz_file, data):
    try:
        loaded = load_model(write_bytes(fuzz_file, data))
    except OnnxepsError:
        return
    assert len(loaded.sha256) == 64


@settings(max_examples=PLAN_CASES, **FUZZ_SETTINGS)
@given(data=corrupted_bytes())
def test_plan_corrupted_result_or_onnxeps_error(fuzz_file, data):
    try:
        plan = onnxeps.plan(write_bytes(fuzz_file, data))
    except OnnxepsError:
        return
    assert isinstance(plan, onnxeps.Plan)


def assert_valid_result(result: onnxeps.ScoreResult) -> None:
    if result.epsilon is None:
        assert result.reason, "undefined epsilon without a reason"
    else:
        assert math.isfinite(result.epsilon)
        assert result.reason is None


@settings(max_examples=SCORE_CORRUPTED_CASES, **FUZZ_SETTINGS)
@given(data=corrupted_bytes())
def test_score_corrupted_result_or_onnxeps_error(fuzz_file, data):
    try:
        result = onnxeps.score(write_bytes(fuzz_file, data), batch_size=4, timeout=20)
    except OnnxepsError:
        return
    assert_valid_result(result)


# Random valid graphs

CHAIN_OPS = [
    "Conv", "Relu", "BatchNormalization", "Add", "Mul", "Gemm", "MatMul", "Dropout",
    "Identity", "Transpose", "Reshape", "AveragePool", "MaxPool", "Concat", "Sigmoid",
    "Tanh",
]  # fmt: skip
SPATIAL_OPS = {"Conv", "AveragePool", "MaxPool"}
WEIGHTED_OPS = ["Conv", "Gemm", "MatMul", "BatchNormalization"]
Shape = tuple


class GraphBuilder:
    """Collects the nodes, initializers and values of one random graph.

    A parameter is stored as an initializer, as an initializer that is also a graph
    input, or in a Constant node. It may be read through Identity or Cast. A new
    parameter may reuse an earlier one of the same shape, which then has two consumers,
    possibly in different roles.
    """

    def __init__(self, draw, opset: int) -> None:
        self.draw = draw
        self.opset = opset
        self.rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.initializer_inputs: list[onnx.ValueInfoProto] = []
        self.extra_outputs: list[onnx.ValueInfoProto] = []
        self.params: list[tuple[str, Shape]] = []
        self.values: list[tuple[str, Shape]] = []
        self.count = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def param(self, shape: Shape, low: float = -1.0, high: float = 1.0) -> str:
        same = [name for name, other in self.params if other == shape]
        if same and self.draw(st.booleans()):
            return self.draw(st.sampled_from(same))
        name = self.fresh("p")
        tensor = floats(self.rng.uniform(low, high, shape), name)
        storage = self.draw(st.sampled_from(["initializer", "graph input", "Constant"]))
        if storage == "Constant":
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.initializers.append(tensor)
            if storage == "graph input":
                self.initializer_inputs.append(vi(name, TensorProto.FLOAT, shape))
        self.params.append((name, shape))
        via = self.draw(st.sampled_from(["direct", "direct", "Identity", "Cast"]))
        if via == "direct":
            return name
        alias = self.fresh(f"{name}_{via.lower()}")
        attributes = {"to": TensorProto.FLOAT} if via == "Cast" else {}
        self.nodes.append(helper.make_node(via, [name], [alias], **attributes))
        return alias

    def int64s(self, values: list[int]) -> str:
        name = self.fresh("shape")
        self.initializers.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def node(self, op_type: str, inputs, shape: Shape, outputs: int = 1, **attributes):
        """Append a node and return its first output, its shape and all output names."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, **attributes))
        self.values.append((names[0], shape))
        return names[0], shape, names


def _conv(b: GraphBuilder, x: str, shape: Shape):
    channels = shape[1]
    kernel = b.draw(st.sampled_from([1, 3]))
    padded = b.draw(st.booleans()) or min(shape[2:]) < kernel
    depthwise = b.draw(st.booleans())
    out_channels = channels if depthwise else b.draw(st.integers(1, 4))
    group = channels if depthwise else 1
    inputs = [x, b.param((out_channels, channels // group, kernel, kernel))]
    if b.draw(st.booleans()):
        inputs.append(b.param((out_channels,)))
    pad = kernel // 2 if padded else 0
    height, width = (size + 2 * pad - kernel + 1 for size in shape[2:])
    out = (shape[0], out_channels, height, width)
    return b.node(
        "Conv", inputs, out, kernel_shape=[kernel, kernel], pads=[pad] * 4, group=group
    )[:2]


def _batchnorm(b: GraphBuilder, x: str, shape: Shape):
    channels = (shape[1],)
    inputs = [x, b.param(channels), b.param(channels), b.param(channels)]
    inputs.append(b.param(channels, 0.5, 2.0))
    attributes = {"epsilon": 1e-5}
    training = b.opset >= 14 and b.draw(st.booleans())
    if b.opset >= 14:
        attributes["training_mode"] = int(training)
    out = b.fresh("bn")
    outputs = [out]
    if training:
        # ONNX Runtime 1.32 segfaults on empty optional outputs with optimisation off.
        kind = b.draw(st.sampled_from(["Y", "empty", "unused statistics"]))
        if kind == "empty":
            outputs += ["", ""]
        elif kind == "unused statistics":
            outputs += [b.fresh("running_mean"), b.fresh("running_var")]
    b.nodes.append(helper.make_node("BatchNormalization", inputs, outputs, **attributes))
    b.values.append((out, shape))
    return out, shape


def _add(b: GraphBuilder, x: str, shape: Shape):
    same = [name for name, other in b.values if other == shape and name != x]
    if same and b.draw(st.booleans()):
        other = b.draw(st.sampled_from(same))
    else:
        other = b.param((shape[1], 1, 1) if len(shape) == 4 else (shape[1],))
    inputs = [x, other] if b.draw(st.booleans()) else [other, x]
    return b.node("Add", inputs, shape)[:2]


def _mul_scalar(b: GraphBuilder, x: str, shape: Shape):
    value = b.draw(st.floats(-2, 2, allow_nan=False, width=32))
    name = b.fresh("scalar")
    tensor = floats(value, name)
    if b.draw(st.booleans()):
        b.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
    else:
        b.initializers.append(tensor)
    return b.node("Mul", [x, name], shape)[:2]


def _flatten(b: GraphBuilder, x: str, shape: Shape):
    features = int(np.prod(shape[1:]))
    return b.node("Reshape", [x, b.int64s([0, -1])], (shape[0], features))[:2]


def _gemm(b: GraphBuilder, x: str, shape: Shape):
    if len(shape) == 4:
        x, shape = _flatten(b, x, shape)
    units = b.draw(st.integers(1, 5))
    transposed = b.draw(st.booleans())
    weight = (units, shape[1]) if transposed else (shape[1], units)
    inputs = [x, b.param(weight)]
    if b.draw(st.booleans()):
        inputs.append(b.param((units,)))
    return b.node("Gemm", inputs, (shape[0], units), transB=int(transposed))[:2]


def _matmul(b: GraphBuilder, x: str, shape: Shape):
    units = b.draw(st.integers(1, 5))
    out = shape[:-1] + (units,)
    return b.node("MatMul", [x, b.param((shape[-1], units))], out)[:2]


def _dropout(b: GraphBuilder, x: str, shape: Shape):
    inputs = [x]
    kind = b.draw(st.sampled_from(["plain", "ratio", "training_mode"]))
    if kind != "plain":
        ratio = b.fresh("ratio")
        b.initializers.append(floats(0.5, ratio))
        inputs.append(ratio)
    if kind == "training_mode":
        flag = b.fresh("training")
        value = np.array(b.draw(st.booleans()))
        b.initializers.append(numpy_helper.from_array(value, flag))
        inputs.append(flag)
    outputs = b.draw(st.integers(1, 2))
    out, shape, names = b.node("Dropout", inputs, shape, outputs=outputs)
    if outputs == 2 and b.draw(st.booleans()):
        b.extra_outputs.append(vi(names[1], TensorProto.BOOL, shape))
    return out, shape


def _transpose(b: GraphBuilder, x: str, shape: Shape):
    # The batch axis stays first, so that channel axes keep static sizes.
    perm = [0] + b.draw(st.permutations(list(range(1, len(shape)))))
    return b.node("Transpose", [x], tuple(shape[i] for i in perm), perm=perm)[:2]


def _reshape(b: GraphBuilder, x: str, shape: Shape):
    if len(shape) == 2:
        target = (shape[0], shape[1], 1, 1)
        return b.node("Reshape", [x, b.int64s([0, shape[1], 1, 1])], target)[:2]
    if b.draw(st.booleans()):
        return _flatten(b, x, shape)
    swapped = [0, shape[1], shape[3], shape[2]]
    return b.node("Reshape", [x, b.int64s(swapped)], (shape[0], *swapped[1:]))[:2]


def _pool(op_type: str):
    def pool(b: GraphBuilder, x: str, shape: Shape):
        kernel = b.draw(st.integers(1, min(2, *shape[2:])))
        stride = b.draw(st.integers(1, 2))
        height, width = ((size - kernel) // stride + 1 for size in shape[2:])
        return b.node(
            op_type, [x], (shape[0], shape[1], height, width),
            kernel_shape=[kernel, kernel], strides=[stride, stride],
        )[:2]  # fmt: skip

    return pool


def _concat(b: GraphBuilder, x: str, shape: Shape):
    known = dict(b.values)
    known[x] = shape
    same = [
        name for name, other in known.items()
        if len(other) == len(shape) and other[0] == shape[0] and other[2:] == shape[2:]
    ]  # fmt: skip
    other = b.draw(st.sampled_from(sorted(same)))
    out = (shape[0], shape[1] + known[other][1], *shape[2:])
    return b.node("Concat", [x, other], out, axis=1)[:2]


def _unary(op_type: str):
    def unary(b: GraphBuilder, x: str, shape: Shape):
        return b.node(op_type, [x], shape)[:2]

    return unary


STEPS = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "Add": _add,
    "Mul": _mul_scalar,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Dropout": _dropout,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "AveragePool": _pool("AveragePool"),
    "MaxPool": _pool("MaxPool"),
    "Concat": _concat,
    **{op: _unary(op) for op in ("Relu", "Identity", "Sigmoid", "Tanh")},
}


@st.composite
def random_models(draw) -> onnx.ModelProto:
    """Return a random chain of operators with at least one weighted operator.

    The model is not checked here; tests skip draws that onnx.checker rejects.
    """
    opset = draw(st.sampled_from([11, 12, 13, 14, 15, 17, 18, 20]))
    b = GraphBuilder(draw, opset)
    batch = draw(st.sampled_from(["N", 4]))
    if draw(st.booleans()):
        sizes = st.integers(2, 6)
        shape = (batch, draw(st.integers(1, 4)), draw(sizes), draw(sizes))
    else:
        shape = (batch, draw(st.integers(1, 6)))
    x = "x"
    b.values.append((x, shape))
    length = draw(st.integers(1, 6))
    weighted_at = draw(st.integers(0, length - 1))
    for index in range(length):
        if index == weighted_at:
            op_type = draw(st.sampled_from(WEIGHTED_OPS))
        else:
            allowed = CHAIN_OPS if len(shape) == 4 else [o for o in CHAIN_OPS if o not in SPATIAL_OPS]
            op_type = draw(st.sampled_from(allowed))
        if op_type in SPATIAL_OPS and len(shape) != 4:
            op_type = "Gemm"
        x, shape = STEPS[op_type](b, x, shape)
    if len(b.values) > 1 and draw(st.booleans()):
        name, other = draw(st.sampled_from(b.values[1:]))
        if name != x:
            b.extra_outputs.append(vi(name, TensorProto.FLOAT, other))
    graph = helper.make_graph(
        b.nodes, "random",
        [vi("x", TensorProto.FLOAT, b.values[0][1]), *b.initializer_inputs],
        [vi(x, TensorProto.FLOAT, shape), *b.extra_outputs], b.initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def valid(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def check(model: onnx.ModelProto, after: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:
        pytest.fail(f"the model fails onnx.checker after {after}: {error}")


def assert_clean_onnxeps_error(error: OnnxepsError) -> None:
    """A valid float graph may be rejected, but not by a wrapped internal exception."""
    internal = error.__cause__ if isinstance(error, RewriteError) else None
    assert internal is None or isinstance(internal, OnnxepsError), (
        f"internal {type(internal).__name__} in a rewrite pass: {error}"
    )
    assert not isinstance(error, RuntimeFailure), f"rewritten model does not run: {error}"


@settings(max_examples=REWRITE_CASES, **FUZZ_SETTINGS)
@given(model=random_models())
def test_rewrite_random_graph_stays_valid(model):
    assume(valid(model))
    plan = build_plan(model)
    assume(plan.with_action(Action.WEIGHT))
    try:
        DetachInitializerInputs()(model)
        check(model, "detach-initializer-inputs")
        output = scored_output_name(model, None)
        constants = ApplyConstants(plan, np.random.default_rng(0))
        constants(model)
        check(model, "apply-constants")
        RemoveDropout()(model)
        check(model, "remove-dropout")
        collapse = CollapseChannels(constants.weight_tensors, output)
        collapse(model)
        check(model, "collapse-channels")
        BatchNormToBatchStatistics()(model)
        check(model, "batchnorm-to-batch-statistics")
        ExposeOutput(output)(model)
        check(model, "expose-output")
        PruneUnused()(model)
        check(model, "prune-unused")
    except OnnxepsError as error:
        assert_clean_onnxeps_error(error)
        return
    for weight in (1e-7, 1.0):
        check(fill_weights(model, collapse.weights, weight, collapse.multipliers), "fill_weights")


def score_or_error(model: onnx.ModelProto, collapse: bool):
    try:
        return onnxeps.score(model, batch_size=4, timeout=20, collapse=collapse)
    except OnnxepsError as error:
        assert_clean_onnxeps_error(error)
        return error


def agree(a: float, b: float) -> bool:
    return abs(a - b) <= EPSILON_RTOL * abs(b) + EPSILON_ATOL


def rounding_noise(
    model: onnx.ModelProto, result: onnxeps.ScoreResult, collapse: bool = False
) -> bool:
    """Return True when a defined epsilon is float32 rounding noise: below
    ROUNDING_FLOOR, or moved when w1 changes by 1 % or grows to 1e-5.

    For w1 from 1e-7 to 1e-5 these graphs are close to linear in w1, and min-max
    normalisation removes the scale, so epsilon should barely move. When it does, the
    first run's output varies only at float32 rounding level.
    """
    if result.epsilon < ROUNDING_FLOOR:
        return True
    for w1 in (0.99e-7, 1.01e-7, 1e-5):
        nearby = onnxeps.score(
            model, batch_size=4, timeout=20, collapse=collapse, weights=(w1, 1.0)
        )
        if nearby.epsilon is None or not agree(nearby.epsilon, result.epsilon):
            return True
    return False


@settings(max_examples=SCORE_RANDOM_CASES, **FUZZ_SETTINGS)
@given(model=random_models())
def test_score_random_graph_collapse_agrees(model):
    assume(valid(model))
    collapsed = score_or_error(model, collapse=True)
    full = score_or_error(model, collapse=False)
    assert type(collapsed) is type(full), f"collapsed: {collapsed!r}; full: {full!r}"
    if isinstance(full, OnnxepsError):
        return
    assert_valid_result(collapsed)
    assert_valid_result(full)
    if (collapsed.epsilon is None) != (full.epsilon is None):
        # NOTE: one graph's output is exactly constant in float32 while the other's
        # varies only by rounding: the known defect below, so skip when that is so.
        defined, narrow = (collapsed, True) if full.epsilon is None else (full, False)
        assume(not rounding_noise(model, defined, collapse=narrow))
    assert (collapsed.epsilon is None) == (full.epsilon is None), (
        f"collapsed: {collapsed.epsilon} ({collapsed.reason}); "
        f"full: {full.epsilon} ({full.reason})"
    )
    if full.epsilon is None or agree(collapsed.epsilon, full.epsilon):
        return
    # NOTE: skips the known defect of test_score_rounding_noise_collapse_agrees.
    assume(not rounding_noise(model, full))
    assert agree(collapsed.epsilon, full.epsilon), (
        f"collapsed: {collapsed.epsilon}; full: {full.epsilon}"
    )


# Defects the properties found, each as its smallest reproduction


def _matmul_tanh(x_shape=("N", 4)) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "WEIGHT"], ["h"], name="NODENAME"),
         helper.make_node("Tanh", ["h"], ["y"])],
        "g", [vi("x", TensorProto.FLOAT, list(x_shape))],
        [vi("y", TensorProto.FLOAT, [x_shape[0], 3])], [floats(np.ones((4, 3)), "WEIGHT")],
    )  # fmt: skip
    return make_model(graph)


def non_utf8_model(tmp_path: Path, token: bytes, x_shape=("N", 4)) -> Path:
    """Save the MatMul-Tanh model with one byte of ``token`` made invalid UTF-8."""
    data = _matmul_tanh(x_shape).SerializeToString()
    assert token in data
    broken = token[:2] + b"\xff" + token[3:]
    return write_bytes(tmp_path / "model.onnx", data.replace(token, broken))


def test_score_non_utf8_dim_param_onnxeps_error(tmp_path):
    path = non_utf8_model(tmp_path, b"BATCHDIM", x_shape=("BATCHDIM", 4))
    with pytest.raises(ModelLoadError, match=r"dim\[0\]\.dim_param is not valid UTF-8"):
        onnxeps.score(path, batch_size=4)


def test_plan_non_utf8_initializer_onnxeps_error(tmp_path):
    path = non_utf8_model(tmp_path, b"WEIGHT")
    with pytest.raises(ModelLoadError, match=r"graph\.initializer\[0\]\.name is not valid"):
        onnxeps.plan(path)


def test_score_non_utf8_tensor_name_load_error(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["HIDDEN"]), helper.make_node("Tanh", ["HIDDEN"], ["y"])],
        "g", [vi("x", TensorProto.FLOAT, ["N", 4])], [vi("y", TensorProto.FLOAT, ["N", 3])],
        [floats(np.ones((4, 3)), "W")],
    )  # fmt: skip
    data = make_model(graph).SerializeToString().replace(b"HIDDEN", b"HI\xffDEN")
    with pytest.raises(ModelLoadError, match=r"graph\.node\[\d\]\.\w+\[0\] \(in node of type"):
        onnxeps.score(write_bytes(tmp_path / "model.onnx", data), batch_size=4)


def test_score_untyped_input_onnxeps_error():
    model = _matmul_tanh()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    with pytest.raises(OnnxepsError, match="element type 0, which onnxeps cannot feed"):
        onnxeps.score(model, batch_size=4)


def test_score_unknown_input_type_onnxeps_error():
    model = _matmul_tanh()
    model.graph.input[0].type.tensor_type.elem_type = 29
    with pytest.raises(OnnxepsError):
        onnxeps.score(model, batch_size=4)


def _with_node_without_outputs() -> onnx.ModelProto:
    model = _matmul_tanh()
    model.graph.node.append(helper.make_node("Relu", ["x"], []))
    return model


def test_plan_node_without_outputs_result():
    try:
        plan = onnxeps.plan(_with_node_without_outputs())
    except OnnxepsError:
        return
    assert [entry.tensor for entry in plan.entries] == ["WEIGHT"]


def test_score_node_without_outputs_clear_error():
    try:
        result = onnxeps.score(_with_node_without_outputs(), batch_size=4)
    except OnnxepsError as error:
        assert_clean_onnxeps_error(error)
        return
    assert_valid_result(result)


def test_collapse_extra_output_passes_checker():
    """A second graph output, narrowed by the collapse, must not keep its old shape."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "g", [vi("x", TensorProto.FLOAT, [4, 1])],
        [vi("y", TensorProto.FLOAT, [4, 2]), vi("h", TensorProto.FLOAT, [4, 2])],
        [floats([[0.5, -0.5]], "W"), floats([0.1, 0.2], "B")],
    )  # fmt: skip
    model = make_model(graph)
    plan = build_plan(model)
    constants = ApplyConstants(plan, np.random.default_rng(0))
    constants(model)
    CollapseChannels(constants.weight_tensors, "y")(model)
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.xfail(
    strict=True,
    reason="epsilon is reported as defined when the w1 = 1e-7 run's output varies only at "
    "float32 rounding level: it jumps between 0.13, 0.21 and 0.39 for w1 within 1 % of "
    "1e-7, and the collapsed graph (0.389) and the full graph (0.210) disagree",
)
def test_score_rounding_noise_collapse_agrees():
    """Gemm, Sigmoid and MatMul on 4 samples, found by test_score_random_graph_collapse_agrees."""
    first = [[0.27392337, -0.46042657, -0.918053], [-0.96694475, 0.6265405, 0.82551116],
             [0.21327156, 0.4589931, 0.08724998], [0.87014484, 0.63170713, -0.994523],
             [0.7148085, -0.93282884, 0.4593109]]  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1"], ["g"]), helper.make_node("Sigmoid", ["g"], ["s"]),
         helper.make_node("MatMul", ["s", "W2"], ["y"])],
        "g", [vi("x", TensorProto.FLOAT, ["N", 5])], [vi("y", TensorProto.FLOAT, ["N", 1])],
        [floats(first, "W1"), floats([[-0.64868873], [0.7263578], [0.082922444]], "W2")],
    )  # fmt: skip
    model = make_model(graph, opset=11)
    collapsed = onnxeps.score(model, batch_size=4, collapse=True)
    full = onnxeps.score(model, batch_size=4, collapse=False)
    assert (collapsed.epsilon is None) == (full.epsilon is None)
    if full.epsilon is not None:
        assert agree(collapsed.epsilon, full.epsilon)
