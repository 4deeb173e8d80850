"""Tests of the planner on tiny models written as ONNX text."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxeps.plan import ROLE_HINTS_KEY, Plan, PlanEntry, build_plan
from onnxeps.roles import Action, Role

_HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def make_model(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    """Parse an ONNX text graph (header added), append initializers, check the model."""
    model = onnx.parser.parse_model(_HEADER + text)
    for name, array in initializers.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def entries_of(plan: Plan, tensor: str) -> list[PlanEntry]:
    return [entry for entry in plan.entries if entry.tensor == tensor]


def only_entry(plan: Plan, tensor: str) -> PlanEntry:
    found = entries_of(plan, tensor)
    assert len(found) == 1, [e.record() for e in found]
    return found[0]


def roles_of(plan: Plan, tensor: str) -> dict[Role, Action]:
    return {entry.role: entry.action for entry in entries_of(plan, tensor)}


def ones(*shape: int, dtype=np.float32) -> np.ndarray:
    return np.ones(shape, dtype=dtype)


_CONV = """
g (float[N,3,8,8] x) => (float[N,4,8,8] y) {
  y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
}
"""


def test_plan_conv_weight_and_bias():
    plan = build_plan(make_model(_CONV, w=ones(4, 3, 3, 3), b=ones(4)))
    weight = only_entry(plan, "w")
    bias = only_entry(plan, "b")
    assert weight.role is Role.WEIGHT
    assert weight.action is Action.WEIGHT
    assert weight.reason == "Conv input 1 (W)"
    assert weight.shape == (4, 3, 3, 3)
    assert weight.dtype == "float32"
    assert weight.source == "initializer"
    assert weight.graph == "main"
    assert bias.role is Role.BIAS
    assert bias.action is Action.ZERO
    assert bias.reason == "Conv input 2 (B)"


def test_plan_record_keys_in_order():
    plan = build_plan(make_model(_CONV, w=ones(4, 3, 3, 3), b=ones(4)))
    record = only_entry(plan, "w").record()
    assert list(record) == [
        "tensor", "graph", "source", "shape", "dtype", "role", "action", "reason",
        "split",
    ]  # fmt: skip
    assert record["shape"] == [4, 3, 3, 3]
    assert record["role"] == "weight"
    assert record["action"] == "set to w"
    assert record["split"] is False


def test_plan_conv_bias_warns_folded_normalisation():
    plan = build_plan(make_model(_CONV, w=ones(4, 3, 3, 3), b=ones(4)))
    assert any("was folded into the convolutions" in warning for warning in plan.warnings)


def test_plan_conv_without_bias_no_folded_warning():
    text = """
    g (float[N,3,8,8] x) => (float[N,4,8,8] y) { y = Conv <pads = [1, 1, 1, 1]> (x, w) }
    """
    plan = build_plan(make_model(text, w=ones(4, 3, 3, 3)))
    assert plan.warnings == []


def test_plan_conv_bias_with_batchnorm_no_folded_warning():
    text = """
    g (float[N,3,8,8] x) => (float[N,4,8,8] y) {
      c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
      y = BatchNormalization (c, s, sh, m, v)
    }
    """
    model = make_model(
        text, w=ones(4, 3, 3, 3), b=ones(4), s=ones(4), sh=ones(4), m=ones(4), v=ones(4)
    )
    plan = build_plan(model)
    assert not any("folded" in warning for warning in plan.warnings)


def test_plan_gemm_slots():
    text = "g (float[N,3] x) => (float[N,5] y) { y = Gemm <transB = 1> (x, w, b) }"
    plan = build_plan(make_model(text, w=ones(5, 3), b=ones(5)))
    assert roles_of(plan, "w") == {Role.WEIGHT: Action.WEIGHT}
    assert roles_of(plan, "b") == {Role.BIAS: Action.ZERO}
    assert only_entry(plan, "w").reason == "Gemm input 1 (B)"
    assert only_entry(plan, "b").reason == "Gemm input 2 (C)"


def test_plan_matmul_add_bias():
    text = """
    g (float[N,3] x) => (float[N,5] y) {
      h = MatMul (x, w)
      y = Add (h, b)
    }
    """
    plan = build_plan(make_model(text, w=ones(3, 5), b=ones(5)))
    assert roles_of(plan, "w") == {Role.WEIGHT: Action.WEIGHT}
    assert only_entry(plan, "b").role is Role.BIAS
    assert only_entry(plan, "b").reason == "Add after MatMul"


def test_plan_bias_first_operand():
    text = """
    g (float[N,3] x) => (float[N,5] y) {
      h = MatMul (x, w)
      y = Add (b, h)
    }
    """
    plan = build_plan(make_model(text, w=ones(3, 5), b=ones(5)))
    assert only_entry(plan, "b").role is Role.BIAS


def test_plan_add_without_linear_unknown():
    text = """
    g (float[N,5] x) => (float[N,5] y) {
      r = Relu (x)
      y = Add (r, b)
    }
    """
    plan = build_plan(make_model(text, b=ones(5)))
    entry = only_entry(plan, "b")
    assert entry.role is Role.UNKNOWN
    assert entry.action is Action.KEEP
    assert entry.reason == "non-scalar constant in Add"
    assert (
        "unclassified tensor 'b' (non-scalar constant in Add) kept as it is"
        in plan.warnings
    )
    assert plan.unclassified() == [entry]


def test_plan_batchnorm_shared_through_identity():
    # Exporters may feed one ones-tensor to every scale and variance and one
    # zeros-tensor to every shift and mean, through Identity nodes.
    text = """
    g (float[N,4,8,8] x) => (float[N,4,8,8] y) {
      s1 = Identity (one)
      v1 = Identity (one)
      b1 = Identity (zero)
      m1 = Identity (zero)
      h = BatchNormalization (x, s1, b1, m1, v1)
      s2 = Identity (one)
      v2 = Identity (one)
      b2 = Identity (zero)
      m2 = Identity (zero)
      y = BatchNormalization (h, s2, b2, m2, v2)
    }
    """
    plan = build_plan(make_model(text, one=ones(4), zero=np.zeros(4, np.float32)))
    assert roles_of(plan, "one") == {
        Role.NORM_SCALE: Action.WEIGHT,
        Role.NORM_STAT: Action.UNUSED,
    }
    assert roles_of(plan, "zero") == {
        Role.NORM_SHIFT: Action.ZERO,
        Role.NORM_STAT: Action.UNUSED,
    }
    # Statistics are unused, so one acting role remains and no split is needed.
    assert not any(entry.split for entry in plan.entries)
    scale = next(e for e in entries_of(plan, "one") if e.role is Role.NORM_SCALE)
    assert len(scale.uses) == 2
    assert scale.reason == "BatchNormalization input 1 (scale)"


def test_plan_conv_weight_and_mul_split():
    text = """
    g (float[N,3,8,8] x, float[4,3,3,3] gate) => (float[N,4,8,8] y, float[4,3,3,3] z) {
      y = Conv <pads = [1, 1, 1, 1]> (x, w)
      z = Mul (gate, w)
    }
    """
    plan = build_plan(make_model(text, w=ones(4, 3, 3, 3)))
    found = entries_of(plan, "w")
    assert {entry.role for entry in found} == {Role.WEIGHT, Role.UNKNOWN}
    assert all(entry.split for entry in found)
    weight = next(entry for entry in found if entry.role is Role.WEIGHT)
    assert weight.action is Action.WEIGHT
    assert [use.use.node.op_type for use in weight.uses] == ["Conv"]
    assert any("unclassified tensor 'w'" in warning for warning in plan.warnings)


def test_plan_constant_node_weight():
    text = """
    g (float[N,3] x) => (float[N,2] y) {
      w = Constant <value = float[3, 2] {1, 2, 3, 4, 5, 6}> ()
      y = MatMul (x, w)
    }
    """
    plan = build_plan(make_model(text))
    entry = only_entry(plan, "w")
    assert entry.role is Role.WEIGHT
    assert entry.source == "Constant node 'w'"
    assert entry.shape == (3, 2)
    assert entry.dtype == "float32"


def test_plan_named_constant_node_source():
    model = make_model(
        """
        g (float[N,3] x) => (float[N,2] y) {
          w = Constant <value = float[3, 2] {1, 2, 3, 4, 5, 6}> ()
          y = MatMul (x, w)
        }
        """
    )
    model.graph.node[0].name = "const_w"
    plan = build_plan(model)
    assert only_entry(plan, "w").source == "Constant node 'const_w'"


def test_plan_scalar_constant_in_mul_kept():
    # An attention scale: a scalar float Constant in the data path.
    text = """
    g (float[N,4] q, float[4,N] k) => (float[N,N] y) {
      s = MatMul (q, k)
      scale = Constant <value_float = 0.5> ()
      y = Mul (s, scale)
    }
    """
    plan = build_plan(make_model(text))
    entry = only_entry(plan, "scale")
    assert entry.role is Role.KEEP
    assert entry.action is Action.KEEP
    assert entry.reason == "scalar in Mul"
    assert entry.shape == ()


def test_plan_one_element_tensor_in_div_kept():
    text = """
    g (float[N,4] x) => (float[N,4] y) { y = Div (x, c) }
    """
    plan = build_plan(make_model(text, c=np.full((1, 1), 8.0, np.float32)))
    assert only_entry(plan, "c").role is Role.KEEP
    assert only_entry(plan, "c").reason == "scalar in Div"


def test_plan_value_floats_constant():
    text = """
    g (float[N,3] x) => (float[N,3] y) {
      c = Constant <value_floats = [1.0, 2.0, 3.0]> ()
      y = Mul (x, c)
    }
    """
    plan = build_plan(make_model(text))
    entry = only_entry(plan, "c")
    assert entry.shape == (3,)
    assert entry.role is Role.UNKNOWN


def test_plan_resize_scales_kept():
    text = """
    g (float[1,3,4,4] x) => (float[1,3,8,8] y) {
      y = Resize <mode = "nearest"> (x, roi, scales)
    }
    """
    model = make_model(
        text,
        roi=np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32),
        scales=np.array([1, 1, 2, 2], np.float32),
    )
    plan = build_plan(model)
    assert only_entry(plan, "scales").role is Role.KEEP
    assert only_entry(plan, "scales").reason == "Resize scales"
    assert only_entry(plan, "roi").reason == "Resize region of interest"
    assert plan.warnings == []


def test_plan_clip_bounds_kept():
    text = "g (float[N,4] x) => (float[N,4] y) { y = Clip (x, lo, hi) }"
    model = make_model(text, lo=np.float32(0.0), hi=np.float32(6.0))
    plan = build_plan(model)
    assert roles_of(plan, "lo") == {Role.KEEP: Action.KEEP}
    assert only_entry(plan, "hi").reason == "Clip bound"


def test_plan_gather_embedding():
    text = """
    g (int64[S,N] tokens) => (float[S,N,4] y) { y = Gather (table, tokens) }
    """
    plan = build_plan(make_model(text, table=ones(10, 4)))
    entry = only_entry(plan, "table")
    assert entry.role is Role.EMBEDDING
    assert entry.action is Action.UNIFORM
    assert entry.reason == "Gather input 0 (data)"


def test_plan_gather_constant_indices_passes_through():
    # Gather with constant indices selects rows of a weight, so the role comes from
    # the consumer of the selected rows.
    text = """
    g (float[N,4] x) => (float[N,2] y) {
      rows = Gather (w, index)
      y = MatMul (x, rows)
    }
    """
    model = make_model(text, w=ones(6, 2), index=np.array([0, 2, 3, 5], np.int64))
    plan = build_plan(model)
    assert roles_of(plan, "w") == {Role.WEIGHT: Action.WEIGHT}
    assert only_entry(plan, "w").reason == "MatMul input 1 (B)"
    assert entries_of(plan, "index") == []


_LSTM = """
g (float[S,N,3] x) => (float[S,1,N,2] y) {
  y = LSTM <hidden_size = 2> (x, w, r, b, , h0, c0, p)
}
"""


def _lstm_model() -> onnx.ModelProto:
    return make_model(
        _LSTM,
        w=ones(1, 8, 3),
        r=ones(1, 8, 2),
        b=ones(1, 16),
        h0=ones(1, 4, 2),
        c0=ones(1, 4, 2),
        p=ones(1, 6),
    )


def test_plan_lstm_slots():
    plan = build_plan(_lstm_model())
    expected = {
        "w": (Role.RECURRENT_WEIGHT, Action.WEIGHT, "LSTM input 1 (W)"),
        "r": (Role.RECURRENT_WEIGHT, Action.WEIGHT, "LSTM input 2 (R)"),
        "b": (Role.RECURRENT_BIAS, Action.ZERO, "LSTM input 3 (B)"),
        "h0": (Role.RECURRENT_STATE, Action.KEEP, "LSTM input 5 (initial_h)"),
        "c0": (Role.RECURRENT_STATE, Action.KEEP, "LSTM input 6 (initial_c)"),
        "p": (Role.RECURRENT_WEIGHT, Action.WEIGHT, "LSTM input 7 (P)"),
    }
    for name, (role, action, reason) in expected.items():
        entry = only_entry(plan, name)
        assert entry.role is role, name
        assert entry.action is action, name
        assert entry.reason == reason, name


def test_plan_lstm_recurrent_as_weight():
    plan = build_plan(_lstm_model(), recurrent_as_weight=True)
    assert plan.recurrent_as_weight
    assert only_entry(plan, "b").action is Action.WEIGHT
    assert only_entry(plan, "h0").action is Action.WEIGHT
    assert only_entry(plan, "c0").action is Action.WEIGHT
    assert only_entry(plan, "w").action is Action.WEIGHT
    assert only_entry(plan, "b").role is Role.RECURRENT_BIAS


def test_plan_gru_slots():
    text = """
    g (float[S,N,3] x) => (float[S,1,N,2] y) {
      y = GRU <hidden_size = 2> (x, w, r, b, , h0)
    }
    """
    model = make_model(
        text, w=ones(1, 6, 3), r=ones(1, 6, 2), b=ones(1, 12), h0=ones(1, 4, 2)
    )
    plan = build_plan(model)
    assert roles_of(plan, "w") == {Role.RECURRENT_WEIGHT: Action.WEIGHT}
    assert roles_of(plan, "r") == {Role.RECURRENT_WEIGHT: Action.WEIGHT}
    assert roles_of(plan, "b") == {Role.RECURRENT_BIAS: Action.ZERO}
    assert roles_of(plan, "h0") == {Role.RECURRENT_STATE: Action.KEEP}
    generic = build_plan(model, recurrent_as_weight=True)
    assert roles_of(generic, "b") == {Role.RECURRENT_BIAS: Action.WEIGHT}
    assert roles_of(generic, "h0") == {Role.RECURRENT_STATE: Action.WEIGHT}


def test_plan_if_body_reads_outer_weight():
    text = """
    g (bool c, float[2,3] x) => (float[2,3] y) {
      y = If (c) <
        then_branch = then_graph () => (float[2,3] t) { t = MatMul (x, w) },
        else_branch = else_graph () => (float[2,3] e) { e = Identity (x) }
      >
    }
    """
    model = make_model(text, w=ones(3, 3))
    model.graph.node[0].name = "branch"
    plan = build_plan(model)
    entry = only_entry(plan, "w")
    assert entry.role is Role.WEIGHT
    assert entry.graph == "main"
    assert [use.use.graph_path for use in entry.uses] == ["main/branch.then_branch"]


def test_plan_constant_inside_if_branch():
    text = """
    g (bool c, float[2,3] x) => (float[2,3] y) {
      y = If (c) <
        then_branch = then_graph () => (float[2,3] t) {
          k = Constant <value = float[3,3] {1, 2, 3, 4, 5, 6, 7, 8, 9}> ()
          t = MatMul (x, k)
        },
        else_branch = else_graph () => (float[2,3] e) { e = Identity (x) }
      >
    }
    """
    plan = build_plan(make_model(text))
    entry = only_entry(plan, "k")
    assert entry.role is Role.WEIGHT
    assert entry.graph == "main/If#0.then_branch"


def test_plan_unnamed_if_paths_unique():
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
    plan = build_plan(make_model(text))
    first = only_entry(plan, "k1").graph
    second = only_entry(plan, "k2").graph
    assert first != second
    assert first == "main/If#0.then_branch"
    assert second == "main/If#1.then_branch"


def test_plan_weight_returned_by_if():
    # The branches return the weight itself; the MatMul after the If reads it.
    text = """
    g (bool c, float[2,3] x) => (float[2,3] y) {
      k = If (c) <
        then_branch = then_graph () => (float[3,3] t) { t = Identity (w) },
        else_branch = else_graph () => (float[3,3] e) { e = Identity (w) }
      >
      y = MatMul (x, k)
    }
    """
    plan = build_plan(make_model(text, w=ones(3, 3)))
    assert roles_of(plan, "w") == {Role.WEIGHT: Action.WEIGHT}


_LOOP = """
g (float[2,3] x) => (float[2,3] y) {
  trips = Constant <value = int64 {2}> ()
  go = Constant <value = bool {1}> ()
  y = Loop (trips, go, x) <
    body = body_graph (int64 i, bool c_in, float[2,3] h)
        => (bool c_out, float[2,3] h_out) {
      c_out = Identity (c_in)
      h_out = MatMul (h, w)
    }
  >
}
"""


def test_plan_loop_body_reads_outer_weight():
    plan = build_plan(make_model(_LOOP, w=ones(3, 3)))
    entry = only_entry(plan, "w")
    assert entry.role is Role.WEIGHT
    assert entry.uses[0].use.graph_path == "main/Loop#2.body"


def test_plan_loop_carried_weight():
    text = """
    g (float[2,3] x) => (float[2,3] y, float[3,3] w_final) {
      trips = Constant <value = int64 {2}> ()
      go = Constant <value = bool {1}> ()
      y, w_final = Loop (trips, go, x, w) <
        body = body_graph (int64 i, bool c_in, float[2,3] h, float[3,3] w_in)
            => (bool c_out, float[2,3] h_out, float[3,3] w_out) {
          c_out = Identity (c_in)
          h_out = MatMul (h, w_in)
          w_out = Identity (w_in)
        }
      >
    }
    """
    plan = build_plan(make_model(text, w=ones(3, 3)))
    assert roles_of(plan, "w") == {Role.WEIGHT: Action.WEIGHT}
    assert only_entry(plan, "w").reason == "MatMul input 1 (B)"


def test_plan_loop_trip_count_not_listed():
    plan = build_plan(make_model(_LOOP, w=ones(3, 3)))
    assert entries_of(plan, "trips") == []
    assert entries_of(plan, "go") == []


def test_plan_scan_body_weights():
    text = """
    g (float[3] h0, float[5,3] xs) => (float[3] h, float[5,3] ys) {
      h, ys = Scan <
        num_scan_inputs = 1,
        body = step (float[3] h_in, float[3] x_t) => (float[3] h_out, float[3] y_t) {
          s = Add (h_in, x_t)
          h_out = MatMul (s, w)
          y_t = MatMul (h_out, v)
        }
      > (h0, xs)
    }
    """
    model = make_model(text, w=ones(3, 3), v=ones(3, 3))
    plan = build_plan(model)
    assert roles_of(plan, "w") == {Role.WEIGHT: Action.WEIGHT}
    assert roles_of(plan, "v") == {Role.WEIGHT: Action.WEIGHT}


def test_plan_scan_state_input_followed():
    text = """
    g (float[5,3] xs) => (float[3,3] w_last, float[5,3] ys) {
      w_last, ys = Scan <
        num_scan_inputs = 1,
        body = step (float[3,3] w_in, float[3] x_t)
            => (float[3,3] w_out, float[3] y_t) {
          w_out = Identity (w_in)
          y_t = MatMul (x_t, w_in)
        }
      > (w, xs)
    }
    """
    plan = build_plan(make_model(text, w=ones(3, 3)))
    assert roles_of(plan, "w") == {Role.WEIGHT: Action.WEIGHT}


def test_plan_dequantize_int8_weight_quantized():
    text = """
    g (float[N,3] x) => (float[N,3] y) {
      wf = DequantizeLinear (wq, scale, zero)
      y = MatMul (x, wf)
    }
    """
    model = make_model(
        text, wq=np.ones((3, 3), np.int8), scale=np.float32(0.1), zero=np.int8(0)
    )
    model.graph.node[0].name = "dq_w"
    plan = build_plan(model)
    assert plan.quantized == ["DequantizeLinear 'dq_w'"]
    assert only_entry(plan, "scale").reason == "quantisation scale"
    assert entries_of(plan, "wq") == []


def test_plan_dequantize_activation_not_quantized():
    text = """
    g (int8[N,3] xq) => (float[N,3] y) {
      xf = DequantizeLinear (xq, scale)
      y = MatMul (xf, w)
    }
    """
    plan = build_plan(make_model(text, scale=np.float32(0.1), w=ones(3, 3)))
    assert plan.quantized == []


def test_plan_qlinearconv_quantized():
    text = """
    g (uint8[1,1,4,4] x) => (uint8[1,1,4,4] y) {
      y = QLinearConv <pads = [1, 1, 1, 1]> (x, xs, xz, w, ws, wz, ys, yz)
    }
    """
    model = make_model(
        text,
        xs=np.float32(0.1),
        xz=np.uint8(0),
        w=np.ones((1, 1, 3, 3), np.uint8),
        ws=np.float32(0.1),
        wz=np.uint8(0),
        ys=np.float32(0.1),
        yz=np.uint8(0),
    )
    model.graph.node[0].name = "qconv"
    plan = build_plan(model)
    assert plan.quantized == ["QLinearConv 'qconv'"]


def _hinted_model(hints: str) -> onnx.ModelProto:
    text = "g (float[N,3] x) => (float[N,3] y) { y = MatMul (x, w) }"
    model = make_model(text, w=ones(3, 3))
    helper.set_model_props(model, {ROLE_HINTS_KEY: hints})
    return model


def test_plan_role_hint_overrides_table():
    plan = build_plan(_hinted_model(json.dumps({"w": "embedding"})))
    entry = only_entry(plan, "w")
    assert entry.role is Role.EMBEDDING
    assert entry.action is Action.UNIFORM
    assert entry.reason == "role hint in model metadata"
    assert plan.warnings == []


def test_plan_role_hint_recurrent_as_weight():
    model = _hinted_model(json.dumps({"w": "recurrent_state"}))
    assert only_entry(build_plan(model), "w").action is Action.KEEP
    assert only_entry(build_plan(model, True), "w").action is Action.WEIGHT


def test_plan_role_hint_invalid_json_warns():
    plan = build_plan(_hinted_model("{not json"))
    assert only_entry(plan, "w").role is Role.WEIGHT
    assert len(plan.warnings) == 1
    assert plan.warnings[0].startswith(
        f"ignored role hints in metadata '{ROLE_HINTS_KEY}': "
    )


def test_plan_role_hint_not_object_warns():
    plan = build_plan(_hinted_model(json.dumps(["w", "weight"])))
    assert plan.warnings == [
        f"ignored role hints in metadata '{ROLE_HINTS_KEY}': not an object"
    ]


def test_plan_role_hint_unknown_role_warns():
    plan = build_plan(_hinted_model(json.dumps({"w": "kernel"})))
    assert only_entry(plan, "w").role is Role.WEIGHT
    assert plan.warnings == ["ignored role hint 'kernel' for tensor 'w'"]


def test_plan_role_hint_unknown_tensor_warns():
    plan = build_plan(_hinted_model(json.dumps({"w_typo": "weight"})))
    assert plan.warnings == [
        "ignored role hint for 'w_typo': the model has no floating-point constant "
        "of that name"
    ]


def test_plan_custom_operator_unknown():
    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>\n'
        "g (float[N,3] x) => (float[N,3] y) { y = com.example.Scale (x, w) }"
    )
    model.graph.initializer.append(numpy_helper.from_array(ones(3), "w"))
    plan = build_plan(model)
    entry = only_entry(plan, "w")
    assert entry.role is Role.UNKNOWN
    assert entry.reason == "custom operator com.example.Scale"
    assert any("unclassified tensor 'w'" in warning for warning in plan.warnings)


def test_plan_operator_without_rule_unknown():
    text = "g (float[N,3] x) => (float[N,3] y) { y = PRelu (x, slope) }"
    plan = build_plan(make_model(text, slope=ones(3)))
    assert only_entry(plan, "slope").role is Role.KEEP
    text = """
    g (float[N,3] x) => (float[N,3] y) { y = Einsum <equation = "ij,jk->ik"> (x, w) }
    """
    plan = build_plan(make_model(text, w=ones(3, 3)))
    assert only_entry(plan, "w").role is Role.UNKNOWN
    assert only_entry(plan, "w").reason == "no rule for Einsum input 1"


def test_plan_shape_only_use_kept():
    text = """
    g (float[N,3] x) => (int64[2] y) { y = Shape (w) }
    """
    plan = build_plan(make_model(text, w=ones(3, 3)))
    entry = only_entry(plan, "w")
    assert entry.role is Role.KEEP
    assert entry.reason == "not read by any operator"


def test_plan_integer_initializers_not_listed():
    text = """
    g (float[N,6] x) => (float[N,2,3] y) { y = Reshape (x, shape) }
    """
    plan = build_plan(make_model(text, shape=np.array([-1, 2, 3], np.int64)))
    assert plan.entries == []


def test_plan_float16_dtype():
    text = "g (float16[N,3] x) => (float16[N,3] y) { y = MatMul (x, w) }"
    plan = build_plan(make_model(text, w=ones(3, 3, dtype=np.float16)))
    assert only_entry(plan, "w").dtype == "float16"


def test_plan_pass_through_chain():
    text = """
    g (float[N,6] x) => (float[N,2] y) {
      t = Transpose <perm = [1, 0]> (w)
      c = Cast <to = 1> (t)
      r = Reshape (c, shape)
      y = MatMul (x, r)
    }
    """
    model = make_model(
        text, w=ones(2, 6, dtype=np.float64), shape=np.array([6, 2], np.int64)
    )
    plan = build_plan(model)
    entry = only_entry(plan, "w")
    assert entry.role is Role.WEIGHT
    assert entry.dtype == "float64"


def test_plan_random_operator_warns():
    text = """
    g (float[N,3] x) => (float[N,3] y) { n = RandomNormalLike (x) y = Add (x, n) }
    """
    plan = build_plan(make_model(text))
    assert any("RandomNormalLike" in warning for warning in plan.warnings)


def test_plan_does_not_modify_model():
    model = make_model(_CONV, w=ones(4, 3, 3, 3), b=ones(4))
    before = model.SerializeToString()
    build_plan(model)
    assert model.SerializeToString() == before


def test_plan_loop_updated_state_kept():
    # The body updates h from its initial value h0, so h0 is a recurrent state, not a
    # MatMul weight, although the body multiplies it (as Keras GRU exports do).
    text = """
    g (float[2,3] x) => (float[2,3] y) {
      trips = Constant <value = int64 {2}> ()
      go = Constant <value = bool {1}> ()
      y = Loop (trips, go, h0) <
        body = body_graph (int64 i, bool c_in, float[2,3] h)
            => (bool c_out, float[2,3] h_out) {
          c_out = Identity (c_in)
          h_out = MatMul (h, w)
        }
      >
    }
    """
    plan = build_plan(make_model(text, w=ones(3, 3), h0=ones(2, 3)))
    assert roles_of(plan, "h0") == {Role.RECURRENT_STATE: Action.KEEP}
    assert roles_of(plan, "w") == {Role.WEIGHT: Action.WEIGHT}
    nlp = build_plan(make_model(text, w=ones(3, 3), h0=ones(2, 3)), recurrent_as_weight=True)
    assert roles_of(nlp, "h0") == {Role.RECURRENT_STATE: Action.WEIGHT}
