"""An estimate of the peak memory of a model's activations, from its ONNX graph.

Shapes come from ONNX shape inference at the given input shapes. The walk visits the
main graph's nodes in their stored order, which ONNX requires to be topological. The
graph inputs are live from the start. Each node allocates its outputs, and the estimate
is the maximum, over all nodes, of the bytes live while the node runs: its inputs and its
outputs, plus every earlier tensor still needed later. A tensor is freed after its last
consumer, and graph outputs stay live to the end. Weights (initializers and Constant
outputs) are not activations and are not counted. A runtime may reuse or fuse buffers,
so this estimates the memory that an unoptimised executor needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxeps.cost import _with_input_shapes
from onnxeps.infer import TensorType, infer_types

__all__ = ["ActivationPeak", "peak_activation_bytes", "last_uses"]

log = logging.getLogger(__name__)


@dataclass
class ActivationPeak:
    """The peak bytes of live activations and the tensors whose size is unknown.

    When ``unknown`` is not empty, those tensors count as 0 bytes, so ``bytes`` is a
    lower bound.
    """

    bytes: int
    unknown: list[str] = field(default_factory=list)


def _tensor_bytes(found: TensorType | None) -> int | None:
    """Return the size of a tensor in bytes, or None when its shape or type is unknown."""
    if found is None or found.shape is None:
        return None
    if not all(isinstance(d, int) for d in found.shape):
        return None
    if found.elem_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(found.elem_type)).itemsize
    return int(np.prod(found.shape, dtype=np.int64)) * itemsize


def _names_read(node: onnx.NodeProto) -> set[str]:
    """Return the tensors a node reads, including those its subgraphs read from outside.

    Names are unique across the model, so a name read inside a subgraph that the main
    graph produces is an outer-scope read by this node.
    """
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            subgraphs = [attribute.g]
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            subgraphs = list(attribute.graphs)
        else:
            continue
        for subgraph in subgraphs:
            for inner in subgraph.node:
                names |= _names_read(inner)
    return names


def last_uses(graph: onnx.GraphProto) -> dict[str, int]:
    """Map each tensor the main graph's nodes read to the index of its last reader."""
    found: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in _names_read(node):
            found[name] = index
    return found


def _activation_inputs(graph: onnx.GraphProto) -> list[str]:
    initializers = {tensor.name for tensor in graph.initializer}
    return [value.name for value in graph.input if value.name not in initializers]


def peak_activation_bytes(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]
) -> ActivationPeak:
    """Estimate the peak bytes of live activations at ``input_shapes`` (see the module)."""
    bare = _with_input_shapes(model, input_shapes)
    types = infer_types(bare, data_prop=True, bare=True)
    graph = model.graph
    final_reader = last_uses(graph)
    keep = {value.name for value in graph.output}
    unknown: list[str] = []

    def size(name: str) -> int:
        found = _tensor_bytes(types.get(name))
        if found is None:
            unknown.append(name)
            return 0
        return found

    live: dict[str, int] = {name: size(name) for name in _activation_inputs(graph)}
    peak = sum(live.values())
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        for name in node.output:
            if name:
                live[name] = size(name)
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if name not in keep and final_reader.get(name, -1) <= index:
                del live[name]
    if unknown:
        log.info("%d tensors of unknown size count as 0 bytes in the peak", len(unknown))
    return ActivationPeak(peak, unknown)
