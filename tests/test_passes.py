"""Tests of each rewrite pass on tiny models written as ONNX text.

Every rewritten model must pass the full ONNX checker and run in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxeps.errors import OnnxepsError, RewriteError
from onnxeps.graphs import iter_graphs
from onnxeps.passes.base import NameScope, run_passes
from onnxeps.passes.batchnorm import BatchNormToBatchStatistics
from onnxeps.passes.constants import (
    ApplyConstants,
    fill_weights,
    weight_feeds,
    weights_as_inputs,
)
from onnxeps.passes.dropout import RemoveDropout
from onnxeps.passes.graph_inputs import DetachInitializerInputs
from onnxeps.passes.output import (
    ExposeOutput,
    PruneUnused,
    UnknownOutputError,
    scored_output_name,
)
from onnxeps.plan import build_plan
from onnxeps.roles import Action


def make_model(
    text: str, opset: int = 17, ir_version: int = 8, **initializers
) -> onnx.ModelProto:
    """Parse an ONNX text graph, append initializers, check the model."""
    header = f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>\n'
    model = onnx.parser.parse_model(header + text)
    for name, array in initializers.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def session(
    model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def check_and_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Check the rewritten model fully, then run it and return every output."""
    onnx.checker.check_model(model, full_check=True)
    return session(model).run(None, feeds)


def initializer(model: onnx.ModelProto, name: str, graph=None) -> np.ndarray:
    graph = graph if graph is not None else model.graph
    tensor = next(t for t in graph.initializer if t.name == name)
    return numpy_helper.to_array(tensor)


def op_types(graph: onnx.GraphProto) -> list[str]:
    return [node.op_type for node in graph.node]


_RNG = np.random.default_rng(5)


# DetachInitializerInputs

_OVERRIDABLE = """
g (float[2,3] x, float[3,3] w) => (float[2,3] y) { y = MatMul (x, w) }
"""


def _overridable_model() -> onnx.ModelProto:
    return make_model(_OVERRIDABLE, w=np.eye(3, dtype=np.float32))


def test_detach_inputs_feed_overrides_before():
    # The trap the pass closes: ONNX Runtime lets a feed replace the initializer.
    model = _overridable_model()
    x = np.ones((2, 3), np.float32)
    other = np.full((3, 3), 2.0, np.float32)
    y = session(model).run(None, {"x": x, "w": other})[0]
    assert np.allclose(y, 6.0)


def test_detach_inputs_feed_rejected_after():
    model = _overridable_model()
    assert DetachInitializerInputs()(model)
    x = np.ones((2, 3), np.float32)
    outputs = check_and_run(model, {"x": x})
    assert np.allclose(outputs[0], x)
    other = np.full((3, 3), 2.0, np.float32)
    with pytest.raises(Exception, match="Invalid input name: w"):
        session(model).run(None, {"x": x, "w": other})


def test_detach_inputs_keeps_real_inputs():
    model = _overridable_model()
    DetachInitializerInputs()(model)
    assert [value.name for value in model.graph.input] == ["x"]
    assert [tensor.name for tensor in model.graph.initializer] == ["w"]


def test_detach_inputs_unchanged_returns_false():
    model = make_model(
        "g (float[2,3] x) => (float[2,3] y) { y = MatMul (x, w) }",
        w=np.eye(3, dtype=np.float32),
    )
    before = model.SerializeToString()
    assert not DetachInitializerInputs()(model)
    assert model.SerializeToString() == before


# RemoveDropout

_DROPOUT_TRAINING = """
g (float[4,8] x) => (float[4,8] y) {
  ratio = Constant <value = float {0.5}> ()
  train = Constant <value = bool {1}> ()
  y = Dropout (x, ratio, train)
}
"""


def test_remove_dropout_training_mode_input():
    model = make_model(_DROPOUT_TRAINING)
    x = np.arange(32, dtype=np.float32).reshape(4, 8) + 1
    # Without optimisation ONNX Runtime keeps the training-mode Dropout active.
    before = session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(
        None, {"x": x}
    )[0]
    assert not np.array_equal(before, x)
    assert RemoveDropout()(model)
    assert "Dropout" not in op_types(model.graph)
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        onnx.checker.check_model(model, full_check=True)
        after = session(model, level).run(None, {"x": x})[0]
        assert np.array_equal(after, x)


def test_remove_dropout_used_mask_all_true():
    text = """
    g (float[4,8] x) => (float[4,8] y, bool[4,8] keep) {
      ratio = Constant <value = float {0.5}> ()
      train = Constant <value = bool {1}> ()
      d, mask = Dropout (x, ratio, train)
      m = Cast <to = 1> (mask)
      y = Mul (d, m)
      keep = Identity (mask)
    }
    """
    model = make_model(text)
    assert RemoveDropout()(model)
    x = np.arange(32, dtype=np.float32).reshape(4, 8)
    y, keep = check_and_run(model, {"x": x})
    assert np.array_equal(y, x)
    assert keep.dtype == np.bool_
    assert keep.all()


def test_remove_dropout_mask_graph_output():
    text = """
    g (float[4,8] x) => (float[4,8] y, bool[4,8] mask) {
      y, mask = Dropout <seed = 3> (x)
    }
    """
    model = make_model(text, opset=13)
    assert RemoveDropout()(model)
    y, mask = check_and_run(model, {"x": np.ones((4, 8), np.float32)})
    assert mask.shape == (4, 8)
    assert mask.all()


def test_remove_dropout_unused_mask_dropped():
    text = """
    g (float[4,8] x) => (float[4,8] y) { y, mask = Dropout (x) }
    """
    model = make_model(text, opset=13)
    assert RemoveDropout()(model)
    assert op_types(model.graph) == ["Identity"]
    check_and_run(model, {"x": np.ones((4, 8), np.float32)})


def test_remove_dropout_opset7_style():
    text = """
    g (float[4,8] x) => (float[4,8] y) { y = Dropout <ratio = 0.3> (x) }
    """
    model = make_model(text, opset=7, ir_version=3)
    assert RemoveDropout()(model)
    assert op_types(model.graph) == ["Identity"]
    x = np.arange(32, dtype=np.float32).reshape(4, 8)
    assert np.array_equal(check_and_run(model, {"x": x})[0], x)


def test_remove_dropout_opset10_mask():
    text = """
    g (float[4,8] x) => (float[4,8] y) {
      d, mask = Dropout <ratio = 0.3> (x)
      m = Cast <to = 1> (mask)
      y = Mul (d, m)
    }
    """
    model = make_model(text, opset=10, ir_version=5)
    assert RemoveDropout()(model)
    x = np.arange(32, dtype=np.float32).reshape(4, 8)
    assert np.array_equal(check_and_run(model, {"x": x})[0], x)


def test_remove_dropout_opset7_used_mask_raises():
    # Before opset 10 the mask has the input's float type, not bool.
    text = """
    g (float[4,8] x) => (float[4,8] y) {
      d, mask = Dropout <ratio = 0.3> (x)
      y = Mul (d, mask)
    }
    """
    model = make_model(text, opset=7, ir_version=3)
    with pytest.raises(RewriteError, match=r"mask output 'mask' .* opset 7"):
        RemoveDropout()(model)


def test_remove_dropout_inside_if():
    text = """
    g (bool c, float[4,8] x) => (float[4,8] y) {
      y = If (c) <
        then_branch = tb () => (float[4,8] t) { t = Dropout (x) },
        else_branch = eb () => (float[4,8] e) { e = Identity (x) }
      >
    }
    """
    model = make_model(text)
    assert RemoveDropout()(model)
    then_branch = model.graph.node[0].attribute[0].g
    assert op_types(then_branch) == ["Identity"]
    x = np.ones((4, 8), np.float32)
    assert np.array_equal(check_and_run(model, {"c": np.array(True), "x": x})[0], x)


def test_remove_dropout_none_returns_false():
    model = make_model("g (float[2] x) => (float[2] y) { y = Relu (x) }")
    assert not RemoveDropout()(model)


# BatchNormToBatchStatistics

_SCALE = np.array([1.0, 2.0, 0.5, 3.0], np.float32)
_SHIFT = np.array([0.0, 0.1, -0.2, 0.3], np.float32)


def batchnorm_reference(x: np.ndarray, epsilon: float, scale=_SCALE, shift=_SHIFT) -> np.ndarray:
    """Normalise with the batch's mean and biased variance over all axes but 1."""
    values = x.astype(np.float64)
    axes = tuple(axis for axis in range(x.ndim) if axis != 1)
    mean = values.mean(axis=axes, keepdims=True)
    variance = ((values - mean) ** 2).mean(axis=axes, keepdims=True)
    channel = [1] * x.ndim
    channel[1] = -1
    normalised = (values - mean) / np.sqrt(variance + epsilon)
    return normalised * scale.reshape(channel) + shift.reshape(channel)


def batchnorm_model(opset: int, rank: int, training_mode: int) -> onnx.ModelProto:
    shape = [6, 4, 5, 3, 2][:rank]
    dims = ", ".join(str(d) for d in shape)
    attributes = "epsilon = 0.01"
    if opset >= 14:
        attributes += f", training_mode = {training_mode}"
    outputs = "y, running_mean, running_var" if training_mode else "y"
    text = f"""
    g (float[{dims}] x) => (float[{dims}] y) {{
      {outputs} = BatchNormalization <{attributes}> (x, scale, shift, mean, var)
    }}
    """
    # Running statistics far from the batch's, so that using them would show.
    return make_model(
        text,
        opset=opset,
        scale=_SCALE,
        shift=_SHIFT,
        mean=np.full(4, 7.0, np.float32),
        var=np.full(4, 9.0, np.float32),
    )


_BATCHNORM_CASES = [
    (opset, rank, training)
    for opset in (9, 14, 17, 18)
    for rank in (2, 3, 4, 5)
    for training in ((0, 1) if opset >= 14 else (0,))
]


@pytest.mark.parametrize(("opset", "rank", "training_mode"), _BATCHNORM_CASES)
def test_batchnorm_matches_reference(opset, rank, training_mode):
    model = batchnorm_model(opset, rank, training_mode)
    assert BatchNormToBatchStatistics()(model)
    assert "BatchNormalization" not in op_types(model.graph)
    shape = [6, 4, 5, 3, 2][:rank]
    x = (_RNG.standard_normal(shape) * 3 + 1).astype(np.float32)
    y = check_and_run(model, {"x": x})[0]
    assert y.shape == x.shape
    assert np.allclose(y, batchnorm_reference(x, 0.01), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [12, 13])
def test_batchnorm_unsqueeze_axes_form(opset):
    model = batchnorm_model(opset, 4, 0)
    BatchNormToBatchStatistics()(model)
    (node,) = [node for node in model.graph.node if node.op_type == "Unsqueeze"]
    has_attribute = any(a.name == "axes" for a in node.attribute)
    assert has_attribute == (opset < 13)
    assert len(node.input) == (2 if opset >= 13 else 1)


def test_batchnorm_one_channel_without_transpose():
    text = """
    g (float[6,1,5,3] x) => (float[6,1,5,3] y) {
      y = BatchNormalization <epsilon = 0.01> (x, scale, shift, mean, var)
    }
    """
    model = make_model(
        text, opset=17, scale=_SCALE[3:], shift=_SHIFT[3:],
        mean=np.full(1, 7.0, np.float32), var=np.full(1, 9.0, np.float32),
    )  # fmt: skip
    BatchNormToBatchStatistics()(model)
    assert "Transpose" not in op_types(model.graph)
    x = (_RNG.standard_normal((6, 1, 5, 3)) * 3 + 1).astype(np.float32)
    y = check_and_run(model, {"x": x})[0]
    expected = batchnorm_reference(x, 0.01, _SCALE[3:], _SHIFT[3:])
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("type_name", "dtype", "tolerance"),
    [("double", np.float64, 1e-9), ("float16", np.float16, 2e-2)],
)
def test_batchnorm_double_and_half(type_name, dtype, tolerance):
    text = f"""
    g ({type_name}[6,4,5,3] x) => ({type_name}[6,4,5,3] y) {{
      y = BatchNormalization <epsilon = 0.01> (x, scale, shift, mean, var)
    }}
    """
    model = make_model(
        text, opset=17, scale=_SCALE.astype(dtype), shift=_SHIFT.astype(dtype),
        mean=np.full(4, 7.0, dtype), var=np.full(4, 9.0, dtype),
    )  # fmt: skip
    BatchNormToBatchStatistics()(model)
    x = (_RNG.standard_normal((6, 4, 5, 3)) * 3 + 1).astype(dtype)
    y = check_and_run(model, {"x": x})[0]
    assert y.dtype == dtype
    assert np.allclose(y, batchnorm_reference(x, 0.01), rtol=tolerance, atol=tolerance)


def test_batchnorm_default_epsilon():
    text = """
    g (float[6,4] x) => (float[6,4] y) {
      y = BatchNormalization (x, scale, shift, mean, var)
    }
    """
    model = make_model(
        text, scale=_SCALE, shift=_SHIFT, mean=np.zeros(4, np.float32), var=_SCALE
    )
    BatchNormToBatchStatistics()(model)
    x = _RNG.standard_normal((6, 4)).astype(np.float32)
    y = check_and_run(model, {"x": x})[0]
    assert np.allclose(y, batchnorm_reference(x, 1e-5), rtol=1e-5, atol=1e-5)


def test_batchnorm_float16_input():
    text = """
    g (float16[N,4,3] x) => (float16[N,4,3] y) {
      y = BatchNormalization <epsilon = 0.01> (x, scale, shift, mean, var)
    }
    """
    model = make_model(
        text, scale=_SCALE, shift=_SHIFT, mean=np.zeros(4, np.float32), var=_SCALE
    )
    BatchNormToBatchStatistics()(model)
    x = _RNG.standard_normal((8, 4, 3)).astype(np.float16)
    y = check_and_run(model, {"x": x})[0]
    assert y.dtype == np.float16
    assert np.allclose(y, batchnorm_reference(x, 0.01), rtol=1e-2, atol=1e-2)


def test_batchnorm_inside_if_branch():
    text = """
    g (bool c, float[6,4,3] x) => (float[6,4,3] y) {
      y = If (c) <
        then_branch = tb () => (float[6,4,3] t) {
          t = BatchNormalization <epsilon = 0.01> (x, scale, shift, mean, var)
        },
        else_branch = eb () => (float[6,4,3] e) { e = Identity (x) }
      >
    }
    """
    model = make_model(
        text,
        scale=_SCALE,
        shift=_SHIFT,
        mean=np.full(4, 7.0, np.float32),
        var=np.full(4, 9.0, np.float32),
    )
    assert BatchNormToBatchStatistics()(model)
    then_branch = model.graph.node[0].attribute[0].g
    assert "BatchNormalization" not in op_types(then_branch)
    x = _RNG.standard_normal((6, 4, 3)).astype(np.float32)
    y = check_and_run(model, {"c": np.array(True), "x": x})[0]
    assert np.allclose(y, batchnorm_reference(x, 0.01), rtol=1e-5, atol=1e-5)


def test_batchnorm_running_stat_read_raises():
    text = """
    g (float[6,4] x) => (float[6,4] y, float[4] running_mean) {
      y, running_mean, running_var = BatchNormalization <training_mode = 1> (
        x, scale, shift, mean, var)
    }
    """
    model = make_model(
        text, scale=_SCALE, shift=_SHIFT, mean=np.zeros(4, np.float32), var=_SCALE
    )
    with pytest.raises(
        RewriteError, match="running statistics output 'running_mean' read by the graph"
    ):
        BatchNormToBatchStatistics()(model)


def test_batchnorm_none_returns_false():
    model = make_model("g (float[2] x) => (float[2] y) { y = Relu (x) }")
    assert not BatchNormToBatchStatistics()(model)


# ApplyConstants and fill_weights

_CONV = """
g (float[N,3,6,6] x) => (float[N,4,6,6] y) {
  y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
}
"""


def _conv_model() -> onnx.ModelProto:
    return make_model(
        _CONV,
        w=_RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
        b=np.ones(4, np.float32),
    )


def apply_constants(model: onnx.ModelProto, seed: int = 21, **plan_options):
    plan = build_plan(model, **plan_options)
    rewrite = ApplyConstants(plan, np.random.default_rng(seed))
    changed = rewrite(model)
    return rewrite, changed


def test_apply_constants_conv():
    model = _conv_model()
    rewrite, changed = apply_constants(model)
    assert changed
    assert rewrite.weight_tensors == ["w"]
    assert np.array_equal(initializer(model, "b"), np.zeros(4, np.float32))
    assert np.array_equal(initializer(model, "w"), np.zeros((4, 3, 3, 3), np.float32))


def test_fill_weights_sets_value():
    model = _conv_model()
    rewrite, _ = apply_constants(model)
    filled = fill_weights(model, rewrite.weight_tensors, 0.5)
    expected = np.full((4, 3, 3, 3), 0.5, np.float32)
    assert np.array_equal(initializer(filled, "w"), expected)
    assert initializer(filled, "w").dtype == np.float32
    # The template keeps its placeholders for the next weight.
    assert np.array_equal(initializer(model, "w"), np.zeros((4, 3, 3, 3), np.float32))
    x = np.ones((2, 3, 6, 6), np.float32)
    y = check_and_run(filled, {"x": x})[0]
    # At the centre pixel the 3x3x3 kernel covers 27 ones, each times 0.5.
    assert y[0, 0, 3, 3] == pytest.approx(13.5)


def test_weights_as_inputs_match_filled_model():
    model = _conv_model()
    rewrite, _ = apply_constants(model)
    filled = fill_weights(model, rewrite.weight_tensors, 0.5)
    slots = weights_as_inputs(model, [*rewrite.weight_tensors, "pruned"])
    assert slots == {"w": ((4, 3, 3, 3), np.dtype(np.float32))}
    assert "w" not in {t.name for t in model.graph.initializer}
    x = _RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    fed = check_and_run(model, {"x": x} | weight_feeds(slots, 0.5))[0]
    # Constant kernels are pre-packed, so the sums may round differently.
    assert np.allclose(fed, check_and_run(filled, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_weight_feeds_apply_multipliers():
    slots = {"w": ((1, 2), np.dtype(np.float32))}
    feeds = weight_feeds(slots, 1e-7, {"w": np.array([[16.0, 9.0]])})
    assert feeds["w"].dtype == np.float32
    assert np.array_equal(feeds["w"], np.array([[16e-7, 9e-7]], np.float32))


def test_apply_constants_nothing_to_rewrite():
    model = make_model("g (float[2] x) => (float[2] y) { y = Relu (x) }")
    rewrite, changed = apply_constants(model)
    assert not changed
    assert rewrite.weight_tensors == []


def test_apply_constants_split_tensor():
    text = """
    g (float[N,3,6,6] x, float[4,3,3,3] gate) => (float[N,4,6,6] y, float[4,3,3,3] z) {
      y = Conv <pads = [1, 1, 1, 1]> (x, w)
      z = Mul (gate, w)
    }
    """
    original = _RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = make_model(text, w=original)
    rewrite, _ = apply_constants(model)
    conv = model.graph.node[0]
    assert conv.input[1] == "w/weight"
    assert model.graph.node[1].input[1] == "w"
    assert rewrite.weight_tensors == ["w/weight"]
    assert np.array_equal(initializer(model, "w"), original)
    filled = fill_weights(model, rewrite.weight_tensors, 2.0)
    gate = np.ones((4, 3, 3, 3), np.float32)
    x = np.ones((1, 3, 6, 6), np.float32)
    y, z = check_and_run(filled, {"x": x, "gate": gate})
    assert np.array_equal(z, original)
    assert y[0, 0, 3, 3] == pytest.approx(54.0)


def test_apply_constants_split_through_transpose():
    # Both uses read the weight through a Transpose, so the weight's copy takes the
    # transposed shape from shape inference.
    text = """
    g (float[N,2] x, float[2,3] gate) => (float[N,3] y, float[2,3] z) {
      t = Transpose <perm = [1, 0]> (w)
      y = MatMul (x, t)
      z = Mul (gate, t)
    }
    """
    original = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    model = make_model(text, w=original.T.copy())
    rewrite, _ = apply_constants(model)
    matmul = next(node for node in model.graph.node if node.op_type == "MatMul")
    assert rewrite.weight_tensors == [matmul.input[1]]
    assert initializer(model, matmul.input[1]).shape == (2, 3)
    filled = fill_weights(model, rewrite.weight_tensors, 1.0)
    x = np.ones((1, 2), np.float32)
    y, z = check_and_run(filled, {"x": x, "gate": np.ones((2, 3), np.float32)})
    assert np.array_equal(y, np.full((1, 3), 2.0, np.float32))
    assert np.array_equal(z, original)


def test_apply_constants_split_embedding_shared():
    # A tied embedding: two Gathers read the table, a MatMul reads its transpose. Both
    # Gathers must see one table, or equal tokens would get different embeddings.
    text = """
    g (int64[N] a, int64[N] b, float[N,4] h) => (float[N,4] ea, float[N,4] eb,
                                                 float[N,10] logits) {
      ea = Gather (table, a)
      eb = Gather (table, b)
      t = Transpose <perm = [1, 0]> (table)
      logits = MatMul (h, t)
    }
    """
    model = make_model(text, table=np.full((10, 4), 9.0, np.float32))
    rewrite, _ = apply_constants(model, seed=3)
    gathers = [node for node in model.graph.node if node.op_type == "Gather"]
    assert gathers[0].input[0] == gathers[1].input[0]
    assert len(rewrite.weight_tensors) == 1
    assert initializer(model, rewrite.weight_tensors[0]).shape == (4, 10)
    filled = fill_weights(model, rewrite.weight_tensors, 1.0)
    ids = np.arange(10, dtype=np.int64)
    feeds = {"a": ids, "b": ids, "h": np.ones((10, 4), np.float32)}
    ea, eb, logits = check_and_run(filled, feeds)
    assert np.array_equal(ea, eb)
    expected = np.random.default_rng(3).random((10, 4)).astype(np.float32)
    assert np.array_equal(ea, expected)
    assert np.array_equal(logits, np.full((10, 10), 4.0, np.float32))


def test_apply_constants_split_read_in_if_branch():
    text = """
    g (bool c, float[2,3] x, float[3,3] gate) => (float[2,3] y, float[3,3] z) {
      y = If (c) <
        then_branch = tb () => (float[2,3] t) { t = MatMul (x, w) },
        else_branch = eb () => (float[2,3] e) { e = Identity (x) }
      >
      z = Mul (gate, w)
    }
    """
    original = np.arange(9, dtype=np.float32).reshape(3, 3)
    model = make_model(text, w=original)
    rewrite, _ = apply_constants(model)
    assert rewrite.weight_tensors == ["w/weight"]
    filled = fill_weights(model, rewrite.weight_tensors, 1.0)
    feeds = {
        "c": np.array(True),
        "x": np.ones((2, 3), np.float32),
        "gate": np.ones((3, 3), np.float32),
    }
    y, z = check_and_run(filled, feeds)
    assert np.array_equal(y, np.full((2, 3), 3.0, np.float32))
    assert np.array_equal(z, original)


def test_apply_constants_constant_node_weight():
    text = """
    g (float[N,3] x) => (float[N,2] y) {
      w = Constant <value = float[3, 2] {1, 2, 3, 4, 5, 6}> ()
      y = MatMul (x, w)
    }
    """
    model = make_model(text)
    rewrite, _ = apply_constants(model)
    assert "Constant" not in op_types(model.graph)
    assert rewrite.weight_tensors == ["w"]
    filled = fill_weights(model, rewrite.weight_tensors, 3.0)
    y = check_and_run(filled, {"x": np.ones((2, 3), np.float32)})[0]
    assert np.array_equal(y, np.full((2, 2), 9.0, np.float32))


def test_apply_constants_scalar_constant_kept():
    text = """
    g (float[N,3] x) => (float[N,2] y) {
      h = MatMul (x, w)
      scale = Constant <value_float = 0.5> ()
      y = Mul (h, scale)
    }
    """
    model = make_model(text, w=np.ones((3, 2), np.float32))
    rewrite, _ = apply_constants(model)
    assert "Constant" in op_types(model.graph)
    filled = fill_weights(model, rewrite.weight_tensors, 2.0)
    y = check_and_run(filled, {"x": np.ones((1, 3), np.float32)})[0]
    assert np.array_equal(y, np.full((1, 2), 3.0, np.float32))


def test_apply_constants_embedding_uniform():
    text = """
    g (int64[5,2] tokens) => (float[5,2,4] y) { y = Gather (table, tokens) }
    """
    model = make_model(text, table=np.full((10, 4), 9.0, np.float32))
    rewrite, _ = apply_constants(model, seed=7)
    expected = np.random.default_rng(7).random((10, 4)).astype(np.float32)
    assert np.array_equal(initializer(model, "table"), expected)
    assert rewrite.weight_tensors == []


def test_apply_constants_batchnorm_shared_ones():
    text = """
    g (float[N,4,3] x) => (float[N,4,3] y) {
      s = Identity (one)
      v = Identity (one)
      y = BatchNormalization (x, s, zero, zero, v)
    }
    """
    model = make_model(text, one=np.ones(4, np.float32), zero=np.zeros(4, np.float32))
    rewrite, _ = apply_constants(model)
    assert rewrite.weight_tensors == ["one"]
    BatchNormToBatchStatistics()(model)
    filled = fill_weights(model, rewrite.weight_tensors, 2.0)
    x = _RNG.standard_normal((8, 4, 3)).astype(np.float32)
    y = check_and_run(filled, {"x": x})[0]
    values = x.astype(np.float64)
    mean = values.mean(axis=(0, 2), keepdims=True)
    variance = values.var(axis=(0, 2), keepdims=True)
    expected = 2.0 * (values - mean) / np.sqrt(variance + 1e-5)
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_apply_constants_lstm_recurrent_as_weight():
    text = """
    g (float[S,N,3] x) => (float[S,1,N,2] y) {
      y = LSTM <hidden_size = 2> (x, w, r, b, , h0)
    }
    """
    arrays = dict(
        w=np.ones((1, 8, 3), np.float32),
        r=np.ones((1, 8, 2), np.float32),
        b=np.ones((1, 16), np.float32),
        h0=np.ones((1, 4, 2), np.float32),
    )
    generic = make_model(text, **arrays)
    rewrite, _ = apply_constants(generic)
    assert rewrite.weight_tensors == ["w", "r"]
    assert np.array_equal(initializer(generic, "h0"), arrays["h0"])
    assert not initializer(generic, "b").any()
    nlp = make_model(text, **arrays)
    rewrite, _ = apply_constants(nlp, recurrent_as_weight=True)
    assert sorted(rewrite.weight_tensors) == ["b", "h0", "r", "w"]
    filled = fill_weights(nlp, rewrite.weight_tensors, 0.25)
    expected = np.full((1, 4, 2), 0.25, np.float32)
    assert np.array_equal(initializer(filled, "h0"), expected)
    check_and_run(filled, {"x": np.ones((5, 4, 3), np.float32)})


def test_apply_constants_float16_kept():
    text = "g (float16[N,3] x) => (float16[N,3] y) { y = MatMul (x, w) }"
    model = make_model(text, w=np.ones((3, 3), np.float16))
    rewrite, _ = apply_constants(model)
    filled = fill_weights(model, rewrite.weight_tensors, 0.5)
    assert initializer(filled, "w").dtype == np.float16
    y = check_and_run(filled, {"x": np.ones((1, 3), np.float16)})[0]
    assert np.array_equal(y, np.full((1, 3), 1.5, np.float16))


def test_apply_constants_unnamed_if_branches():
    # Two unnamed If nodes each hold a Constant weight in their then-branch.
    branch = """
        then_branch = t{i} () => (float[2,3] o{i}) {{
          k{i} = Constant <value = float[3,3] {{1, 2, 3, 4, 5, 6, 7, 8, 9}}> ()
          o{i} = MatMul (x, k{i})
        }},
        else_branch = e{i} () => (float[2,3] p{i}) {{ p{i} = Identity (x) }}
    """
    text = f"""
    g (bool c, float[2,3] x) => (float[2,3] y, float[2,3] z) {{
      y = If (c) < {branch.format(i=1)} >
      z = If (c) < {branch.format(i=2)} >
    }}
    """
    model = make_model(text)
    rewrite, _ = apply_constants(model)
    assert sorted(rewrite.weight_tensors) == ["k1", "k2"]
    filled = fill_weights(model, rewrite.weight_tensors, 1.0)
    feeds = {"c": np.array(True), "x": np.ones((2, 3), np.float32)}
    y, z = check_and_run(filled, feeds)
    assert np.array_equal(y, np.full((2, 3), 3.0, np.float32))
    assert np.array_equal(z, np.full((2, 3), 3.0, np.float32))


def test_apply_constants_weight_in_loop_body():
    text = """
    g (float[2,3] x) => (float[2,3] y) {
      trips = Constant <value = int64 {2}> ()
      go = Constant <value = bool {1}> ()
      y = Loop (trips, go, x) <
        body = body_graph (int64 i, bool c_in, float[2,3] h)
            => (bool c_out, float[2,3] h_out) {
          c_out = Identity (c_in)
          k = Constant <value = float[3,3] {1, 2, 3, 4, 5, 6, 7, 8, 9}> ()
          h_out = MatMul (h, k)
        }
      >
    }
    """
    model = make_model(text)
    rewrite, _ = apply_constants(model)
    assert rewrite.weight_tensors == ["k"]
    filled = fill_weights(model, rewrite.weight_tensors, 1.0)
    y = check_and_run(filled, {"x": np.ones((2, 3), np.float32)})[0]
    assert np.array_equal(y, np.full((2, 3), 9.0, np.float32))


# ExposeOutput and scored_output_name

_TWO_STAGE = """
g (float[N,4] x) => (float[N,4] y, float[N,4] z) {
  h = MatMul (x, w)
  r = Relu (h)
  y = Neg (r)
  z = Abs (x)
}
"""


def _two_stage_model() -> onnx.ModelProto:
    model = make_model(_TWO_STAGE, w=np.eye(4, dtype=np.float32))
    model.doc_string = "two-stage test model"
    helper.set_model_props(model, {"origin": "tests"})
    return model


def test_expose_output_intermediate():
    model = _two_stage_model()
    assert ExposeOutput("r")(model)
    assert [value.name for value in model.graph.output] == ["r"]
    elem_type = model.graph.output[0].type.tensor_type.elem_type
    assert elem_type == onnx.TensorProto.FLOAT
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    (r,) = check_and_run(model, {"x": x})
    assert np.array_equal(r, np.maximum(x, 0))


def test_expose_output_existing_second():
    model = _two_stage_model()
    assert ExposeOutput("z")(model)
    assert [value.name for value in model.graph.output] == ["z"]


def test_expose_output_already_only():
    model = make_model("g (float[2] x) => (float[2] y) { y = Relu (x) }")
    assert not ExposeOutput("y")(model)


def test_scored_output_name_default_first():
    assert scored_output_name(_two_stage_model(), None) == "y"


def test_scored_output_name_intermediate():
    assert scored_output_name(_two_stage_model(), "h") == "h"


def test_scored_output_name_unknown_lists_outputs():
    with pytest.raises(UnknownOutputError) as caught:
        scored_output_name(_two_stage_model(), "hh")
    message = str(caught.value)
    assert "output 'hh' not found in the model" in message
    assert "graph outputs are 'y', 'z'" in message
    assert "4 node outputs of the main graph" in message
    assert "Did you mean 'h'" in message


def test_scored_output_name_unknown_no_suggestion():
    with pytest.raises(
        UnknownOutputError, match=r"node outputs of the main graph can be scored\.$"
    ):
        scored_output_name(_two_stage_model(), "logits_of_something_else")


def test_scored_output_name_no_outputs():
    model = _two_stage_model()
    del model.graph.output[:]
    with pytest.raises(OnnxepsError, match="no graph outputs"):
        scored_output_name(model, None)


# PruneUnused

def test_prune_unused_keeps_metadata():
    model = _two_stage_model()
    ExposeOutput("r")(model)
    assert PruneUnused()(model)
    assert op_types(model.graph) == ["MatMul", "Relu"]
    assert model.doc_string == "two-stage test model"
    assert {p.key: p.value for p in model.metadata_props} == {"origin": "tests"}
    assert [entry.version for entry in model.opset_import] == [17]
    check_and_run(model, {"x": np.ones((1, 4), np.float32)})


def test_prune_unused_with_subgraph_keeps_metadata():
    # A graph with an If body takes the onnx-graphsurgeon route, which drops metadata.
    text = """
    g (bool c, float[2,3] x) => (float[2,3] y) {
      unused = Neg (x)
      y = If (c) <
        then_branch = tb () => (float[2,3] t) { t = MatMul (x, w) },
        else_branch = eb () => (float[2,3] e) { e = Identity (x) }
      >
    }
    """
    model = make_model(text, w=np.eye(3, dtype=np.float32))
    model.doc_string = "model with a branch"
    helper.set_model_props(model, {"origin": "tests"})
    assert PruneUnused()(model)
    assert op_types(model.graph) == ["If"]
    # onnx-graphsurgeon moves an initializer read only by one body into that body.
    initializers = [t.name for ref in iter_graphs(model) for t in ref.graph.initializer]
    assert initializers == ["w"]
    assert model.doc_string == "model with a branch"
    assert {p.key: p.value for p in model.metadata_props} == {"origin": "tests"}
    feeds = {"c": np.array(True), "x": np.ones((2, 3), np.float32)}
    assert np.array_equal(check_and_run(model, feeds)[0], np.ones((2, 3), np.float32))


def test_prune_unused_drops_initializers():
    text = """
    g (float[N,4] x) => (float[N,4] y) {
      unused = MatMul (x, w2)
      y = MatMul (x, w)
    }
    """
    identity = np.eye(4, dtype=np.float32)
    model = make_model(text, w=identity, w2=identity)
    assert PruneUnused()(model)
    assert [t.name for t in model.graph.initializer] == ["w"]


def test_prune_unused_nothing_returns_false():
    model = make_model("g (float[2] x) => (float[2] y) { y = Relu (x) }")
    assert not PruneUnused()(model)


# run_passes and NameScope


class _Failing:
    name = "failing"

    def __call__(self, model):
        raise KeyError("boom")


class _UserError:
    name = "user-error"

    def __call__(self, model):
        raise RewriteError("a user-facing problem.")


def test_run_passes_names_changed():
    model = _two_stage_model()
    changed = run_passes(model, [RemoveDropout(), ExposeOutput("r"), PruneUnused()])
    assert changed == ["expose-output", "prune-unused"]


def test_run_passes_failure_names_pass():
    model = _two_stage_model()
    with pytest.raises(
        RewriteError,
        match=r"rewrite pass failing failed after remove-dropout, expose-output: "
        r"KeyError: 'boom'",
    ):
        run_passes(model, [RemoveDropout(), ExposeOutput("r"), _Failing()])


def test_run_passes_user_error_unchanged():
    with pytest.raises(RewriteError, match=r"^a user-facing problem\.$"):
        run_passes(_two_stage_model(), [_UserError()])


def test_name_scope_fresh_avoids_clashes():
    names = NameScope(_two_stage_model())
    assert names.fresh("h") == "h_1"
    assert names.fresh("h") == "h_2"
    assert names.fresh("new") == "new"
    assert names.fresh("w") == "w_1"


def test_plan_action_weight_present():
    # Guards the fixture of the ApplyConstants tests: the Conv plan has one weight.
    plan = build_plan(_conv_model())
    assert [entry.tensor for entry in plan.with_action(Action.WEIGHT)] == ["w"]
