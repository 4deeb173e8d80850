"""Set the constants the metric prescribes: weights to w, biases to 0, embeddings to
U(0, 1) values drawn once from the seed.

:class:`ApplyConstants` runs first on the model the plan was built on (it reads the
plan's node references). It zeroes biases, fills embeddings, turns Constant-node weights
into initializers and splits constants read in several roles. The tensors that take w
stay placeholders, named in ``weight_tensors``. :func:`weights_as_inputs` turns them
into graph inputs that :func:`weight_feeds` fills for each weight value, or, where a
weight sits in a subgraph, :func:`fill_weights` makes one model per weight value.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxeps.errors import RewriteError
from onnxeps.graphs import iter_graphs
from onnxeps.infer import infer_types
from onnxeps.passes.base import NameScope
from onnxeps.plan import Plan, PlanEntry
from onnxeps.roles import Action

__all__ = [
    "ApplyConstants", "fill_weights", "weights_as_inputs", "weight_feeds",
    "weight_cast_warnings",
]  # fmt: skip

log = logging.getLogger(__name__)

_REWRITTEN = (Action.WEIGHT, Action.ZERO, Action.UNIFORM)


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def _filled(name: str, shape, elem_type: int, action: Action, rng):
    """Make the tensor an action prescribes (the weight placeholder is all zeros)."""
    dtype = _np_dtype(elem_type)
    if action is Action.UNIFORM:
        values = rng.random(tuple(shape)).astype(dtype)
    else:
        values = np.zeros(tuple(shape), dtype=dtype)
    return numpy_helper.from_array(values, name)


class ApplyConstants:
    """Rewrite the constants of a plan in place; collect the names that take w."""

    name = "apply-constants"

    def __init__(self, plan: Plan, rng: np.random.Generator) -> None:
        self.plan = plan
        self.rng = rng
        self.weight_tensors: list[str] = []

    def __call__(self, model: onnx.ModelProto) -> bool:
        entries = [e for e in self.plan.entries if e.action in _REWRITTEN]
        if not entries:
            return False
        graphs = {ref.path: ref.graph for ref in iter_graphs(model)}
        names = NameScope(model)
        types = infer_types(model) if any(e.split for e in entries) else {}
        initializers = {
            (path, tensor.name): tensor
            for path, graph in graphs.items()
            for tensor in graph.initializer
        }
        constant_nodes: set[str] = set()
        for entry in entries:
            graph = graphs[entry.graph]
            if entry.split:
                self._split(entry, graphs, names, types)
            elif entry.source == "initializer":
                self._replace_initializer(initializers[(entry.graph, entry.tensor)], entry)
            else:
                constant_nodes.add(entry.tensor)
                self._add_initializer(graph, entry.tensor, entry)
        _drop_constant_nodes(model, constant_nodes)
        return True

    def _new_tensor(self, name: str, shape, elem_type: int, action: Action):
        if action is Action.WEIGHT:
            self.weight_tensors.append(name)
        return _filled(name, shape, elem_type, action, self.rng)

    def _replace_initializer(self, tensor: onnx.TensorProto, entry: PlanEntry) -> None:
        new = self._new_tensor(tensor.name, tensor.dims, tensor.data_type, entry.action)
        tensor.CopyFrom(new)

    def _add_initializer(self, graph, name: str, entry: PlanEntry) -> None:
        elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(entry.dtype))
        graph.initializer.append(self._new_tensor(name, entry.shape, elem_type, entry.action))

    def _split(self, entry: PlanEntry, graphs, names: NameScope, types) -> None:
        """Give the operator inputs of this role a rewritten copy of what they read.

        Inputs that read the same value share one copy, so that an embedding read by
        two Gathers stays one table. A copy of the constant itself sits in the
        constant's graph, which every graph that reads it can see.
        """
        copies: dict[tuple[str, str], str] = {}
        for terminal in entry.uses:
            node, slot = terminal.use.node, terminal.use.slot
            read = node.input[slot]
            path = entry.graph if read == entry.tensor else terminal.use.graph_path
            if (path, read) not in copies:
                shape, elem_type = _value_type(read, entry, types)
                fresh = names.fresh(f"{entry.tensor}/{entry.role}")
                tensor = self._new_tensor(fresh, shape, elem_type, entry.action)
                graphs[path].initializer.append(tensor)
                copies[(path, read)] = fresh
            node.input[slot] = copies[(path, read)]
            log.debug(
                "split '%s': %s reads '%s'", entry.tensor, terminal.describe(),
                copies[(path, read)],
            )  # fmt: skip


def _value_type(name: str, entry: PlanEntry, types) -> tuple[tuple[int, ...], int]:
    """Return the static shape and element type of the value an operator input reads."""
    if name == entry.tensor:
        return entry.shape, helper.np_dtype_to_tensor_dtype(np.dtype(entry.dtype))
    found = types.get(name)
    if found is None or found.shape is None or not all(
        isinstance(d, int) for d in found.shape
    ):
        raise RewriteError(
            f"tensor '{entry.tensor}' is read in several roles, and the shape of "
            f"'{name}' derived from it is not static, so it cannot be split.",
            "Export the model with separate tensors for each role.",
        )
    return tuple(found.shape), found.elem_type


def _drop_constant_nodes(model: onnx.ModelProto, outputs: set[str]) -> None:
    if not outputs:
        return
    # Children first: rebuilding a parent node list copies its subgraphs.
    for ref in reversed(list(iter_graphs(model))):
        kept = [n for n in ref.graph.node if not (n.op_type == "Constant" and n.output[0] in outputs)]
        if len(kept) != len(ref.graph.node):
            del ref.graph.node[:]
            ref.graph.node.extend(kept)


def _weight_array(shape, dtype: np.dtype, weight: float, multiplier) -> np.ndarray:
    """Return ``weight`` (times the multiplier, in float64) in the tensor's type.

    Callers silence overflow warnings: weight_cast_warnings reports values that become
    inf in narrow types.
    """
    if multiplier is not None:
        return (weight * multiplier).astype(dtype)
    return np.full(tuple(shape), weight, dtype=dtype)


def fill_weights(
    template: onnx.ModelProto,
    names: list[str],
    weight: float,
    multipliers: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """Return a copy of the template whose weight placeholders contain ``weight``.

    A tensor with a multiplier array (from the channel collapse) contains ``weight``
    times that array, computed in float64 and then cast to the tensor's type.
    """
    model = onnx.ModelProto()
    model.CopyFrom(template)
    wanted = set(names)
    multipliers = multipliers or {}
    for ref in iter_graphs(model):
        for tensor in ref.graph.initializer:
            if tensor.name in wanted:
                dtype = _np_dtype(tensor.data_type)
                with np.errstate(over="ignore"):
                    values = _weight_array(tensor.dims, dtype, weight, multipliers.get(tensor.name))
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


WeightSlots = dict[str, tuple[tuple[int, ...], np.dtype]]


def weights_as_inputs(model: onnx.ModelProto, names: list[str]) -> WeightSlots | None:
    """Turn the weight placeholders into graph inputs, so one session serves every w.

    Returns each weight's shape and type, or None, leaving the model unchanged, when a
    weight sits in a subgraph (a graph input can only feed the main graph's names).
    Names that the model no longer has (pruned as unused) are skipped.
    """
    weight_names = set(names)
    graph = model.graph
    nested = (
        tensor.name
        for ref in iter_graphs(model)
        if ref.path != "main"
        for tensor in ref.graph.initializer
    )
    if any(name in weight_names for name in nested):
        return None
    slots: WeightSlots = {}
    others = []
    for tensor in graph.initializer:
        if tensor.name not in weight_names:
            others.append(tensor)
            continue
        slots[tensor.name] = (tuple(tensor.dims), _np_dtype(tensor.data_type))
        graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
    del graph.initializer[:]
    graph.initializer.extend(others)
    return slots


def weight_feeds(
    slots: WeightSlots, weight: float, multipliers: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Return the input arrays of :func:`weights_as_inputs` for one weight value."""
    multipliers = multipliers or {}
    with np.errstate(over="ignore"):
        return {
            name: _weight_array(shape, dtype, weight, multipliers.get(name))
            for name, (shape, dtype) in slots.items()
        }


def weight_cast_warnings(
    template: onnx.ModelProto, names: list[str], weights: tuple[float, ...]
) -> list[str]:
    """Warn when a weight value becomes inf or 0 in the type of some weight tensor."""
    wanted = set(names)
    types = {
        tensor.data_type
        for ref in iter_graphs(template)
        for tensor in ref.graph.initializer
        if tensor.name in wanted
    }
    warnings = []
    for elem_type in sorted(types):
        dtype = _np_dtype(elem_type)
        for weight in weights:
            with np.errstate(over="ignore", under="ignore"):
                value = float(np.asarray(weight).astype(dtype))
            if not np.isfinite(value) or (value == 0.0 and weight != 0.0):
                warnings.append(
                    f"weight {weight:g} is {value:g} in the {dtype.name} weight tensors, "
                    "so that run does not use the requested weight"
                )
    return warnings
