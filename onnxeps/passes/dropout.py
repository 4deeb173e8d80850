"""Remove Dropout: the metric runs the network without train-time noise."""

from __future__ import annotations

import onnx
from onnx import helper

from onnxeps.errors import RewriteError
from onnxeps.graphs import consumer_map, iter_graphs, main_opset, node_label
from onnxeps.passes.base import NameScope

__all__ = ["RemoveDropout"]

# From opset 10 the mask is bool. Before that it has the input's float type, and
# ConstantOfShape, which makes the all-true mask, exists only from opset 9.
_BOOL_MASK_OPSET = 10


class RemoveDropout:
    """Replace every Dropout by Identity; a used mask output becomes all true."""

    name = "remove-dropout"

    def __call__(self, model: onnx.ModelProto) -> bool:
        if not any(_is_dropout(n) for ref in iter_graphs(model) for n in ref.graph.node):
            return False
        consumers = consumer_map(model)
        graph_outputs = {v.name for ref in iter_graphs(model) for v in ref.graph.output}
        names = NameScope(model)
        opset = main_opset(model)
        changed = False
        # Children first: rebuilding a parent node list copies its subgraphs.
        for ref in reversed(list(iter_graphs(model))):
            nodes = []
            for node in ref.graph.node:
                if _is_dropout(node):
                    nodes.extend(
                        _replacement(node, consumers, graph_outputs, names, opset)
                    )
                else:
                    nodes.append(node)
            if len(nodes) != len(ref.graph.node) or any(
                n.op_type == "Dropout" for n in ref.graph.node
            ):
                del ref.graph.node[:]
                ref.graph.node.extend(nodes)
                changed = True
        return changed


def _replacement(
    node, consumers, graph_outputs, names, opset
) -> list[onnx.NodeProto]:
    label = node_label(node)
    nodes = [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=label)]
    mask = node.output[1] if len(node.output) > 1 else ""
    if mask and (consumers.get(mask) or mask in graph_outputs):
        if opset < _BOOL_MASK_OPSET:
            raise RewriteError(
                f"Dropout '{label}' has its mask output '{mask}' read by the graph in "
                f"a model of opset {opset}; onnxeps rewrites used masks from opset "
                f"{_BOOL_MASK_OPSET} on.",
                "Convert the model with onnx.version_converter first.",
            )
        shape = names.fresh(f"{mask}/shape")
        nodes.append(helper.make_node("Shape", [node.input[0]], [shape], name=shape))
        true = helper.make_tensor("value", onnx.TensorProto.BOOL, [1], [True])
        nodes.append(
            helper.make_node(
                "ConstantOfShape", [shape], [mask], name=names.fresh(mask), value=true
            )
        )
    return nodes


def _is_dropout(node: onnx.NodeProto) -> bool:
    return node.op_type == "Dropout" and node.domain in ("", "ai.onnx")
