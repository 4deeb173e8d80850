"""Tests of the parameter count and MAC count against hand counts and NB201 data."""

from __future__ import annotations

import csv

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxeps.converters import nb201
from onnxeps.cost import count_macs, model_costs, parameter_count
from onnxeps.plan import build_plan

CLASSES = 10
IMAGE = {"input": (1, 3, 32, 32)}
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
ALL_CONV3X3 = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|"
    "+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
)
# Node 1 = conv3(n0), read only through none edges, so its convolution is computed but
# unused. Node 2 = conv1(n0) and node 3 = n0 + conv3(n2): two 3x3 and one 1x1
# convolution per cell.
MIXED = (
    "|nor_conv_3x3~0|+|nor_conv_1x1~0|none~1|"
    "+|skip_connect~0|none~1|nor_conv_3x3~2|"
)
PARAMS_SAMPLE = 24
PARAMS_SEED = 7


# ----- hand count of the NB201 network at one 32x32 image -----
# A convolution costs (output elements) x (C_in / group) x (kernel area) MACs.

STEM = 32 * 32 * 16 * (3 * 3 * 3)  # 3 -> 16 channels, 3x3, 32x32 output
# A cell convolution keeps C channels at H x W. C * H * W is 16*32*32 = 32*16*16 =
# 64*8*8 = 16,384 in each stage, so each stage costs the same per convolution.
CELL_CONV3X3 = 16 * 32 * 32 * (16 * 3 * 3)
CELL_CONV1X1 = 16 * 32 * 32 * 16
# Reduction blocks: 3x3 stride-2 conv_a, 3x3 conv_b, and a 1x1 shortcut conv after a
# 2x2 average pool, all at the halved resolution.
REDUCTION_1 = (
    16 * 16 * 32 * (16 * 3 * 3)  # conv_a: 16 -> 32, output 16x16
    + 16 * 16 * 32 * (32 * 3 * 3)  # conv_b: 32 -> 32
    + 16 * 16 * 32 * 16  # shortcut: 16 -> 32, 1x1
)
REDUCTION_2 = (
    8 * 8 * 64 * (32 * 3 * 3)  # conv_a: 32 -> 64, output 8x8
    + 8 * 8 * 64 * (64 * 3 * 3)  # conv_b: 64 -> 64
    + 8 * 8 * 64 * 32  # shortcut: 32 -> 64, 1x1
)
CLASSIFIER = 64 * CLASSES
FIXED = STEM + REDUCTION_1 + REDUCTION_2 + CLASSIFIER
CELLS = 15


def uniform_cell(op: str) -> str:
    return f"|{op}~0|+|{op}~0|{op}~1|+|{op}~0|{op}~1|{op}~2|"


def nb201_macs(arch_str: str) -> int:
    macs, uncounted = count_macs(nb201.build(arch_str, num_classes=CLASSES), IMAGE)
    assert uncounted == []
    return macs


def test_hand_count_constants():
    # The totals of the hand count, spelled out for a reader checking the arithmetic.
    assert STEM == 442_368
    assert CELL_CONV3X3 == 2_359_296
    assert CELL_CONV1X1 == 262_144
    assert REDUCTION_1 == 3_670_016
    assert REDUCTION_2 == 3_670_016
    assert FIXED == 7_783_040


def test_macs_nb201_all_none():
    assert nb201_macs(ALL_NONE) == FIXED


def test_macs_nb201_all_conv3x3():
    expected = FIXED + CELLS * 6 * CELL_CONV3X3
    assert expected == 220_119_680
    assert nb201_macs(ALL_CONV3X3) == expected


def test_macs_nb201_all_conv1x1():
    assert nb201_macs(uniform_cell("nor_conv_1x1")) == FIXED + CELLS * 6 * CELL_CONV1X1


def test_macs_nb201_mixed():
    # The unused conv on edge 0->1 is still in the graph, as in the benchmark network.
    expected = FIXED + CELLS * (2 * CELL_CONV3X3 + CELL_CONV1X1)
    assert nb201_macs(MIXED) == expected


def test_macs_nb201_pooling_not_counted():
    assert nb201_macs(uniform_cell("avg_pool_3x3")) == FIXED
    assert nb201_macs(uniform_cell("skip_connect")) == FIXED


def test_params_nb201_all_none_hand_count():
    model = nb201.build(ALL_NONE, num_classes=CLASSES)
    bn = 2  # scale and shift per channel (running statistics are not parameters)
    stem = 3 * 16 * 9 + bn * 16
    reduction_1 = 16 * 32 * 9 + bn * 32 + 32 * 32 * 9 + bn * 32 + 16 * 32
    reduction_2 = 32 * 64 * 9 + bn * 64 + 64 * 64 * 9 + bn * 64 + 32 * 64
    head = bn * 64 + 64 * CLASSES + CLASSES
    assert parameter_count(build_plan(model)) == stem + reduction_1 + reduction_2 + head


def test_params_nb201_match_csv(data_dir):
    with open(data_dir / "nb201" / "nb201_accuracy.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    # 199 rows hold non-integer counts, averages that include another cell's count, so
    # the sample is drawn from the rows with whole counts.
    listed = [float(row["params_m"]) * 1e6 for row in rows]
    whole = [
        row for row, count in zip(rows, listed) if abs(count - round(count)) < 0.01
    ]
    rng = np.random.default_rng(PARAMS_SEED)
    chosen = [whole[i] for i in rng.choice(len(whole), PARAMS_SAMPLE, replace=False)]
    for row in chosen:
        model = nb201.build(row["arch_str"], num_classes=CLASSES)
        counted = parameter_count(build_plan(model))
        # params_m has six decimals, so a whole count is exact to half a parameter.
        assert abs(counted - float(row["params_m"]) * 1e6) <= 0.5, row["arch_str"]


def test_model_costs_nb201():
    model = nb201.build(MIXED, num_classes=CLASSES)
    plan = build_plan(model)
    costs = model_costs(model, plan, IMAGE)
    assert costs.macs == nb201_macs(MIXED)
    assert costs.params == parameter_count(plan)
    assert costs.uncounted == []


# ----- inline models -----


def make_model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "inline", inputs, outputs, initializer=initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def constant(name: str, shape) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full(shape, 0.5, dtype=np.float32), name)


def grouped_conv_matmul_model() -> onnx.ModelProto:
    """Grouped conv (4 -> 6 channels, group 2, 3x3, 8x8), ReLU, Flatten, MatMul to 5,
    then Gemm with transB to 7 outputs. Batch is symbolic."""
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["conv"], group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense_w"], ["dense"]),
        helper.make_node("Gemm", ["dense", "gemm_w", "gemm_b"], ["y"], transB=1),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])],
        [
            constant("conv_w", (6, 2, 3, 3)),
            constant("dense_w", (6 * 8 * 8, 5)),
            constant("gemm_w", (7, 5)),
            constant("gemm_b", (7,)),
        ],
    )


# Each of the 6 x 8 x 8 conv outputs sums C_in / group = 2 channels over a 3x3 window.
GROUPED_CONV = 6 * 8 * 8 * 2 * 3 * 3
MATMUL = 384 * 5  # (1, 384) x (384, 5)
GEMM = 5 * 7  # (1, 5) x (5, 7), B stored transposed as (7, 5)


def test_macs_grouped_conv_matmul():
    macs, uncounted = count_macs(grouped_conv_matmul_model(), {"x": (1, 4, 8, 8)})
    assert GROUPED_CONV == 6_912
    assert uncounted == []
    assert macs == GROUPED_CONV + MATMUL + GEMM


def test_macs_scale_with_batch():
    # count_macs documents the count at the given shapes, so a batch of 3 costs 3 times
    # a batch of one.
    macs, _ = count_macs(grouped_conv_matmul_model(), {"x": (3, 4, 8, 8)})
    assert macs == 3 * (GROUPED_CONV + MATMUL + GEMM)


def test_macs_symbolic_shapes_uncounted():
    macs, uncounted = count_macs(grouped_conv_matmul_model(), {})
    assert macs == 0
    assert len(uncounted) == 3
    assert any(entry.startswith("Conv ") for entry in uncounted)
    assert any(entry.startswith("MatMul ") for entry in uncounted)


def test_macs_conv_transpose():
    # 4 -> 3 channels, 2x2 kernel, stride 2, 8x8 -> 16x16: each of the 4*8*8 inputs
    # scatters to 3 * 2 * 2 outputs. Equally, each of the 3*16*16 outputs gathers
    # 4 products.
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])],
        [constant("w", (4, 3, 2, 2))],
    )
    macs, uncounted = count_macs(model, {"x": (1, 4, 8, 8)})
    assert uncounted == []
    assert macs == 4 * 8 * 8 * 3 * 2 * 2
    assert macs == 3 * 16 * 16 * 4


SEQ, INPUT, HIDDEN = 5, 3, 4


def recurrent_model(op: str, gates: int, directions: int = 1) -> onnx.ModelProto:
    """One recurrent layer on x (seq 5, batch N, input 3), hidden size 4."""
    direction = "bidirectional" if directions == 2 else "forward"
    node = helper.make_node(
        op, ["x", "w", "r"], ["y"], hidden_size=HIDDEN, direction=direction
    )
    return make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, "N", INPUT])],
        [
            helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, [SEQ, directions, "N", HIDDEN]
            )
        ],
        [
            constant("w", (directions, gates * HIDDEN, INPUT)),
            constant("r", (directions, gates * HIDDEN, HIDDEN)),
        ],
    )


def test_macs_lstm():
    # Per step: input matrix 4H x I plus recurrent matrix 4H x H.
    macs, uncounted = count_macs(recurrent_model("LSTM", 4), {"x": (SEQ, 1, INPUT)})
    assert uncounted == []
    assert macs == SEQ * (16 * 3 + 16 * 4)
    assert macs == 560


def test_macs_lstm_bidirectional():
    model = recurrent_model("LSTM", 4, directions=2)
    macs, _ = count_macs(model, {"x": (SEQ, 1, INPUT)})
    assert macs == 2 * 560


def test_macs_gru():
    macs, _ = count_macs(recurrent_model("GRU", 3), {"x": (SEQ, 1, INPUT)})
    assert macs == SEQ * (12 * 3 + 12 * 4)


def test_macs_rnn():
    macs, _ = count_macs(recurrent_model("RNN", 1), {"x": (SEQ, 1, INPUT)})
    assert macs == SEQ * (4 * 3 + 4 * 4)


def test_params_inline_model():
    model = grouped_conv_matmul_model()
    expected = 6 * 2 * 3 * 3 + 384 * 5 + 7 * 5 + 7
    assert parameter_count(build_plan(model)) == expected


def test_macs_lstm_batch_first():
    # layout=1 puts the batch axis first: x is (batch, seq, input).
    node = helper.make_node(
        "LSTM", ["x", "w", "r"], ["y"], hidden_size=HIDDEN, layout=1
    )
    model = make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, INPUT])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SEQ, 1, HIDDEN])],
        [constant("w", (1, 4 * HIDDEN, INPUT)), constant("r", (1, 4 * HIDDEN, HIDDEN))],
    )
    macs, uncounted = count_macs(model, {"x": (1, SEQ, INPUT)})
    assert uncounted == []
    assert macs == 560


# f = linear(x, h_prev_0) and h_new_0 = tanh(f), so each layer has one input matrix and
# one recurrent matrix.
NLP_RECIPE = {
    "f": {"op": "linear", "input": ["x", "h_prev_0"]},
    "h_new_0": {"op": "activation_tanh", "input": ["f"]},
}


def test_macs_nlp_recipe():
    from onnxeps.converters import nlp

    steps, vocabulary = 3, 100
    model = nlp.build(NLP_RECIPE, vocab_size=vocabulary, seq_len=steps)
    # Layers 400 -> 600, 600 -> 600, 600 -> 400, each with an input and a recurrent
    # matrix, then the tied decoder 400 -> vocabulary, at every step.
    per_step = (
        (600 * 400 + 600 * 600)
        + (600 * 600 + 600 * 600)
        + (400 * 600 + 400 * 400)
        + 400 * vocabulary
    )
    macs, uncounted = count_macs(model, {"tokens": (steps, 1)})
    assert uncounted == []
    assert macs == steps * per_step
