"""Rewrite BatchNormalization to normalise with the statistics of the current batch.

The metric ignores running statistics: mean and biased variance are computed over every
axis except the channel axis (axis 1) of the batch being scored, with the node's epsilon.
The rewrite uses primitive operators only, because ONNX Runtime's training-mode
BatchNormalization crashes or gives wrong results (ORT 1.31-1.32; see the README).
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxeps.errors import RewriteError
from onnxeps.graphs import consumer_map, iter_graphs, main_opset, node_label
from onnxeps.infer import TensorType, infer_types
from onnxeps.passes.base import NameScope

__all__ = ["BatchNormToBatchStatistics"]

_DEFAULT_EPSILON = 1e-5
_MIN_OPSET = 5  # Reshape takes its shape as an input from opset 5


class _Emitter:
    """Builds the replacement nodes of one BatchNormalization node."""

    def __init__(self, node: onnx.NodeProto, names: NameScope, opset: int) -> None:
        self.node = node
        self.names = names
        self.opset = opset
        self.prefix = node_label(node)
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: list[str], output: str = "", **attrs) -> str:
        output = output or self.names.fresh(f"{self.prefix}/{op_type.lower()}")
        name = self.names.fresh(f"{self.prefix}/{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def constant(self, stem: str, tensor: onnx.TensorProto) -> str:
        return self.op("Constant", [], self.names.fresh(f"{self.prefix}/{stem}"), value=tensor)

    def ints(self, stem: str, values: list[int]) -> str:
        tensor = helper.make_tensor(stem, onnx.TensorProto.INT64, [len(values)], values)
        return self.constant(stem, tensor)

    def reduce_mean(self, value: str) -> str:
        """Mean over axes 0 and 2 of an (N, C, S) tensor, keeping dims."""
        if self.opset >= 18:
            return self.op("ReduceMean", [value, self.ints("axes", [0, 2])], keepdims=1)
        return self.op("ReduceMean", [value], axes=[0, 2], keepdims=1)

    def cast(self, value: str, have: int, want: int) -> str:
        """Cast to ``want`` unless the value's type ``have`` already is it."""
        return value if have == want else self.op("Cast", [value], to=want)


def _elem(types: dict[str, TensorType], name: str) -> int:
    found = types.get(name)
    return found.elem_type if found else onnx.TensorProto.UNDEFINED


def _epsilon(node: onnx.NodeProto) -> float:
    for attribute in node.attribute:
        if attribute.name == "epsilon":
            return attribute.f
    return _DEFAULT_EPSILON


def _replace(node, names, opset, types: dict[str, TensorType]) -> list[onnx.NodeProto]:
    x, scale, shift = node.input[0], node.input[1], node.input[2]
    emit = _Emitter(node, names, opset)
    x_type = types.get(x) or types.get(node.output[0])
    elem = x_type.elem_type if x_type else onnx.TensorProto.UNDEFINED
    if elem == onnx.TensorProto.UNDEFINED:
        raise RewriteError(
            f"BatchNormalization '{emit.prefix}': the element type of its input "
            f"'{x}' is unknown, so it cannot be rewritten to batch statistics.",
            "Run onnx.shape_inference on the model, or export it with value types.",
        )
    # Statistics over a whole batch sum up to millions of values per channel; float64
    # keeps their rounding error far below the metric's tolerance.
    work = onnx.TensorProto.DOUBLE
    flat = emit.op("Reshape", [x, emit.ints("flat_shape", [0, 0, -1])])
    flat = emit.cast(flat, elem, work)
    mean = emit.reduce_mean(flat)
    centred = emit.op("Sub", [flat, mean])
    variance = emit.reduce_mean(emit.op("Mul", [centred, centred]))
    eps = helper.make_tensor("eps", work, [], [_epsilon(node)])
    std = emit.op("Sqrt", [emit.op("Add", [variance, emit.constant("epsilon", eps)])])
    normalised = emit.op("Div", [centred, std])
    channel_shape = emit.ints("channel_shape", [1, -1, 1])
    scale_3d = emit.op("Reshape", [emit.cast(scale, _elem(types, scale), work), channel_shape])
    shift_3d = emit.op("Reshape", [emit.cast(shift, _elem(types, shift), work), channel_shape])
    scaled = emit.op("Add", [emit.op("Mul", [normalised, scale_3d]), shift_3d])
    scaled = emit.cast(scaled, work, elem)
    emit.op("Reshape", [scaled, emit.op("Shape", [x])], output=node.output[0])
    return emit.nodes


def _is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _check_outputs(node: onnx.NodeProto, consumers, graph_outputs: set[str]) -> None:
    for name in node.output[1:]:
        if name and (consumers.get(name) or name in graph_outputs):
            raise RewriteError(
                f"BatchNormalization '{node_label(node)}' has its running "
                f"statistics output '{name}' read by the graph; onnxeps cannot rewrite it "
                "to batch statistics.",
                "Export the model in inference mode (training_mode 0).",
            )


class BatchNormToBatchStatistics:
    """Replace every BatchNormalization (training_mode 0 or 1) by batch-statistics math."""

    name = "batchnorm-to-batch-statistics"

    def __call__(self, model: onnx.ModelProto) -> bool:
        opset = main_opset(model)
        if not any(_is_batchnorm(n) for ref in iter_graphs(model) for n in ref.graph.node):
            return False
        if opset < _MIN_OPSET:
            raise RewriteError(
                f"BatchNormalization in a model of opset {opset} cannot be rewritten "
                f"(onnxeps needs opset {_MIN_OPSET} or newer).",
                "Convert the model with onnx.version_converter first.",
            )
        consumers = consumer_map(model)
        graph_outputs = {v.name for ref in iter_graphs(model) for v in ref.graph.output}
        types = infer_types(model)
        names = NameScope(model)
        # Children first: rebuilding a parent node list copies its subgraphs.
        for ref in reversed(list(iter_graphs(model))):
            if not any(_is_batchnorm(node) for node in ref.graph.node):
                continue
            nodes: list[onnx.NodeProto] = []
            for node in ref.graph.node:
                if not _is_batchnorm(node):
                    nodes.append(node)
                    continue
                _check_outputs(node, consumers, graph_outputs)
                nodes.extend(_replace(node, names, opset, types))
            del ref.graph.node[:]
            ref.graph.node.extend(nodes)
        return True
