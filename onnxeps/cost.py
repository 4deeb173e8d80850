"""Parameter count and multiply-accumulates (MACs) of a model, from its ONNX graph.

MACs are counted per sample for Conv, ConvTranspose, Gemm, MatMul and the gate matrices
of LSTM, GRU and RNN, from the shapes that ONNX shape inference derives at a batch of one;
elementwise, normalisation and pooling operators are not counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxeps.graphs import iter_graphs, node_label
from onnxeps.infer import TensorType, infer_types, skeleton
from onnxeps.plan import Plan
from onnxeps.roles import Role

__all__ = ["Costs", "parameter_count", "count_macs", "model_costs"]

log = logging.getLogger(__name__)

_PARAMETER_ROLES = frozenset(Role) - {Role.NORM_STAT, Role.KEEP, Role.UNKNOWN, Role.RECURRENT_STATE}


@dataclass
class Costs:
    """Parameter count, MACs per sample, and the operators whose MACs are unknown."""

    params: int
    macs: int
    uncounted: list[str] = field(default_factory=list)


def parameter_count(plan: Plan) -> int:
    """Count the elements of trainable tensors (each tensor once, running stats excluded)."""
    seen: dict[str, int] = {}
    for entry in plan.entries:
        if entry.role in _PARAMETER_ROLES:
            seen[entry.tensor] = int(np.prod(entry.shape, dtype=np.int64))
    return sum(seen.values())


def _static(found: TensorType | None) -> tuple[int, ...] | None:
    if found is None or found.shape is None:
        return None
    if not all(isinstance(d, int) for d in found.shape):
        return None
    return tuple(found.shape)


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _conv(node, shapes) -> int | None:
    out, weight = shapes(node.output[0]), shapes(node.input[1])
    if out is None or weight is None:
        return None
    # Weight (C_out, C_in / group, k...): each output element sums C_in/group * k inputs.
    return int(np.prod(out, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))


def _conv_transpose(node, shapes) -> int | None:
    x, weight = shapes(node.input[0]), shapes(node.input[1])
    if x is None or weight is None:
        return None
    # Weight (C_in, C_out / group, k...): each input element scatters to C_out/group * k.
    return int(np.prod(x, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))


def _gemm(node, shapes) -> int | None:
    out, a = shapes(node.output[0]), shapes(node.input[0])
    if out is None or a is None:
        return None
    inner = a[0] if _attribute(node, "transA", 0) else a[-1]
    return int(np.prod(out, dtype=np.int64) * inner)


def _matmul(node, shapes) -> int | None:
    out, a = shapes(node.output[0]), shapes(node.input[0])
    if out is None or a is None:
        return None
    return int(np.prod(out, dtype=np.int64) * a[-1])


def _recurrent(gates: int) -> Callable:
    def count(node, shapes) -> int | None:
        x, w, r = shapes(node.input[0]), shapes(node.input[1]), shapes(node.input[2])
        if x is None or w is None or r is None:
            return None
        # X is (steps, batch, I), or (batch, steps, I) with layout 1; W (dirs, gates*H,
        # I) and R (dirs, gates*H, H) multiply every step of every sequence.
        per_step = int(np.prod(w, dtype=np.int64) + np.prod(r, dtype=np.int64))
        return x[0] * x[1] * per_step

    return count


_MAC_RULES: dict[str, Callable] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "LSTM": _recurrent(4),
    "GRU": _recurrent(3),
    "RNN": _recurrent(1),
}


def _with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]):
    bare = skeleton(model)
    for value in bare.graph.input:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shapes[value.name]:
            dims.add().dim_value = int(size)
    return bare


def count_macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[str]]:
    """Count MACs of the whole batch at the given input shapes.

    With a batch of one this is MACs per sample. Shapes come from shape inference with
    data propagation, so shapes computed at run time (Shape, Concat, ...) count too.
    """
    bare = _with_input_shapes(model, input_shapes)
    types = infer_types(bare, data_prop=True, bare=True)

    def shapes(name: str) -> tuple[int, ...] | None:
        return _static(types.get(name))

    total, uncounted = 0, []
    for ref in iter_graphs(model):
        for node in ref.graph.node:
            rule = _MAC_RULES.get(node.op_type)
            if rule is None or node.domain not in ("", "ai.onnx"):
                continue
            found = rule(node, shapes)
            if found is None:
                uncounted.append(f"{node.op_type} '{node_label(node)}'")
            else:
                total += found
    if uncounted:
        log.info("MACs of %d operators unknown (shapes not static)", len(uncounted))
    return total, uncounted


def model_costs(model: onnx.ModelProto, plan: Plan, input_shapes) -> Costs:
    """Return the parameter count and the MACs per sample at ``input_shapes``."""
    macs, uncounted = count_macs(model, input_shapes)
    return Costs(parameter_count(plan), macs, uncounted)
