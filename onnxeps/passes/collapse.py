"""Evaluate an exactly equivalent narrow graph, using the constant-weight symmetry.

With every weight of a convolution equal to w, all its output channels are equal, so a
tensor's channels (axis 1) fall into groups of identical channels. A tensor is tracked as
its *structure*: the multiplicities (m_1, ..., m_K) of its K distinct channels, in channel
order. The narrow graph keeps one channel per group. A convolution reading K narrow
channels then needs the weight w * m_k on narrow input channel k, so that it sums the same
values as the full convolution; BatchNormalization, activations, pooling, sums and
concatenation act on each group alone. A Gather at the end repeats each narrow channel m_k
times, so the scored output equals the full graph's output up to float rounding.

The pass covers the operators of convolutional cell networks (NAS-Bench-201 and -101):
Conv (dense or depthwise), BatchNormalization, elementwise activations, pooling, Add/Sum/
Mul and friends, Concat, Slice, Flatten/Reshape before the classifier, Gemm and MatMul.
Any other operator, or a weight that is not a rewritten constant, leaves the model as it
is (the pass reports why).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxeps.graphs import node_label
from onnxeps.infer import TensorType, infer_types
from onnxeps.passes.base import NameScope
from onnxeps.tensors import tensor_from_array

__all__ = ["CollapseChannels"]

log = logging.getLogger(__name__)

Structure = tuple[int, ...]

_ELEMENTWISE_UNARY = frozenset(
    {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "HardSigmoid",
     "HardSwish", "Gelu", "Identity", "Abs", "Neg", "Exp", "Sqrt", "Dropout"}
)  # fmt: skip
_POOLING = frozenset(
    {"AveragePool", "MaxPool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
     "GlobalLpPool"}
)  # fmt: skip
_ELEMENTWISE_NARY = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean"})
_BOX_FILTER_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE})


class NotCovered(Exception):
    """The model uses something the narrow evaluation does not cover."""


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node_label(node)}'"


class _Narrowing:
    """Structures of the main graph's tensors and the edits that narrow the graph."""

    def __init__(self, model: onnx.ModelProto, weights: set[str], types) -> None:
        self.model = model
        self.graph = model.graph
        self.weights = weights
        self.types: dict[str, TensorType] = types
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.structures: dict[str, Structure] = {}
        self.multipliers: dict[str, np.ndarray] = {}
        self.names = NameScope(model)
        # Identity outputs of constants (exporters share tensors through Identity nodes).
        self.aliases: dict[str, str] = {}
        # Outputs of convolutions to evaluate as pooling, with their kernel shapes.
        self.box_filters: dict[str, list[int]] = {}
        # Narrow types of what BatchNormalization nodes read, for the rewrite after this.
        self.batchnorm_types: dict[str, TensorType] = {}
        # Narrow constants and weight placeholders by value, so equal ones are shared.
        self.constants: dict[tuple, str] = {}
        self.placeholders: dict[tuple, str] = {}

    def resolve(self, name: str) -> str:
        return self.aliases.get(name, name)

    def add_alias(self, node: onnx.NodeProto) -> bool:
        """Record an Identity of a constant as an alias; return whether it was one."""
        if node.op_type != "Identity" or self.resolve(node.input[0]) not in self.initializers:
            return False
        self.aliases[node.output[0]] = self.resolve(node.input[0])
        return True

    # Reading the graph -------------------------------------------------------------

    def structure(self, name: str, node: onnx.NodeProto) -> Structure:
        if name not in self.structures:
            raise NotCovered(f"{_label(node)} reads '{name}', whose channels are not tracked")
        return self.structures[name]

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(self.resolve(name))
        return None if tensor is None else numpy_helper.to_array(tensor)

    def is_weight(self, name: str) -> bool:
        return self.resolve(name) in self.weights

    def rank(self, name: str) -> int | None:
        found = self.types.get(name)
        return None if found is None or found.shape is None else len(found.shape)

    def spatial_is_one(self, name: str) -> bool:
        found = self.types.get(name)
        return found is not None and found.shape is not None and all(
            d == 1 for d in found.shape[2:]
        )

    # Editing the graph -------------------------------------------------------------

    def set_weight(self, node, slot: int, shape: tuple[int, ...], multiplier) -> None:
        """Point one operator input at a narrow weight placeholder with its multiplier.

        Inputs of the same shape, type and multiplier share one placeholder, since the
        weight w gives them the same value.
        """
        name = node.input[slot]
        if not self.is_weight(name):
            raise NotCovered(f"{_label(node)} weight '{name}' is not a constant weight")
        data_type = self.initializers[self.resolve(name)].data_type
        multiplier = np.broadcast_to(multiplier, shape).astype(np.float64)
        key = (data_type, shape, multiplier.tobytes())
        if key not in self.placeholders:
            zeros = np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(data_type))
            self.placeholders[key] = self._add_initializer(f"{name}/narrow", zeros)
            self.multipliers[self.placeholders[key]] = multiplier
        node.input[slot] = self.placeholders[key]

    def replace_input(self, node, slot: int, values: np.ndarray) -> None:
        """Point one node input at a narrow constant (shared tensors stay intact).

        Equal constants share one initializer.
        """
        key = (values.dtype.str, values.shape, values.tobytes())
        if key not in self.constants:
            hint = f"{self.resolve(node.input[slot])}/narrow"
            self.constants[key] = self._add_initializer(hint, values)
        node.input[slot] = self.constants[key]

    def _add_initializer(self, hint: str, values: np.ndarray) -> str:
        name = self.names.fresh(hint)
        self.graph.initializer.append(tensor_from_array(values, name))
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def note_batchnorm_types(self, node, channels: int) -> None:
        """Record the narrow types of a BatchNormalization's input, scale and shift."""
        found = self.types.get(node.input[0])
        if found is None or found.shape is None:
            return
        spatial = (None,) * (len(found.shape) - 2)
        self.batchnorm_types[node.input[0]] = TensorType(found.elem_type, (None, channels, *spatial))
        for name in node.input[1:3]:
            tensor = self.initializers.get(name)
            if tensor is not None:
                self.batchnorm_types[name] = TensorType(tensor.data_type, (channels,))

    def zero_vector(self, node, slot: int, length: int) -> None:
        """Narrow a bias that must hold only zeros."""
        if slot >= len(node.input) or not node.input[slot]:
            return
        values = self.constant(node.input[slot])
        if values is None or np.any(values != 0) or self.is_weight(node.input[slot]):
            raise NotCovered(f"{_label(node)} has a bias that is not zero")
        self.replace_input(node, slot, np.zeros((length,), dtype=values.dtype))


def _conv(nar: _Narrowing, node) -> Structure:
    x = nar.structure(node.input[0], node)
    weight = nar.initializers.get(nar.resolve(node.input[1]))
    if weight is None:
        raise NotCovered(f"{_label(node)} weight is not an initializer")
    c_out, per_group, *kernel = weight.dims
    group = _attribute(node, "group", 1)
    narrow_in = len(x)
    if group == 1 and per_group == sum(x) and _is_box_filter(node, kernel, weight.data_type):
        # A uniform kernel: a window sum of the input channels weighted by w * m_k.
        window = int(np.prod(kernel))
        multiplier = np.asarray(x, dtype=np.float64) * window
        shape = (1, narrow_in, *[1] * len(kernel))
        nar.set_weight(node, 1, shape, multiplier.reshape(shape))
        nar.zero_vector(node, 2, 1)
        nar.box_filters[node.output[0]] = kernel
        return (c_out,)
    if group == 1 and per_group == sum(x):
        multiplier = np.asarray(x, dtype=np.float64).reshape(1, narrow_in, *[1] * len(kernel))
        nar.set_weight(node, 1, (1, narrow_in, *kernel), multiplier)
        nar.zero_vector(node, 2, 1)
        return (c_out,)
    if group == sum(x) == c_out and per_group == 1:
        nar.set_weight(node, 1, (narrow_in, 1, *kernel), 1.0)
        _set_int_attribute(node, "group", narrow_in)
        nar.zero_vector(node, 2, narrow_in)
        return x
    raise NotCovered(f"{_label(node)} is a grouped convolution (group {group})")


def _is_box_filter(node: onnx.NodeProto, kernel: list[int], data_type: int) -> bool:
    """Return whether a narrow convolution is a window sum that average pooling computes
    faster: a kernel larger than 1x1, no dilation, and padding that ONNX Runtime's
    AveragePool accepts.

    Only float32 and float64 weights qualify, because the weight w * m * (window size)
    overflows float16 where the convolution's own weight w * m does not.
    """
    if data_type not in _BOX_FILTER_TYPES or int(np.prod(kernel)) <= 1:
        return False
    if any(d != 1 for d in _attribute(node, "dilations", [1] * len(kernel))):
        return False
    # ONNX Runtime's AveragePool rejects a pad as large as the kernel, and the negative
    # padding that SAME padding computes for a stride larger than the kernel.
    pads = _attribute(node, "pads", [0] * 2 * len(kernel))
    if any(pad >= kernel[axis % len(kernel)] for axis, pad in enumerate(pads)):
        return False
    auto_pad = _attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    strides = _attribute(node, "strides", [1] * len(kernel))
    same = auto_pad in ("SAME_UPPER", "SAME_LOWER")
    return not same or all(stride <= size for stride, size in zip(strides, kernel))


def _box_filter_nodes(nar: _Narrowing, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Replace a box-filter convolution by average pooling (zero padding counted) and
    a weighting of the channels.

    The window mean times w * m_k * (window size), summed over the input channels,
    equals the convolution with the uniform kernel w * m_k, up to float rounding. One
    input channel is pooled and then scaled. Several are first summed by a 1x1
    convolution, so that only one channel is pooled.
    """
    kernel = nar.box_filters[node.output[0]]
    label = node_label(node)
    attributes = {"kernel_shape": kernel, "count_include_pad": 1}
    for name in ("strides", "pads", "auto_pad"):
        value = _attribute(node, name, None)
        if value is not None:
            attributes[name] = value
    source, weight, output = node.input[0], node.input[1], node.output[0]
    middle = nar.names.fresh(f"{output}/window")
    pool_name = nar.names.fresh(f"{label}/AveragePool")
    if nar.initializers[weight].dims[1] == 1:
        pool = helper.make_node(
            "AveragePool", [source], [middle], name=pool_name, **attributes
        )
        scale_name = nar.names.fresh(f"{label}/Mul")
        return [pool, helper.make_node("Mul", [middle, weight], [output], name=scale_name)]
    channel_sum = helper.make_node(
        "Conv", [source, weight], [middle], name=nar.names.fresh(f"{label}/Conv1x1"),
        kernel_shape=[1] * len(kernel),
    )  # fmt: skip
    pool = helper.make_node("AveragePool", [middle], [output], name=pool_name, **attributes)
    return [channel_sum, pool]


def _replace_box_filters(nar: _Narrowing) -> list[onnx.NodeProto]:
    """Return the graph's nodes with each box-filter convolution replaced."""
    nodes: list[onnx.NodeProto] = []
    for node in nar.graph.node:
        if node.op_type == "Conv" and node.output[0] in nar.box_filters:
            nodes.extend(_box_filter_nodes(nar, node))
        else:
            nodes.append(node)
    return nodes


def _batchnorm(nar: _Narrowing, node) -> Structure:
    x = nar.structure(node.input[0], node)
    if len(node.output) > 1 and any(node.output[1:]):
        raise NotCovered(f"{_label(node)} has running-statistics outputs")
    nar.set_weight(node, 1, (len(x),), 1.0)
    nar.zero_vector(node, 2, len(x))
    nar.note_batchnorm_types(node, len(x))
    # Running statistics are ignored by the batch-statistics rewrite that follows.
    for slot, fill in ((3, 0.0), (4, 1.0)):
        stat = nar.initializers.get(nar.resolve(node.input[slot]))
        if stat is None:
            raise NotCovered(f"{_label(node)} statistic is not an initializer")
        dtype = helper.tensor_dtype_to_np_dtype(stat.data_type)
        nar.replace_input(node, slot, np.full((len(x),), fill, dtype=dtype))
    return x


def _same_as_input(nar: _Narrowing, node) -> Structure:
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        raise NotCovered(f"{_label(node)} returns indices")
    return nar.structure(node.input[0], node)


def _elementwise(nar: _Narrowing, node) -> Structure:
    found: list[Structure] = []
    for slot, name in enumerate(node.input):
        values = nar.constant(name)
        if values is None:
            found.append(nar.structure(name, node))
        elif nar.is_weight(name) or (values.size > 1 and np.any(values != values.flat[0])):
            raise NotCovered(f"{_label(node)} reads a non-uniform constant '{name}'")
        elif values.size > 1:
            nar.replace_input(node, slot, values.reshape(-1)[:1].copy())
    wide = {s for s in found if len(s) > 1}
    if len(wide) > 1:
        raise NotCovered(f"{_label(node)} combines tensors of different channel groups")
    if wide:
        return wide.pop()
    totals = {sum(s) for s in found}
    if len(totals) > 1:
        raise NotCovered(f"{_label(node)} broadcasts along the channel axis")
    return found[0]


def _concat(nar: _Narrowing, node) -> Structure:
    parts = [nar.structure(name, node) for name in node.input]
    axis = _attribute(node, "axis", 1)
    rank = nar.rank(node.output[0]) or nar.rank(node.input[0])
    if axis == 1 or (rank is not None and axis == 1 - rank):
        return tuple(m for part in parts for m in part)
    if all(part == parts[0] for part in parts):
        return parts[0]
    raise NotCovered(f"{_label(node)} concatenates different channel groups")


def _narrow_range(structure: Structure, start: int, end: int) -> tuple[Structure, int, int]:
    """Channels [start, end) as a structure, with the narrow index range covering it."""
    groups, narrow_start, narrow_end, position = [], None, 0, 0
    for index, count in enumerate(structure):
        low, high = max(position, start), min(position + count, end)
        if high > low:
            groups.append(high - low)
            narrow_start = index if narrow_start is None else narrow_start
            narrow_end = index + 1
        position += count
    return tuple(groups), narrow_start or 0, narrow_end


def _slice(nar: _Narrowing, node) -> Structure:
    x = nar.structure(node.input[0], node)
    consts = [nar.constant(name) if name else None for name in node.input[1:]]
    if len(node.input) < 3 or any(c is None for c in consts):
        raise NotCovered(f"{_label(node)} has computed or attribute bounds")
    starts, ends = consts[0], consts[1]
    axes = consts[2] if len(consts) > 2 else np.arange(starts.size)
    steps = consts[3] if len(consts) > 3 else np.ones_like(starts)
    rank = nar.rank(node.input[0]) or 4
    axes = [(a + rank) % rank for a in axes.tolist()]
    if 1 not in axes:
        return x
    k = axes.index(1)
    if steps[k] != 1:
        raise NotCovered(f"{_label(node)} slices channels with a step")
    total = sum(x)
    start = int(np.clip(starts[k] + total if starts[k] < 0 else starts[k], 0, total))
    end = int(np.clip(ends[k] + total if ends[k] < 0 else ends[k], 0, total))
    structure, narrow_start, narrow_end = _narrow_range(x, start, end)
    for slot, values, bound in ((1, starts, narrow_start), (2, ends, narrow_end)):
        edited = values.copy()
        edited[k] = bound
        nar.replace_input(node, slot, edited)
    return structure


def _flatten(nar: _Narrowing, node) -> Structure:
    x = nar.structure(node.input[0], node)
    if node.op_type == "Flatten" and _attribute(node, "axis", 1) != 1:
        raise NotCovered(f"{_label(node)} flattens the batch axis")
    if not nar.spatial_is_one(node.input[0]):
        raise NotCovered(f"{_label(node)} flattens spatial positions into features")
    if node.op_type == "Reshape":
        shape = nar.constant(node.input[1])
        if shape is None or shape.size != 2:
            raise NotCovered(f"{_label(node)} reshapes to a computed or non-2D shape")
        if shape[1] > 0:
            nar.replace_input(node, 1, np.array([shape[0], len(x)], dtype=shape.dtype))
    return x


def _dense(nar: _Narrowing, node) -> Structure:
    x = nar.structure(node.input[0], node)
    if nar.rank(node.input[0]) != 2 or _attribute(node, "transA", 0):
        raise NotCovered(f"{_label(node)} is not a dense layer on (batch, features)")
    weight = nar.initializers.get(nar.resolve(node.input[1]))
    if weight is None:
        raise NotCovered(f"{_label(node)} weight is not an initializer")
    counts = np.asarray(x, dtype=np.float64)
    if node.op_type == "Gemm" and _attribute(node, "transB", 0):
        c_out = weight.dims[0]
        nar.set_weight(node, 1, (1, len(x)), counts.reshape(1, -1))
    else:
        c_out = weight.dims[1]
        nar.set_weight(node, 1, (len(x), 1), counts.reshape(-1, 1))
    if node.op_type == "Gemm":
        nar.zero_vector(node, 2, 1)
    return (c_out,)


_RULES: dict[str, Callable[[_Narrowing, onnx.NodeProto], Structure]] = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "Concat": _concat,
    "Slice": _slice,
    "Flatten": _flatten,
    "Reshape": _flatten,
    "Gemm": _dense,
    "MatMul": _dense,
    **{op: _same_as_input for op in _ELEMENTWISE_UNARY | _POOLING},
    **{op: _elementwise for op in _ELEMENTWISE_NARY},
}


def _seed_inputs(nar: _Narrowing) -> None:
    for value in nar.graph.input:
        found = nar.types.get(value.name)
        if found is None or found.shape is None or len(found.shape) < 2:
            raise NotCovered(f"input '{value.name}' has no channel axis")
        channels = found.shape[1]
        if not isinstance(channels, int):
            raise NotCovered(f"input '{value.name}' has a symbolic channel axis")
        nar.structures[value.name] = (1,) * channels


def _restore_output(nar: _Narrowing, output: str, nodes: list[onnx.NodeProto]) -> None:
    """Repeat each narrow channel of the scored tensor to the full channel count, with a
    Gather appended to ``nodes``."""
    structure = nar.structures.get(output)
    if structure is None:
        raise NotCovered(f"the scored output '{output}' has no tracked channels")
    narrow = nar.names.fresh(f"{output}/narrow")
    for node in nodes:
        for names in (node.output, node.input):
            if output in names:
                names[:] = [narrow if name == output else name for name in names]
    indices = np.repeat(np.arange(len(structure)), structure).astype(np.int64)
    index_name = nar.names.fresh(f"{output}/channel_index")
    nar.graph.initializer.append(tensor_from_array(indices, index_name))
    gather = helper.make_node("Gather", [narrow, index_name], [output], axis=1,
                              name=nar.names.fresh(f"{output}/Gather"))  # fmt: skip
    nodes.append(gather)


def _merge_duplicates(
    nodes: list[onnx.NodeProto], graph_outputs: set[str]
) -> list[onnx.NodeProto]:
    """Return one of each set of nodes that compute the same operator on the same
    inputs, with the readers of the others' outputs pointed at the one kept.

    Parallel branches that differ only in their weights, such as two convolutions of
    one tensor, become identical once narrow, because every weight takes the same
    value. The rule functions cover deterministic operators only, and Dropout is
    replaced by an identity before the collapse, so equal nodes give equal outputs.
    """
    unique: list[onnx.NodeProto] = []
    first: dict[tuple, onnx.NodeProto] = {}
    renamed: dict[str, str] = {}
    for node in nodes:
        if any(name in renamed for name in node.input):
            node.input[:] = [renamed.get(name, name) for name in node.input]
        attributes = tuple(a.SerializeToString() for a in node.attribute)
        key = (node.domain, node.op_type, tuple(node.input), attributes, len(node.output))
        same = first.setdefault(key, node)
        if same is node or graph_outputs.intersection(node.output):
            unique.append(node)
            continue
        renamed.update(zip(node.output, same.output))
    log.debug("merged %d duplicate node(s) of the narrow graph", len(nodes) - len(unique))
    return unique


def narrow_model(
    model: onnx.ModelProto, weights: list[str], output: str
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, TensorType]]:
    """Return the narrow copy of a rewritten model, its weight multipliers and the
    narrow types of what its BatchNormalization nodes read.

    Every narrow weight is a new placeholder; the returned dict maps each one's name to
    its multiplier array (the value is w times the array).

    Raises :class:`NotCovered` when the model uses something the pass does not cover.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in copy.graph.node for a in node.attribute):  # fmt: skip
        raise NotCovered("the model has control-flow subgraphs")
    nar = _Narrowing(copy, set(weights), infer_types(copy))
    _seed_inputs(nar)
    for node in copy.graph.node:
        if not node.output or not node.output[0]:
            raise NotCovered(f"{_label(node)} has no output")
        if nar.add_alias(node):
            continue
        rule = _RULES.get(node.op_type)
        if rule is None or node.domain not in ("", "ai.onnx"):
            raise NotCovered(f"operator {node.op_type} is not covered")
        nar.structures[node.output[0]] = rule(nar, node)
    nodes = _replace_box_filters(nar)
    _restore_output(nar, output, nodes)
    graph_outputs = {value.name for value in copy.graph.output}
    unique = _merge_duplicates(nodes, graph_outputs)
    del copy.graph.node[:]
    copy.graph.node.extend(unique)
    # Other outputs are narrow now, so their declared shapes no longer hold.
    kept = [value for value in copy.graph.output if value.name == output]
    del copy.graph.output[:]
    copy.graph.output.extend(kept)
    del copy.graph.value_info[:]
    inputs = {value.name for value in copy.graph.input}
    inner = [s for name, s in nar.structures.items() if name not in inputs]
    log.info(
        "narrow graph evaluated: at most %d channel(s) per tensor instead of %d",
        max((len(s) for s in inner), default=0),
        max((sum(s) for s in inner), default=0),
    )
    return copy, nar.multipliers, nar.batchnorm_types


class CollapseChannels:
    """Replace the model by its narrow equivalent when every operator is covered."""

    name = "collapse-channels"

    def __init__(self, weights: list[str], output: str) -> None:
        self.weights = weights
        self.output = output
        self.multipliers: dict[str, np.ndarray] = {}
        self.batchnorm_types: dict[str, TensorType] | None = None
        self.reason: str | None = None

    def __call__(self, model: onnx.ModelProto) -> bool:
        try:
            narrow, self.multipliers, types = narrow_model(model, self.weights, self.output)
        except NotCovered as error:
            self.reason = str(error)
            log.info("full graph evaluated: %s", error)
            return False
        model.CopyFrom(narrow)
        # The narrow placeholders replace the full ones, which no operator reads now.
        self.weights = list(self.multipliers)
        self.batchnorm_types = types
        return True
