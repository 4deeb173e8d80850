"""Convert NAS-Bench-101 cells (adjacency matrix and op list) to ONNX.

The cell is first pruned: vertices that are not on a path from the input vertex to
the output vertex are removed. The pruned cell must have at most 7 vertices and at most
9 edges.

The network follows ``model_builder.py`` of the nasbench library
(google-research/nasbench). A 3x3 convolution stem to 128 channels with BatchNorm
and ReLU comes first. Three stacks of three cells follow, with a 2x2 max pool of
stride 2 before stacks 2 and 3, whose cells double the width to 256 and 512. Global
average pooling and a dense layer (no softmax) end the network. The input ``input`` is
float32 (batch, 3, 32, 32) NCHW and the output ``logits`` is (batch, num_classes).
Convolutions have no bias and "same" padding. BatchNorm uses eps 1e-5 and stays in
inference form.

Inside a cell of input width C_in and output width C_out (see
:func:`vertex_channels`): an interior vertex sums its inputs, in vertex order, after
truncating wider interior predecessors to their first channels, and then adds the 1x1
conv-BN-ReLU projection of the cell input if the input feeds it. The output vertex
concatenates its interior predecessors in vertex order and adds the projection of the
cell input to C_out if the input feeds it. A cell of only input and output is that
projection.

Initializer names (PyTorch layouts; ``c`` is the cell number 0..8 over all stacks, and
``t`` is a vertex number in the pruned cell):

- ``stem.conv.weight`` and ``stem.bn.*``
- ``cells.{c}.vertex{t}.conv.weight`` and ``cells.{c}.vertex{t}.bn.*`` for a
  convolution vertex
- ``cells.{c}.proj{t}.conv.weight`` and ``cells.{c}.proj{t}.bn.*`` for the projection
  of the cell input into vertex t (t is the output vertex for the input->output edge)
- ``classifier.weight`` (num_classes, 512) and ``classifier.bias``

where ``bn.*`` is ``bn.weight``, ``bn.bias``, ``bn.running_mean`` and
``bn.running_var``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import _layers
from ._builder import (
    BATCH_DIM,
    CONVERTER_KEY,
    ENCODING_KEY,
    GraphBuilder,
    make_value_info,
    save_model_atomic,
)

__all__ = [
    "OPS",
    "NASLIB_OP_CODES",
    "prune",
    "spec_from_tuple",
    "vertex_channels",
    "build",
    "convert",
]

CONVERTER_ID = "onnxeps.converters.nb101 1"
OPS = ("conv3x3-bn-relu", "conv1x1-bn-relu", "maxpool3x3")
# NASLib's code k for a vertex op means NASLIB_OP_CODES[k].
NASLIB_OP_CODES = (
    "input",
    "output",
    "maxpool3x3",
    "conv1x1-bn-relu",
    "conv3x3-bn-relu",
)
MAX_VERTICES = 7
MAX_EDGES = 9
STEM_CHANNELS = 128
NUM_STACKS = 3
CELLS_PER_STACK = 3
BN_EPSILON = 1e-5
IMAGE_SHAPE = (3, 32, 32)

Matrix = list[list[int]]


def prune(
    matrix: Sequence[Sequence[int]], ops: Sequence[str]
) -> tuple[Matrix, list[str]]:
    """Validate a cell and remove the vertices that are not on an input->output path.

    Returns the pruned matrix and op list. Raises ValueError if the matrix is not a
    square, strictly upper-triangular 0/1 matrix, or if ``ops`` has the wrong length or
    an invalid op. It also raises ValueError if no path joins input and output, or if
    the pruned cell has more than 7 vertices or 9 edges.
    """
    array = _validate_matrix(matrix)
    _validate_ops(ops, len(array))
    output = len(array) - 1
    from_input = _reachable(array, 0)
    if output not in from_input:
        raise ValueError(
            "the cell has no path from the input vertex to the output vertex"
        )
    live_vertices = sorted(from_input & _reachable(array.T, output))
    pruned = array[np.ix_(live_vertices, live_vertices)]
    if len(live_vertices) > MAX_VERTICES:
        raise ValueError(
            f"the pruned cell has {len(live_vertices)} vertices; "
            f"at most {MAX_VERTICES} are allowed"
        )
    if pruned.sum() > MAX_EDGES:
        raise ValueError(
            f"the pruned cell has {pruned.sum()} edges; at most {MAX_EDGES} are allowed"
        )
    return pruned.tolist(), [str(ops[vertex]) for vertex in live_vertices]


def _validate_matrix(matrix: Sequence[Sequence[int]]) -> np.ndarray:
    try:
        array = np.asarray(matrix)
    except ValueError:
        raise ValueError(
            "the matrix must be a square list of lists of 0 and 1"
        ) from None
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] < 2:
        raise ValueError(
            f"the matrix must be square with at least 2 vertices, "
            f"got shape {array.shape}"
        )
    # Bool, integer and float matrices are accepted when every entry is 0 or 1.
    if array.dtype.kind not in "biuf" or not np.isin(array, (0, 1)).all():
        raise ValueError("the matrix entries must be 0 or 1")
    array = array.astype(np.int64)
    lower = np.argwhere(np.tril(array) != 0)
    if len(lower):
        source, target = lower[0]
        raise ValueError(
            f"the matrix must be strictly upper-triangular, but it has an edge "
            f"{source}->{target}; edges go from a lower to a higher vertex number"
        )
    return array


def _validate_ops(ops: Sequence[str], num_vertices: int) -> None:
    is_list = isinstance(ops, (Sequence, np.ndarray)) and not isinstance(ops, str)
    if not is_list or len(ops) != num_vertices:
        raise ValueError(
            f"ops must be a list of {num_vertices} op names, one per matrix row, "
            f"got {ops!r}"
        )
    if ops[0] != "input" or ops[-1] != "output":
        raise ValueError(
            f"ops must start with 'input' and end with 'output', "
            f"got {ops[0]!r} and {ops[-1]!r}"
        )
    for vertex, op in enumerate(ops[1:-1], start=1):
        if op not in OPS:
            raise ValueError(
                f"unknown op {op!r} at vertex {vertex}; valid ops are {', '.join(OPS)}"
            )


def _reachable(adjacency: np.ndarray, start: int) -> set[int]:
    seen = {start}
    frontier = [start]
    while frontier:
        vertex = frontier.pop()
        for successor in np.flatnonzero(adjacency[vertex]).tolist():
            if successor not in seen:
                seen.add(successor)
                frontier.append(successor)
    return seen


def spec_from_tuple(codes: Sequence[int] | str) -> tuple[Matrix, list[str]]:
    """Split a NASLib tuple into an adjacency matrix and an op list.

    The tuple is the N x N matrix flattened row by row, then N op codes: 0 input,
    1 output, 2 maxpool3x3, 3 conv1x1-bn-relu, 4 conv3x3-bn-relu. ``codes`` is a
    sequence of ints or its text form such as ``"(0, 1, ..., 1)"``. The result is not
    pruned. Raises ValueError if the length is not N*N + N or an op code is invalid.
    """
    if isinstance(codes, str):
        text = codes.strip().removeprefix("(").removesuffix(")")
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"invalid NASLib tuple {codes!r}: expected comma-separated integers"
            ) from None
    else:
        values = [int(code) for code in codes]
    size = int((np.sqrt(1 + 4 * len(values)) - 1) / 2)
    if size * size + size != len(values):
        raise ValueError(
            f"a NASLib tuple has N*N + N codes for N vertices, got {len(values)} codes"
        )
    op_codes = values[size * size :]
    if any(not 0 <= code < len(NASLIB_OP_CODES) for code in op_codes):
        raise ValueError(
            f"op codes must be 0..{len(NASLIB_OP_CODES) - 1}, got {op_codes}"
        )
    matrix = [values[row * size : (row + 1) * size] for row in range(size)]
    return matrix, [NASLIB_OP_CODES[code] for code in op_codes]


def vertex_channels(matrix: Matrix, in_channels: int, out_channels: int) -> list[int]:
    """Return the channel count of each vertex of a pruned cell.

    The output vertex has ``out_channels``. Its k interior predecessors get
    ``out_channels // k`` each, and the first ``out_channels % k`` of them in vertex
    order get one more. Going backwards, every other interior vertex gets the largest
    count among its interior successors. The input vertex has ``in_channels``.
    Raises ValueError if the cell has interior vertices but none feeds the output,
    which pruning rules out.
    """
    array = np.asarray(matrix)
    output = len(array) - 1
    channels = [in_channels] + [0] * (output - 1) + [out_channels]
    if output == 1:
        return channels
    feeders = [vertex for vertex in range(1, output) if array[vertex, output]]
    if not feeders:
        raise ValueError("no interior vertex feeds the output vertex; prune the cell")
    share, remainder = divmod(out_channels, len(feeders))
    for position, vertex in enumerate(feeders):
        channels[vertex] = share + (1 if position < remainder else 0)
    for vertex in range(output - 1, 0, -1):
        if not array[vertex, output]:
            successors = range(vertex + 1, output)
            channels[vertex] = max(channels[s] for s in successors if array[vertex, s])
    return channels


def build(
    matrix: Sequence[Sequence[int]],
    ops: Sequence[str],
    num_classes: int = 1,
    init_seed: int | None = 0,
    weights: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """Build the NB101 network of one cell as a checked ONNX model.

    The cell is pruned first (see :func:`prune`). ``weights`` maps initializer names
    (see the module docstring) to values that replace the seeded initial values.
    Raises ValueError for an invalid cell, a non-positive ``num_classes``, or unknown or
    mis-shaped ``weights`` entries.
    """
    pruned_matrix, pruned_ops = prune(matrix, ops)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    builder = GraphBuilder(init_seed, weights)
    x = builder.reserve_name("input")
    x = _add_stem(builder, x)
    x, channels = _add_stacks(builder, x, pruned_matrix, pruned_ops)
    x = _layers.global_average_pool(builder, x, "head")
    logits = _layers.dense(
        builder, x, "classifier", channels, num_classes, output="logits"
    )
    encoding = json.dumps({"matrix": np.asarray(matrix).tolist(), "ops": list(ops)})
    image = (BATCH_DIM, *IMAGE_SHAPE)
    return builder.build_model(
        "nb101",
        [make_value_info("input", onnx.TensorProto.FLOAT, image)],
        [make_value_info(logits, onnx.TensorProto.FLOAT, (BATCH_DIM, num_classes))],
        {ENCODING_KEY: encoding, CONVERTER_KEY: CONVERTER_ID},
    )


def convert(
    matrix: Sequence[Sequence[int]],
    ops: Sequence[str],
    path: str | os.PathLike[str],
    num_classes: int = 1,
    init_seed: int | None = 0,
    weights: Mapping[str, Any] | None = None,
) -> Path:
    """Build the network of one cell and write it atomically to ``path``.

    Raises ValueError for invalid arguments (see :func:`build`) and OSError if the
    file cannot be written.
    """
    model = build(matrix, ops, num_classes, init_seed, weights)
    return save_model_atomic(model, path)


def _add_stem(builder: GraphBuilder, x: str) -> str:
    return _add_conv_bn_relu(builder, x, "stem", IMAGE_SHAPE[0], STEM_CHANNELS, 3)


def _add_stacks(
    builder: GraphBuilder, x: str, matrix: Matrix, ops: list[str]
) -> tuple[str, int]:
    """Add the three stacks of cells and return the output and its channel count."""
    channels = STEM_CHANNELS
    for stack in range(NUM_STACKS):
        in_channels = channels
        if stack > 0:
            x = builder.add_node(
                "MaxPool",
                [x],
                f"stack{stack}.downsample",
                kernel_shape=[2, 2],
                strides=[2, 2],
            )
            channels *= 2
        for position in range(CELLS_PER_STACK):
            prefix = f"cells.{stack * CELLS_PER_STACK + position}"
            x = _add_cell(builder, x, matrix, ops, prefix, (in_channels, channels))
            in_channels = channels
    return x, channels


def _add_cell(
    builder: GraphBuilder,
    x: str,
    matrix: Matrix,
    ops: list[str],
    prefix: str,
    widths: tuple[int, int],
) -> str:
    """Add one pruned cell that maps ``widths`` (C_in, C_out) and return its output."""
    in_channels, out_channels = widths
    channels = vertex_channels(matrix, in_channels, out_channels)
    output = len(matrix) - 1
    tensors = [x]
    for vertex in range(1, output):
        name = f"{prefix}.vertex{vertex}"
        summed = _add_vertex_input(builder, tensors, matrix, channels, vertex, prefix)
        value = _add_vertex_op(builder, summed, ops[vertex], channels[vertex], name)
        tensors.append(value)
    feeders = [tensors[v] for v in range(1, output) if matrix[v][output]]
    projection = None
    if matrix[0][output]:
        projection = _add_conv_bn_relu(
            builder, x, f"{prefix}.proj{output}", in_channels, out_channels, 1
        )
    if not feeders:
        # Pruning keeps the input->output edge of a cell without interior vertices.
        assert projection is not None
        return projection
    result = feeders[0]
    if len(feeders) > 1:
        result = builder.add_node("Concat", feeders, f"{prefix}.output", axis=1)
    if projection is not None:
        result = builder.add_node("Add", [result, projection], f"{prefix}.output")
    return result


def _add_vertex_input(
    builder: GraphBuilder,
    tensors: list[str],
    matrix: Matrix,
    channels: list[int],
    vertex: int,
    prefix: str,
) -> str:
    """Sum the inputs of an interior vertex after bringing them to its width.

    Interior predecessors come first in vertex order, truncated if wider, and the
    projected cell input comes last, as in the nasbench model builder.
    """
    width = channels[vertex]
    name = f"{prefix}.vertex{vertex}"
    terms = []
    for source in range(1, vertex):
        if matrix[source][vertex]:
            terms.append(
                _truncate(builder, tensors[source], channels[source], width, name)
            )
    if matrix[0][vertex]:
        projection = f"{prefix}.proj{vertex}"
        terms.append(
            _add_conv_bn_relu(builder, tensors[0], projection, channels[0], width, 1)
        )
    if len(terms) == 1:
        return terms[0]
    return builder.add_node("Sum", terms, name)


def _truncate(
    builder: GraphBuilder, x: str, channels: int, width: int, prefix: str
) -> str:
    """Keep the first ``width`` channels of ``x``, which has ``channels`` channels."""
    if channels == width:
        return x
    # vertex_channels never gives a vertex more channels than an interior predecessor.
    assert channels > width, f"vertex channels increase from {channels} to {width}"
    starts = builder.add_constant(f"{prefix}.starts", np.array([0], dtype=np.int64))
    ends = builder.add_constant(f"{prefix}.ends", np.array([width], dtype=np.int64))
    axes = builder.add_constant(f"{prefix}.axes", np.array([1], dtype=np.int64))
    return builder.add_node("Slice", [x, starts, ends, axes], f"{prefix}.truncate")


def _add_vertex_op(
    builder: GraphBuilder, x: str, op: str, channels: int, prefix: str
) -> str:
    if op == "maxpool3x3":
        return builder.add_node(
            "MaxPool",
            [x],
            prefix,
            kernel_shape=[3, 3],
            strides=[1, 1],
            pads=[1, 1, 1, 1],
        )
    kernel = 3 if op == "conv3x3-bn-relu" else 1
    return _add_conv_bn_relu(builder, x, prefix, channels, channels, kernel)


def _add_conv_bn_relu(
    builder: GraphBuilder,
    x: str,
    prefix: str,
    in_channels: int,
    out_channels: int,
    kernel: int,
) -> str:
    padding = kernel // 2
    x = _layers.conv2d(
        builder, x, prefix, in_channels, out_channels, kernel, padding=padding
    )
    x = _layers.batch_norm(builder, x, prefix, out_channels, BN_EPSILON)
    return _layers.relu(builder, x, prefix)
