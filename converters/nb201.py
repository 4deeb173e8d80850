"""Convert NAS-Bench-201 (NATS-Bench topology) cells to ONNX.

The network is the NATS-Bench topology-space network. A 3x3 convolution stem (16
channels, no bias) and BatchNorm come first. Three stages of 5 copies of the cell
follow at 16, 32 and 64 channels, with a residual reduction block between stages. The
head is BatchNorm, ReLU, global average pooling and a linear classifier. The input
``input`` is float32 (batch, 3, 32, 32) NCHW and the output ``logits`` is
(batch, num_classes). BatchNorm uses eps 1e-5 and stays in inference form.

Cell semantics: node j is the sum of its incoming edges. ``nor_conv_kxk`` is
ReLU, k x k convolution (stride 1, "same" padding, no bias) and BatchNorm.
``avg_pool_3x3`` is a 3x3 average pool (stride 1, padding 1, padding excluded from the
count). ``skip_connect`` is the identity. ``none`` contributes zeros and is omitted
when the node has another incoming edge. A node whose every incoming edge is ``none``
is the sum of ``source * 0`` over its edges, like NATS-Bench's ``Zero`` op
(``x.mul(0.)``), so NaN and inf propagate as they do there. Operations whose output
is not used (a branch cut off by ``none``) stay in the graph, so the parameter count
equals the benchmark network's.

Initializer names (PyTorch layouts; ``i`` is the position 0..16 in the sequence of
15 cells and 2 reduction blocks, so cells are 0-4, 6-10 and 12-16 and the reduction
blocks are 5 and 11, as in the NATS-Bench ``cells`` list):

- ``stem.conv.weight`` and ``stem.bn.*``
- ``cells.{i}.edge_{src}_{dst}.conv.weight`` and ``cells.{i}.edge_{src}_{dst}.bn.*``
  for a convolution edge from node src to node dst
- ``cells.{i}.conv_a.*`` (stride 2), ``cells.{i}.conv_b.*`` and
  ``cells.{i}.shortcut.conv.weight`` for a reduction block
- ``head.bn.*``, ``classifier.weight`` (num_classes, 64) and ``classifier.bias``

where ``bn.*`` is ``bn.weight``, ``bn.bias``, ``bn.running_mean`` and
``bn.running_var``. One float constant ``zero`` (role ``keep``) exists only when a
node has only ``none`` edges.
"""

from __future__ import annotations

import os
import re
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
    "parse_arch",
    "arch_from_tuple",
    "build",
    "convert",
]

CONVERTER_ID = "onnxeps.converters.nb201 1"
OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# NASLib's op code for each position: the tuple value k means NASLIB_OP_CODES[k].
NASLIB_OP_CODES = (
    "skip_connect",
    "none",
    "nor_conv_3x3",
    "nor_conv_1x1",
    "avg_pool_3x3",
)
# NASLib orders the edges (0->1, 0->2, 0->3, 1->2, 1->3, 2->3).
NASLIB_EDGE_ORDER = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
NUM_NODES = 4
STAGE_CHANNELS = (16, 32, 64)
CELLS_PER_STAGE = 5
BN_EPSILON = 1e-5
IMAGE_SHAPE = (3, 32, 32)

# Edges into node j, as (op, source) in source order, for j = 1, 2, 3.
Cell = tuple[tuple[tuple[str, int], ...], ...]


def parse_arch(arch_str: str) -> Cell:
    """Parse an arch string such as ``|nor_conv_3x3~0|+|...|+|...|`` into a Cell.

    Raises ValueError naming the malformed group, entry, source or op.
    """
    groups = arch_str.strip().split("+")
    if len(groups) != NUM_NODES - 1:
        raise ValueError(
            f"invalid NB201 arch string {arch_str!r}: expected 3 groups joined by '+' "
            f"(one per node 1, 2, 3), got {len(groups)}"
        )
    return tuple(_parse_group(group, target) for target, group in enumerate(groups, 1))


def _parse_group(group: str, target: int) -> tuple[tuple[str, int], ...]:
    if len(group) < 2 or not (group.startswith("|") and group.endswith("|")):
        raise ValueError(
            f"invalid group {group!r} for node {target}: expected '|op~src|...|'"
        )
    entries = group[1:-1].split("|")
    if len(entries) != target:
        raise ValueError(
            f"group {group!r} for node {target} has {len(entries)} entries, expected "
            f"{target} (one per source node 0..{target - 1})"
        )
    return tuple(
        _parse_entry(entry, source, target) for source, entry in enumerate(entries)
    )


def _parse_entry(entry: str, source: int, target: int) -> tuple[str, int]:
    match = re.fullmatch(r"([^~|+]+)~(\d+)", entry)
    if match is None:
        raise ValueError(
            f"invalid entry {entry!r} for edge {source}->{target}: "
            f"expected 'op~{source}'"
        )
    op, written_source = match.group(1), int(match.group(2))
    if written_source != source:
        raise ValueError(
            f"entry {entry!r} for node {target} has source {written_source}, expected "
            f"{source} (entries are listed in source order 0..{target - 1})"
        )
    if op not in OPS:
        raise ValueError(
            f"unknown op {op!r} on edge {source}->{target}; "
            f"valid ops are {', '.join(OPS)}"
        )
    return op, source


def arch_from_tuple(codes: Sequence[int] | str) -> str:
    """Convert a NASLib 6-tuple such as ``(2, 2, 0, 2, 3, 2)`` to an arch string.

    ``codes`` is a sequence of six ints or its text form. The tuple orders edges
    (0->1, 0->2, 0->3, 1->2, 1->3, 2->3), codes 0 skip_connect, 1 none, 2 nor_conv_3x3,
    3 nor_conv_1x1, 4 avg_pool_3x3. Raises ValueError for another length or code.
    """
    values = _tuple_values(codes)
    ops = {}
    for position, (code, edge) in enumerate(zip(values, NASLIB_EDGE_ORDER)):
        if not 0 <= code < len(NASLIB_OP_CODES):
            raise ValueError(
                f"invalid NASLib op code {code} at position {position} (edge "
                f"{edge[0]}->{edge[1]}); valid codes are 0..{len(NASLIB_OP_CODES) - 1}"
            )
        ops[edge] = NASLIB_OP_CODES[code]
    groups = []
    for target in range(1, NUM_NODES):
        entries = [f"{ops[(source, target)]}~{source}" for source in range(target)]
        groups.append("|" + "|".join(entries) + "|")
    return "+".join(groups)


def _tuple_values(codes: Sequence[int] | str) -> list[int]:
    if isinstance(codes, str):
        text = codes.strip().removeprefix("(").removesuffix(")")
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"invalid NASLib tuple {codes!r}: expected six comma-separated integers"
            ) from None
    else:
        values = [int(code) for code in codes]
    if len(values) != len(NASLIB_EDGE_ORDER):
        raise ValueError(f"NASLib tuple {codes!r} has {len(values)} codes, expected 6")
    return values


def build(
    arch_str: str,
    num_classes: int = 1,
    init_seed: int | None = 0,
    weights: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """Build the NB201 network of one cell as a checked ONNX model.

    ``weights`` maps initializer names (see the module docstring) to values that
    replace the seeded initial values. Raises ValueError for an invalid arch string,
    a non-positive ``num_classes``, or unknown or mis-shaped ``weights`` entries.
    """
    cell = parse_arch(arch_str)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    builder = GraphBuilder(init_seed, weights)
    x = builder.reserve_name("input")
    x = _add_stem(builder, x)
    x = _add_stages(builder, x, cell)
    logits = _add_head(builder, x, num_classes)
    return builder.build_model(
        "nb201",
        [make_value_info("input", onnx.TensorProto.FLOAT, (BATCH_DIM, *IMAGE_SHAPE))],
        [make_value_info(logits, onnx.TensorProto.FLOAT, (BATCH_DIM, num_classes))],
        {ENCODING_KEY: arch_str, CONVERTER_KEY: CONVERTER_ID},
    )


def convert(
    arch_str: str,
    path: str | os.PathLike[str],
    num_classes: int = 1,
    init_seed: int | None = 0,
    weights: Mapping[str, Any] | None = None,
) -> Path:
    """Build the network of ``arch_str`` and write it atomically to ``path``.

    Raises ValueError for invalid arguments (see :func:`build`) and OSError if the
    file cannot be written.
    """
    model = build(arch_str, num_classes, init_seed, weights)
    return save_model_atomic(model, path)


def _add_stem(builder: GraphBuilder, x: str) -> str:
    channels = STAGE_CHANNELS[0]
    x = _layers.conv2d(builder, x, "stem", IMAGE_SHAPE[0], channels, 3, padding=1)
    return _layers.batch_norm(builder, x, "stem", channels, BN_EPSILON)


def _add_stages(builder: GraphBuilder, x: str, cell: Cell) -> str:
    index = 0
    for stage, channels in enumerate(STAGE_CHANNELS):
        if stage > 0:
            x = _add_reduction_block(
                builder, x, f"cells.{index}", STAGE_CHANNELS[stage - 1], channels
            )
            index += 1
        for _ in range(CELLS_PER_STAGE):
            x = _add_cell(builder, x, cell, f"cells.{index}", channels)
            index += 1
    return x


def _add_cell(
    builder: GraphBuilder, x: str, cell: Cell, prefix: str, channels: int
) -> str:
    """Add one cell and return its output node (node 3)."""
    nodes = [x]
    for target, edges in enumerate(cell, start=1):
        terms = []
        for op, source in edges:
            if op != "none":
                edge = f"{prefix}.edge_{source}_{target}"
                terms.append(_add_edge(builder, nodes[source], op, edge, channels))
        if not terms:
            # All incoming edges are none. Summing source * 0 like NATS-Bench's Zero
            # op lets NaN and inf propagate as they do there.
            for _, source in edges:
                edge = f"{prefix}.edge_{source}_{target}"
                terms.append(_add_zeros_like(builder, nodes[source], edge))
        if len(terms) == 1:
            nodes.append(terms[0])
        else:
            nodes.append(builder.add_node("Sum", terms, f"{prefix}.node{target}"))
    return nodes[-1]


def _add_zeros_like(builder: GraphBuilder, x: str, prefix: str) -> str:
    zero = builder.shared_constant("zero", np.zeros((), dtype=np.float32))
    return builder.add_node("Mul", [x, zero], prefix)


def _add_edge(
    builder: GraphBuilder, x: str, op: str, prefix: str, channels: int
) -> str:
    if op == "skip_connect":
        return x
    if op == "avg_pool_3x3":
        return builder.add_node(
            "AveragePool",
            [x],
            prefix,
            kernel_shape=[3, 3],
            strides=[1, 1],
            pads=[1, 1, 1, 1],
            count_include_pad=0,
        )
    kernel = 3 if op == "nor_conv_3x3" else 1
    return _add_relu_conv_bn(builder, x, prefix, channels, channels, kernel, stride=1)


def _add_relu_conv_bn(
    builder: GraphBuilder,
    x: str,
    prefix: str,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int,
) -> str:
    x = _layers.relu(builder, x, prefix)
    padding = kernel // 2
    x = _layers.conv2d(
        builder, x, prefix, in_channels, out_channels, kernel, stride, padding
    )
    return _layers.batch_norm(builder, x, prefix, out_channels, BN_EPSILON)


def _add_reduction_block(
    builder: GraphBuilder, x: str, prefix: str, in_channels: int, out_channels: int
) -> str:
    """Add the residual block that halves the resolution and widens the channels."""
    branch = _add_relu_conv_bn(
        builder, x, f"{prefix}.conv_a", in_channels, out_channels, 3, stride=2
    )
    branch = _add_relu_conv_bn(
        builder, branch, f"{prefix}.conv_b", out_channels, out_channels, 3, stride=1
    )
    shortcut = builder.add_node(
        "AveragePool", [x], f"{prefix}.shortcut", kernel_shape=[2, 2], strides=[2, 2]
    )
    shortcut = _layers.conv2d(
        builder, shortcut, f"{prefix}.shortcut", in_channels, out_channels, 1
    )
    return builder.add_node("Add", [shortcut, branch], prefix)


def _add_head(builder: GraphBuilder, x: str, num_classes: int) -> str:
    channels = STAGE_CHANNELS[-1]
    x = _layers.batch_norm(builder, x, "head", channels, BN_EPSILON)
    x = _layers.relu(builder, x, "head")
    x = _layers.global_average_pool(builder, x, "head")
    return _layers.dense(
        builder, x, "classifier", channels, num_classes, output="logits"
    )
