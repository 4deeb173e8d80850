"""Walk an ONNX model: its graphs (subgraphs of If, Loop and Scan included), tensors and
consumers. Names are assumed unique across the whole model, as ONNX requires."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import onnx

__all__ = [
    "GraphRef",
    "Use",
    "iter_graphs",
    "iter_tensors",
    "consumer_map",
    "uses_through",
    "main_opset",
    "node_label",
    "model_input_names",
]


@dataclass(frozen=True)
class GraphRef:
    """A graph of the model and where it sits: ``main`` or ``main/<node>.<attribute>``."""

    path: str
    graph: onnx.GraphProto


@dataclass(frozen=True)
class Use:
    """One input slot of one node that reads a tensor."""

    node: onnx.NodeProto
    slot: int
    graph_path: str


_GRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
# The standard operators with graph attributes. The schemas of all other standard
# operators have none, so their attributes need not be read.
_STANDARD_DOMAINS = ("", "ai.onnx")
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for index, graph in enumerate(attribute.graphs):
                yield f"{attribute.name}[{index}]", graph


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(attribute.type in _GRAPH_TYPES for attribute in node.attribute)


def _labels(nodes) -> list[str]:
    """Label each node by name, else op type and position; repeated labels get the
    position appended."""
    labels: list[str] = []
    seen: set[str] = set()
    for position, node in enumerate(nodes):
        label = node.name or f"{node.op_type}#{position}"
        if label in seen:
            label = f"{label}#{position}"
        seen.add(label)
        labels.append(label)
    return labels


def iter_graphs(model: onnx.ModelProto) -> Iterator[GraphRef]:
    """Yield the main graph, then every subgraph depth first in node order.

    Paths are unique within the model: a node without a name, or with a name used
    before in its graph, is labelled by op type or name plus its position.
    """
    stack = [GraphRef("main", model.graph)]
    while stack:
        ref = stack.pop()
        yield ref
        nodes = ref.graph.node
        # Only control-flow and non-standard operators can hold subgraphs.
        parents = [
            position
            for position, node in enumerate(nodes)
            if (node.op_type in _CONTROL_FLOW or node.domain not in _STANDARD_DOMAINS)
            and _has_subgraph(node)
        ]
        if not parents:
            continue
        labels = _labels(nodes)
        children = [
            GraphRef(f"{ref.path}/{labels[position]}.{attribute_name}", graph)
            for position in parents
            for attribute_name, graph in _subgraphs(nodes[position])
        ]
        stack.extend(reversed(children))


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yield every TensorProto of the model: initializers and Constant-node values."""
    for ref in iter_graphs(model):
        yield from ref.graph.initializer
        for node in ref.graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    yield from attribute.tensors


def consumer_map(model: onnx.ModelProto) -> dict[str, list[Use]]:
    """Map each tensor name to the node inputs that read it, across all graphs."""
    uses: dict[str, list[Use]] = defaultdict(list)
    for ref in iter_graphs(model):
        for node in ref.graph.node:
            for slot, name in enumerate(node.input):
                if name:
                    uses[name].append(Use(node, slot, ref.path))
    return uses


def uses_through(
    consumers: dict[str, list[Use]], name: str, pass_through: Collection[str]
) -> Iterator[Use]:
    """Yield every use of a tensor, following the data input (slot 0) of the
    ``pass_through`` operators to their outputs' uses."""
    pending, seen = [name], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for use in consumers.get(current, []):
            yield use
            if use.node.op_type in pass_through and use.slot == 0:
                pending.extend(output for output in use.node.output if output)


def node_label(node: onnx.NodeProto) -> str:
    """Return the node's name, else its first output, else its op type (for messages)."""
    return node.name or next((name for name in node.output if name), node.op_type)


def main_opset(model: onnx.ModelProto) -> int:
    """Return the opset version of the default ONNX domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def model_input_names(graph: onnx.GraphProto) -> list[str]:
    """Return the graph inputs that must be fed: inputs that are not initializers."""
    initializers = {tensor.name for tensor in graph.initializer}
    return [value.name for value in graph.input if value.name not in initializers]
