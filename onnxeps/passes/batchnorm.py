"""Rewrite BatchNormalization to normalise with the statistics of the current batch.

The metric ignores running statistics: mean and biased variance are computed over every
axis except the channel axis (axis 1) of the batch being scored, with the node's epsilon.
The rewrite uses InstanceNormalization over a view with one row per channel, not
training-mode BatchNormalization, which crashes ONNX Runtime or gives wrong results
(ORT 1.31-1.32; see the README).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
from onnx import helper

from onnxeps.errors import RewriteError
from onnxeps.graphs import iter_graphs, main_opset, node_label
from onnxeps.infer import TensorType, infer_types
from onnxeps.passes.base import NameScope

__all__ = ["BatchNormToBatchStatistics"]

_DEFAULT_EPSILON = 1e-5
_MIN_OPSET = 5  # Reshape takes its shape as an input from opset 5


class _SharedConstants:
    """Integer constants that the replacements in one graph share, as Constant nodes
    that go at the front of the graph."""

    def __init__(self, names: NameScope) -> None:
        self.names = names
        self.nodes: list[onnx.NodeProto] = []
        self._by_value: dict[tuple[int, ...], str] = {}

    def ints(self, stem: str, values: list[int]) -> str:
        key = tuple(values)
        if key not in self._by_value:
            output = self.names.fresh(f"batchnorm/{stem}")
            tensor = helper.make_tensor(stem, onnx.TensorProto.INT64, [len(values)], values)
            node_name = self.names.fresh(f"batchnorm/{stem}/Constant")
            self.nodes.append(
                helper.make_node("Constant", [], [output], name=node_name, value=tensor)
            )
            self._by_value[key] = output
        return self._by_value[key]


class _Emitter:
    """Builds the replacement nodes of one BatchNormalization node."""

    def __init__(
        self, node: onnx.NodeProto, names: NameScope, opset: int, shared: _SharedConstants
    ) -> None:
        self.node = node
        self.names = names
        self.opset = opset
        self.shared = shared
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
        return self.shared.ints(stem, values)

    def reduce_mean_rows(self, value: str) -> str:
        """Mean over the last axis of a (1, C, S) tensor, keeping dims."""
        if self.opset >= 18:
            return self.op("ReduceMean", [value, self.ints("axes", [2])], keepdims=1)
        return self.op("ReduceMean", [value], axes=[2], keepdims=1)

    def unsqueeze_front(self, value: str) -> str:
        """Add a leading axis of size 1."""
        if self.opset >= 13:
            return self.op("Unsqueeze", [value, self.ints("axes", [0])])
        return self.op("Unsqueeze", [value], axes=[0])

    def cast(self, value: str, have: int, want: int) -> str:
        """Cast to ``want`` unless the value's type ``have`` already is it."""
        return value if have == want else self.op("Cast", [value], to=want)


def _elem(types: Mapping[str, TensorType], name: str) -> int:
    found = types.get(name)
    return found.elem_type if found else onnx.TensorProto.UNDEFINED


def _epsilon(node: onnx.NodeProto) -> float:
    for attribute in node.attribute:
        if attribute.name == "epsilon":
            return attribute.f
    return _DEFAULT_EPSILON


def _to_channel_rows(emit: _Emitter, x: str, channels) -> str:
    """Reshape (N, C, ...) to (1, C, N*...): one row per channel, batch and space."""
    if channels == 1:
        # With one channel the transposed layout is the same memory, so no copy.
        return emit.op("Reshape", [x, emit.ints("rows_shape", [1, 1, -1])])
    flat = emit.op("Reshape", [x, emit.ints("flat_shape", [0, 0, -1])])
    moved = emit.op("Transpose", [flat], perm=[1, 0, 2])
    rows = emit.op("Reshape", [moved, emit.ints("rows_shape", [0, -1])])
    return emit.unsqueeze_front(rows)


def _from_channel_rows(emit: _Emitter, rows: str, x: str, channels, output: str) -> None:
    """Undo :func:`_to_channel_rows`: back to the shape of ``x``, written to ``output``."""
    if channels == 1:
        emit.op("Reshape", [rows, emit.op("Shape", [x])], output=output)
        return
    flat = emit.op("Reshape", [x, emit.ints("flat_shape", [0, 0, -1])])
    moved_shape = emit.op("Shape", [emit.op("Transpose", [flat], perm=[1, 0, 2])])
    moved = emit.op("Reshape", [rows, moved_shape])
    back = emit.op("Transpose", [moved], perm=[1, 0, 2])
    emit.op("Reshape", [back, emit.op("Shape", [x])], output=output)


def _channels(x_type: TensorType | None):
    if x_type is None or x_type.shape is None or len(x_type.shape) < 2:
        return None
    return x_type.shape[1]


def _instance_norm(emit: _Emitter, rows: str, scale: str, shift: str, eps: float) -> str:
    return emit.op("InstanceNormalization", [rows, scale, shift], epsilon=eps)


def _normalise_in_double(emit: _Emitter, rows: str, scale: str, shift: str, eps: float) -> str:
    """Emit the same normalisation in primitive operators, because ONNX Runtime's CPU
    provider has no double InstanceNormalization."""
    mean = emit.reduce_mean_rows(rows)
    centred = emit.op("Sub", [rows, mean])
    variance = emit.reduce_mean_rows(emit.op("Mul", [centred, centred]))
    eps_tensor = helper.make_tensor("eps", onnx.TensorProto.DOUBLE, [], [eps])
    std = emit.op("Sqrt", [emit.op("Add", [variance, emit.constant("epsilon", eps_tensor)])])
    channel_shape = emit.ints("channel_shape", [1, -1, 1])
    scaled = emit.op("Mul", [emit.op("Div", [centred, std]), emit.op("Reshape", [scale, channel_shape])])
    return emit.op("Add", [scaled, emit.op("Reshape", [shift, channel_shape])])


def _replace(
    node, names, opset, types: Mapping[str, TensorType], shared: _SharedConstants
) -> list[onnx.NodeProto]:
    """Normalise each channel over batch and space with InstanceNormalization.

    InstanceNormalization over a (1, C, N*S) view computes exactly the per-channel batch
    mean and biased variance, in one operator instead of a dozen elementwise ones.
    float16 and bfloat16 inputs are normalised in float32, double inputs in double.
    """
    x, scale, shift = node.input[0], node.input[1], node.input[2]
    emit = _Emitter(node, names, opset, shared)
    x_type = types.get(x) or types.get(node.output[0])
    elem = x_type.elem_type if x_type else onnx.TensorProto.UNDEFINED
    if elem == onnx.TensorProto.UNDEFINED:
        raise RewriteError(
            f"BatchNormalization '{emit.prefix}': the element type of its input "
            f"'{x}' is unknown, so it cannot be rewritten to batch statistics.",
            "Run onnx.shape_inference on the model, or export it with value types.",
        )
    work = onnx.TensorProto.DOUBLE if elem == onnx.TensorProto.DOUBLE else onnx.TensorProto.FLOAT
    channels = _channels(x_type)
    rows = emit.cast(_to_channel_rows(emit, x, channels), elem, work)
    scale = emit.cast(scale, _elem(types, scale), work)
    shift = emit.cast(shift, _elem(types, shift), work)
    normalise = _normalise_in_double if work == onnx.TensorProto.DOUBLE else _instance_norm
    normalised = emit.cast(normalise(emit, rows, scale, shift, _epsilon(node)), work, elem)
    _from_channel_rows(emit, normalised, x, channels, node.output[0])
    return emit.nodes


def _is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _read_statistics(model: onnx.ModelProto, batchnorms) -> set[str]:
    """Return the running-statistics outputs of ``batchnorms`` that a node or a graph
    output reads."""
    statistics = {name for node in batchnorms for name in node.output[1:] if name}
    if not statistics:
        return set()
    read = {v.name for ref in iter_graphs(model) for v in ref.graph.output}
    read.update(
        name for ref in iter_graphs(model) for node in ref.graph.node for name in node.input
    )
    return statistics & read


def _check_outputs(node: onnx.NodeProto, read_statistics: set[str]) -> None:
    for name in node.output[1:]:
        if name in read_statistics:
            raise RewriteError(
                f"BatchNormalization '{node_label(node)}' has its running "
                f"statistics output '{name}' read by the graph; onnxeps cannot rewrite it "
                "to batch statistics.",
                "Export the model in inference mode (training_mode 0).",
            )


class BatchNormToBatchStatistics:
    """Replace every BatchNormalization (training_mode 0 or 1) by batch-statistics math."""

    name = "batchnorm-to-batch-statistics"

    def __init__(self, types: Mapping[str, TensorType] | None = None) -> None:
        """``types`` may give the type of every BatchNormalization's input (and of its
        scale and shift) when the caller knows them; otherwise shape inference runs."""
        self.types = types

    def __call__(self, model: onnx.ModelProto) -> bool:
        opset = main_opset(model)
        batchnorms = [n for ref in iter_graphs(model) for n in ref.graph.node if _is_batchnorm(n)]
        if not batchnorms:
            return False
        if opset < _MIN_OPSET:
            raise RewriteError(
                f"BatchNormalization in a model of opset {opset} cannot be rewritten "
                f"(onnxeps needs opset {_MIN_OPSET} or newer).",
                "Convert the model with onnx.version_converter first.",
            )
        read_statistics = _read_statistics(model, batchnorms)
        inputs = [node.input[0] for node in batchnorms]
        known = self.types is not None and all(name in self.types for name in inputs)
        types = self.types if known else infer_types(model)
        names = NameScope(model)
        # Children first: rebuilding a parent node list copies its subgraphs.
        for ref in reversed(list(iter_graphs(model))):
            if not any(_is_batchnorm(node) for node in ref.graph.node):
                continue
            shared = _SharedConstants(names)
            nodes: list[onnx.NodeProto] = []
            for node in ref.graph.node:
                if not _is_batchnorm(node):
                    nodes.append(node)
                    continue
                _check_outputs(node, read_statistics)
                nodes.extend(_replace(node, names, opset, types, shared))
            del ref.graph.node[:]
            ref.graph.node.extend(shared.nodes + nodes)
        return True
