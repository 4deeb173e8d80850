"""Expose the scored tensor as the only graph output and drop what does not feed it."""

from __future__ import annotations

import difflib
import logging

import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxeps.errors import OnnxepsError
from onnxeps.infer import infer_types

__all__ = ["ExposeOutput", "PruneUnused", "scored_output_name"]

log = logging.getLogger(__name__)

# A severity above CRITICAL, so that onnx-graphsurgeon's logger prints nothing.
_GS_SILENT = gs.logger.G_LOGGER.CRITICAL + 1


class UnknownOutputError(OnnxepsError):
    """The requested output tensor does not exist in the main graph."""


def scored_output_name(model: onnx.ModelProto, requested: str | None) -> str:
    """Return the tensor to score: ``requested``, or the first graph output."""
    outputs = [value.name for value in model.graph.output]
    if requested is None:
        if not outputs:
            raise OnnxepsError(
                "the model has no graph outputs, so there is nothing to score.",
                "Pass --output-name with a node output of the main graph.",
            )
        return outputs[0]
    produced = {name for node in model.graph.node for name in node.output if name}
    if requested in outputs or requested in produced:
        return requested
    close = difflib.get_close_matches(requested, sorted(produced | set(outputs)), n=3)
    suggestion = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownOutputError(
        f"output '{requested}' not found in the model; graph outputs are "
        f"{', '.join(repr(o) for o in outputs) or 'none'}, and any of the "
        f"{len(produced)} node outputs of the main graph can be scored.{suggestion}"
    )


class ExposeOutput:
    """Make the scored tensor the only output of the main graph."""

    name = "expose-output"

    def __init__(self, output_name: str) -> None:
        self.output_name = output_name

    def __call__(self, model: onnx.ModelProto) -> bool:
        graph = model.graph
        if [value.name for value in graph.output] == [self.output_name]:
            return False
        existing = {value.name: value for value in graph.output}
        if self.output_name in existing:
            value = existing[self.output_name]
        else:
            found = infer_types(model).get(self.output_name)
            if found is None:
                value = helper.make_empty_tensor_value_info(self.output_name)
            else:
                # onnx.checker rejects a graph output without a shape. Axes that
                # inference could not size stay open.
                value = helper.make_tensor_value_info(
                    self.output_name, found.elem_type, found.shape
                )
        kept = onnx.ValueInfoProto()
        kept.CopyFrom(value)
        del graph.output[:]
        graph.output.append(kept)
        return True


def _prune_flat(graph: onnx.GraphProto) -> None:
    """Keep the nodes and initializers the outputs depend on (no subgraphs).

    Entries are deleted in place: copying a kept initializer would serialise it, which
    protobuf cannot do for a tensor of 2 GiB or more.
    """
    needed = {value.name for value in graph.output}
    unused_nodes: list[int] = []
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if any(name in needed for name in node.output):
            needed.update(name for name in node.input if name)
        else:
            unused_nodes.append(index)
    _delete_at(graph.node, unused_nodes)
    initializers = enumerate(graph.initializer)
    _delete_at(graph.initializer, [i for i, t in initializers if t.name not in needed])


def _delete_at(entries, indices: list[int]) -> None:
    """Delete the entries at ``indices`` of a repeated field, copying no other."""
    for index in sorted(indices, reverse=True):
        del entries[index]


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    graph_types = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in graph_types for node in graph.node for a in node.attribute)


class PruneUnused:
    """Remove nodes and initializers that do not feed the graph outputs.

    Flat graphs are pruned by a backward sweep over the (topologically sorted) nodes;
    graphs with If/Loop/Scan bodies go through onnx-graphsurgeon, which follows the
    bodies' references to outer tensors. The metadata it drops is restored.
    """

    name = "prune-unused"

    def __call__(self, model: onnx.ModelProto) -> bool:
        before = len(model.graph.node), len(model.graph.initializer)
        if not _has_subgraphs(model.graph):
            _prune_flat(model.graph)
            return (len(model.graph.node), len(model.graph.initializer)) != before
        # onnx-graphsurgeon prints its warnings to stdout, which carries only records.
        # Its own exceptions still carry their message.
        with gs.logger.G_LOGGER.suppress(_GS_SILENT):
            graph = gs.import_onnx(model)
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
            graph.toposort()
            pruned = gs.export_onnx(graph, do_type_check=False)
        kept = onnx.ModelProto()
        kept.CopyFrom(model)
        kept.graph.CopyFrom(pruned.graph)
        model.CopyFrom(kept)
        after = len(model.graph.node), len(model.graph.initializer)
        log.debug("pruned %d nodes and %d initializers", before[0] - after[0], before[1] - after[1])
        return after != before
