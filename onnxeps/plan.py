"""The plan: every floating-point constant of a model, its role, the rewrite action and why.

Roles come from consumers, not names: each constant is followed through pass-through
operators (Identity, Cast, Transpose, Reshape, ...) and into If/Loop/Scan bodies to the
operator inputs that really read it, and the table in :mod:`onnxeps.roles` names the role
of each such input. A constant read in two roles is split into one entry per role.
Converters may attach role hints as a JSON object in the model's ``onnxeps.roles``
metadata entry; a hint overrides the table.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import onnx

from onnxeps.graphs import Use, consumer_map, iter_graphs, node_label
from onnxeps.roles import (
    ARITHMETIC,
    BIAS_ARITHMETIC,
    KEEP_SLOTS,
    LINEAR_PRODUCERS,
    NOISE_OPS,
    NORMALISATION_OPS,
    PASS_THROUGH,
    QUANTIZED_OPS,
    SLOT_ROLES,
    SUBGRAPH_INPUT_OFFSET,
    SUBGRAPH_OUTPUT_OFFSET,
    VALUE_INDEPENDENT,
    Action,
    Role,
    action_for,
)

__all__ = [
    "PlanEntry",
    "Plan",
    "build_plan",
    "ROLE_HINTS_KEY",
    "NORMALISATION_KEY",
    "FLOAT_TYPES",
]

log = logging.getLogger(__name__)

ROLE_HINTS_KEY = "onnxeps.roles"
# Metadata key where the torch and Keras converters record what became of the
# normalisation layers with stored statistics. "kept": each is a normalisation operator
# in the graph. "folded": at least one was folded into neighbouring operators at export.
# "absent": the source model has none.
NORMALISATION_KEY = "onnxeps.normalisation"
FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    }
)
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class TerminalUse:
    """An operator input that reads a constant (possibly through pass-through ops)."""

    use: Use
    role: Role
    reason: str

    def describe(self) -> str:
        node = self.use.node
        return f"{node.op_type} '{node_label(node)}' input {self.use.slot}"


@dataclass
class PlanEntry:
    """One floating-point constant (or one role of a split constant) and its rewrite."""

    tensor: str
    graph: str
    source: str
    shape: tuple[int, ...]
    dtype: str
    role: Role
    action: Action
    reason: str
    split: bool = False
    uses: list[TerminalUse] = field(default_factory=list, repr=False)

    def record(self) -> dict:
        """Return the entry as a plain dict (the plan's JSON/CSV record)."""
        return {
            "tensor": self.tensor,
            "graph": self.graph,
            "source": self.source,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "role": str(self.role),
            "action": str(self.action),
            "reason": self.reason,
            "split": self.split,
        }


@dataclass
class Plan:
    """Every floating-point constant of a model with its role and action.

    ``warnings`` lists facts that make the score differ from the reference semantics
    (unclassified tensors, folded normalisation, random operators); ``quantized`` names
    the quantized weights that stop the model from being scored.
    """

    entries: list[PlanEntry]
    warnings: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    recurrent_as_weight: bool = False

    def unclassified(self) -> list[PlanEntry]:
        return [entry for entry in self.entries if entry.role is Role.UNKNOWN]

    def with_action(self, action: Action) -> list[PlanEntry]:
        return [entry for entry in self.entries if entry.action is action]


@dataclass(frozen=True)
class _Constant:
    name: str
    graph: str
    source: str
    shape: tuple[int, ...]
    elem_type: int


class _Tracer:
    """Follows constants to the operator inputs that read them."""

    def __init__(self, model: onnx.ModelProto, constants: set[str]):
        self.consumers = consumer_map(model)
        self.constants = constants
        self.producers = {
            output: node
            for ref in iter_graphs(model)
            for node in ref.graph.node
            for output in node.output
        }
        self.subgraph_inputs = _subgraph_inputs(model)
        self.subgraph_outputs = _subgraph_outputs(model)

    def terminal_uses(self, name: str, size: int) -> list[TerminalUse]:
        found: list[TerminalUse] = []
        visited: set[str] = set()
        pending = [name]
        while pending:
            current = pending.pop()
            if current in visited:
                continue
            visited.add(current)
            for use in self.consumers.get(current, []):
                result = self._classify(use, size)
                if isinstance(result, TerminalUse):
                    found.append(result)
                elif result is not None:
                    pending.extend(result)
            # A value returned by an If/Loop/Scan body is read through the node output.
            pending.extend(self.subgraph_outputs.get(current, []))
        return found

    def _classify(self, use: Use, size: int) -> TerminalUse | list[str] | None:
        """Return a terminal use, the names to follow next, or None (value not read)."""
        node, slot = use.node, use.slot
        op = node.op_type
        if node.domain not in _DEFAULT_DOMAINS:
            return TerminalUse(use, Role.UNKNOWN, f"custom operator {node.domain}.{op}")
        if op in VALUE_INDEPENDENT:
            return None
        if op == "Gather" and slot == 0 and node.input[1] in self.constants:
            return list(node.output)
        rule = SLOT_ROLES.get(op, {}).get(slot)
        if rule is not None:
            return TerminalUse(use, rule.role, f"{op} input {slot} ({rule.input_name})")
        keep = KEEP_SLOTS.get(op, {}).get(slot)
        if keep is not None:
            return TerminalUse(use, Role.KEEP, keep[1])
        passed = PASS_THROUGH.get(op, ())
        if op in PASS_THROUGH and (passed is None or slot in passed):
            return [output for output in node.output if output]
        if _is_carried_state(node, slot):
            # The body reads this value on the first iteration only, then its own output.
            return TerminalUse(use, Role.RECURRENT_STATE, f"{op} loop-carried initial value")
        if op in SUBGRAPH_INPUT_OFFSET:
            inner = self.subgraph_inputs.get((id(node), slot))
            if inner is not None:
                return [inner]
        if op in ARITHMETIC:
            return self._classify_arithmetic(use, size)
        return TerminalUse(use, Role.UNKNOWN, f"no rule for {op} input {slot}")

    def _classify_arithmetic(self, use: Use, size: int) -> TerminalUse:
        node, op = use.node, use.node.op_type
        if size <= 1:
            return TerminalUse(use, Role.KEEP, f"scalar in {op}")
        if op in BIAS_ARITHMETIC and len(node.input) == 2:
            other = self.producers.get(node.input[1 - use.slot])
            if other is not None and other.op_type in LINEAR_PRODUCERS:
                return TerminalUse(use, Role.BIAS, f"{op} after {other.op_type}")
        return TerminalUse(use, Role.UNKNOWN, f"non-scalar constant in {op}")


def _is_carried_state(node: onnx.NodeProto, slot: int) -> bool:
    """Return whether a Loop or Scan input is the initial value of a state the body
    updates.

    A carried value that the body returns unchanged is a loop invariant, as some
    exporters pass weights, so the planner follows it into the body instead.
    """
    if node.domain not in _DEFAULT_DOMAINS:
        return False
    if node.op_type == "Loop" and slot >= 2:
        # Body inputs are (iteration, condition, states...); outputs (condition, states...).
        return not _body_returns_input(node, slot, slot - 1)
    if node.op_type == "Scan":
        scanned = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
        if slot < len(node.input) - scanned:
            return not _body_returns_input(node, slot, slot)
    return False


def _body_returns_input(node: onnx.NodeProto, in_index: int, out_index: int) -> bool:
    body = next((a.g for a in node.attribute if a.name == "body"), None)
    if body is None or in_index >= len(body.input) or out_index >= len(body.output):
        return False
    producers = {output: n for n in body.node for output in n.output}
    name = body.output[out_index].name
    while name != body.input[in_index].name:
        producer = producers.get(name)
        if producer is None or producer.op_type != "Identity":
            return False
        name = producer.input[0]
    return True


def _subgraph_inputs(model: onnx.ModelProto) -> dict[tuple[int, int], str]:
    """Map (id of a Loop/Scan node, explicit input slot) to the body input it feeds."""
    mapping: dict[tuple[int, int], str] = {}
    for ref in iter_graphs(model):
        for node in ref.graph.node:
            spec = SUBGRAPH_INPUT_OFFSET.get(node.op_type)
            if spec is None or node.domain not in _DEFAULT_DOMAINS:
                continue
            attribute_name, first_slot, offset = spec
            body = next((a.g for a in node.attribute if a.name == attribute_name), None)
            if body is None:
                continue
            for slot in range(first_slot, len(node.input)):
                index = slot + offset
                if index < len(body.input):
                    mapping[(id(node), slot)] = body.input[index].name
    return mapping


def _subgraph_outputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Map each If/Loop/Scan subgraph output to the node outputs that return it."""
    mapping: dict[str, list[str]] = defaultdict(list)
    for ref in iter_graphs(model):
        for node in ref.graph.node:
            spec = SUBGRAPH_OUTPUT_OFFSET.get(node.op_type)
            if spec is None or node.domain not in _DEFAULT_DOMAINS:
                continue
            attribute_names, offset = spec
            for attribute in node.attribute:
                if attribute.name not in attribute_names:
                    continue
                for index, value in enumerate(attribute.g.output):
                    position = index - offset
                    if 0 <= position < len(node.output) and node.output[position]:
                        mapping[value.name].append(node.output[position])
    return mapping


def _constant_node_tensor(node: onnx.NodeProto) -> tuple[tuple[int, ...], int] | None:
    """Return (shape, element type) of a float Constant node's value, else None."""
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.t.data_type in FLOAT_TYPES:
            return tuple(attribute.t.dims), attribute.t.data_type
        if attribute.name == "value_float":
            return (), onnx.TensorProto.FLOAT
        if attribute.name == "value_floats":
            return (len(attribute.floats),), onnx.TensorProto.FLOAT
    return None


def _collect_constants(model: onnx.ModelProto) -> tuple[dict[str, _Constant], set[str]]:
    """Return the float constants in graph order, and the names of all constants."""
    floats: dict[str, _Constant] = {}
    every: set[str] = set()
    for ref in iter_graphs(model):
        for tensor in ref.graph.initializer:
            every.add(tensor.name)
            if tensor.data_type in FLOAT_TYPES:
                floats[tensor.name] = _Constant(
                    tensor.name, ref.path, "initializer", tuple(tensor.dims),
                    tensor.data_type,
                )  # fmt: skip
        for node in ref.graph.node:
            if node.op_type != "Constant" or node.domain not in _DEFAULT_DOMAINS:
                continue
            every.update(node.output)
            found = _constant_node_tensor(node)
            if found is not None:
                source = f"Constant node '{node_label(node)}'"
                floats[node.output[0]] = _Constant(
                    node.output[0], ref.path, source, found[0], found[1]
                )
    return floats, every


def _role_hints(model: onnx.ModelProto, warnings: list[str]) -> dict[str, Role]:
    text = next((p.value for p in model.metadata_props if p.key == ROLE_HINTS_KEY), None)
    if text is None:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        warnings.append(f"ignored role hints in metadata '{ROLE_HINTS_KEY}': {error}")
        return {}
    if not isinstance(raw, dict):
        warnings.append(f"ignored role hints in metadata '{ROLE_HINTS_KEY}': not an object")
        return {}
    hints: dict[str, Role] = {}
    for name, value in raw.items():
        try:
            hints[name] = Role(value)
        except ValueError:
            warnings.append(f"ignored role hint {value!r} for tensor '{name}'")
    return hints


@functools.cache
def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def _entries_for(
    constant: _Constant,
    uses: list[TerminalUse],
    hint: Role | None,
    recurrent_as_weight: bool,
) -> list[PlanEntry]:
    dtype = _dtype_name(constant.elem_type)
    base = (constant.name, constant.graph, constant.source, constant.shape, dtype)
    if hint is not None:
        action = action_for(hint, recurrent_as_weight)
        return [PlanEntry(*base, hint, action, "role hint in model metadata", False, uses)]
    if not uses:
        return [PlanEntry(*base, Role.KEEP, Action.KEEP, "not read by any operator")]
    by_role: dict[Role, list[TerminalUse]] = defaultdict(list)
    for use in uses:
        by_role[use.role].append(use)
    acting = [r for r in by_role if action_for(r, recurrent_as_weight) is not Action.UNUSED]
    split = len(acting) > 1
    entries = []
    for role, role_uses in by_role.items():
        reasons = sorted({use.reason for use in role_uses})
        action = action_for(role, recurrent_as_weight)
        entries.append(PlanEntry(*base, role, action, "; ".join(reasons), split, role_uses))
    return entries


def _quantized_weights(model: onnx.ModelProto, constants: set[str]) -> list[str]:
    """Name the nodes that hold quantized (integer) weights."""
    found = []
    for ref in iter_graphs(model):
        for node in ref.graph.node:
            label = f"{node.op_type} '{node_label(node)}'"
            if node.op_type in QUANTIZED_OPS:
                found.append(label)
            elif node.op_type == "DequantizeLinear" and node.input[0] in constants:
                found.append(label)
    return found


def _model_warnings(model: onnx.ModelProto) -> list[str]:
    """Warn about operators that make the score differ from the reference semantics."""
    ops = {node.op_type for ref in iter_graphs(model) for node in ref.graph.node}
    warnings = []
    noise = sorted(ops & NOISE_OPS)
    if noise:
        warnings.append(
            f"the model draws random numbers at run time ({', '.join(noise)}); "
            "scores may differ between runs"
        )
    folded = _folded_normalisation_warning(model, ops)
    if folded is not None:
        warnings.append(folded)
    return warnings


_FOLDED_EFFECT = (
    "so the score is that of a network without normalisation, not the reference "
    "semantics (batch statistics)."
)
_KEEP_NORMALISATION = (
    "Re-export with normalisation kept: onnxeps convert torch, onnxeps convert keras, "
    "or torch.onnx with do_constant_folding=False."
)


def _folded_normalisation_warning(model: onnx.ModelProto, ops: set[str]) -> str | None:
    """Return a warning when normalisation was, or may have been, folded at export.

    The evidence is checked strongest first. An onnxeps converter's record in the
    metadata comes first, then the names tf2onnx gives the tensors of a
    Conv+BatchNormalization fusion, then Conv weights that torch.onnx computed at
    export. Last come convolutions with biases in a graph without normalisation
    operators, which plain CNNs also have.
    """
    recorded = next(
        (p.value for p in model.metadata_props if p.key == NORMALISATION_KEY), None
    )
    if recorded == "folded":
        return (
            f"the converter recorded that normalisation was folded into neighbouring "
            f"operators at export (metadata {NORMALISATION_KEY} = folded), "
            f"{_FOLDED_EFFECT} {_KEEP_NORMALISATION}"
        )
    fused = _tf2onnx_fused_tensors(model)
    if fused:
        more = f" and {len(fused) - 1} more" if len(fused) > 1 else ""
        return (
            f"tf2onnx folded BatchNormalization into a convolution (initializer "
            f"'{fused[0]}'{more}), {_FOLDED_EFFECT} {_KEEP_NORMALISATION}"
        )
    if ops & NORMALISATION_OPS or recorded == "absent":
        return None
    biased = _biased_convolutions(model)
    if not biased:
        return None
    if model.producer_name == "pytorch":
        # With do_constant_folding=False, torch.onnx names weights after the module's
        # parameters. A fold computes new tensors, which it names "onnx::Conv_<n>".
        computed = [node for node in biased if node.input[1].startswith("onnx::")]
        if computed:
            node = computed[0]
            return (
                f"Conv '{node_label(node)}' reads weights that torch.onnx "
                f"computed at export ('{node.input[1]}'), as its constant folding does "
                f"when it folds BatchNormalization into the convolution, "
                f"{_FOLDED_EFFECT} {_KEEP_NORMALISATION}"
            )
    return (
        "convolutions carry biases and the model has no normalisation operators. "
        "Either the model never had normalisation, or BatchNormalization was folded "
        f"into the convolutions at export, {_FOLDED_EFFECT} {_KEEP_NORMALISATION}"
    )


def _tf2onnx_fused_tensors(model: onnx.ModelProto) -> list[str]:
    # tf2onnx 1.17 names the weights and bias of a fused Conv+BatchNormalization
    # "<conv>_weights_fused_bn" and "<conv>_bias_fused_bn".
    return [
        tensor.name
        for ref in iter_graphs(model)
        for tensor in ref.graph.initializer
        if tensor.name.endswith("_fused_bn")
    ]


def _biased_convolutions(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    found = []
    for ref in iter_graphs(model):
        for node in ref.graph.node:
            if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 2:
                if node.input[2]:
                    found.append(node)
    return found


def build_plan(model: onnx.ModelProto, recurrent_as_weight: bool = False) -> Plan:
    """Classify every floating-point initializer and Constant-node tensor of ``model``.

    ``recurrent_as_weight`` selects the NAS-Bench-NLP semantics, where recurrent biases
    and initial states take the value w instead of 0 and their given values.
    """
    warnings: list[str] = []
    floats, every = _collect_constants(model)
    hints = _role_hints(model, warnings)
    for name in sorted(hints.keys() - floats.keys()):
        warnings.append(
            f"ignored role hint for '{name}': the model has no floating-point constant "
            "of that name"
        )
    tracer = _Tracer(model, every)
    entries: list[PlanEntry] = []
    for constant in floats.values():
        size = math.prod(constant.shape)
        uses = tracer.terminal_uses(constant.name, size)
        entries.extend(
            _entries_for(constant, uses, hints.get(constant.name), recurrent_as_weight)
        )
    plan = Plan(entries, warnings, _quantized_weights(model, every), recurrent_as_weight)
    for entry in plan.unclassified():
        plan.warnings.append(
            f"unclassified tensor '{entry.tensor}' ({entry.reason}) kept as it is"
        )
    plan.warnings.extend(_model_warnings(model))
    log.debug("plan: %d entries, %d warnings", len(entries), len(plan.warnings))
    return plan
