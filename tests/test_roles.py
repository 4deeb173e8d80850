"""Check the per-operator role tables against the ONNX operator schemas (onnx.defs).

A wrong slot index would silently give a tensor the wrong role, so every slot must exist
in the latest schema of its operator and carry the input name the table states.
"""

from __future__ import annotations

import onnx.defs
import pytest

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
    VALUE_INDEPENDENT,
    Action,
    Role,
    action_for,
)

_VARIADIC = onnx.defs.OpSchema.FormalParameterOption.Variadic


def schema_input_name(op_type: str, slot: int) -> str | None:
    """Return the schema's name of input ``slot`` (variadic tail included), or None."""
    inputs = onnx.defs.get_schema(op_type).inputs
    if slot < len(inputs):
        return inputs[slot].name
    if inputs and inputs[-1].option == _VARIADIC:
        return inputs[-1].name
    return None


_SLOT_CASES = [
    (op, slot, rule.input_name)
    for op, slots in SLOT_ROLES.items()
    for slot, rule in slots.items()
]
_KEEP_CASES = [
    (op, slot, name)
    for op, slots in KEEP_SLOTS.items()
    for slot, (name, _) in slots.items()
]
_OP_SETS = {
    "ARITHMETIC": ARITHMETIC,
    "BIAS_ARITHMETIC": BIAS_ARITHMETIC,
    "LINEAR_PRODUCERS": LINEAR_PRODUCERS,
    "QUANTIZED_OPS": QUANTIZED_OPS,
    "NOISE_OPS": NOISE_OPS,
    "NORMALISATION_OPS": NORMALISATION_OPS,
    "VALUE_INDEPENDENT": VALUE_INDEPENDENT,
}
_SET_CASES = [(label, op) for label, ops in _OP_SETS.items() for op in sorted(ops)]
# ONNX Runtime contrib operators (domain com.microsoft), absent from onnx.defs.
_CONTRIB_QUANTIZED_OPS = {
    "QLinearAdd", "QLinearMul", "MatMulNBits", "GatherBlockQuantized", "QGemm",
    "QAttention", "DynamicQuantizeMatMul",
}  # fmt: skip


@pytest.mark.parametrize(("op_type", "slot", "name"), _SLOT_CASES)
def test_slot_roles_match_schema(op_type, slot, name):
    assert onnx.defs.has(op_type)
    assert schema_input_name(op_type, slot) == name


@pytest.mark.parametrize(("op_type", "slot", "name"), _KEEP_CASES)
def test_keep_slots_match_schema(op_type, slot, name):
    assert onnx.defs.has(op_type)
    assert schema_input_name(op_type, slot) == name


def test_keep_slots_have_reasons():
    for op_type, slots in KEEP_SLOTS.items():
        for slot, (_, reason) in slots.items():
            assert reason, f"{op_type} input {slot} has no reason"


def test_slot_tables_disjoint():
    overlap = {
        (op, slot)
        for op, slots in SLOT_ROLES.items()
        for slot in slots
        if slot in KEEP_SLOTS.get(op, {})
    }
    assert overlap == set()


@pytest.mark.parametrize("op_type", sorted(PASS_THROUGH))
def test_pass_through_ops_exist(op_type):
    assert onnx.defs.has(op_type)
    slots = PASS_THROUGH[op_type]
    if slots is None:
        return
    for slot in slots:
        assert schema_input_name(op_type, slot) is not None, f"{op_type} input {slot}"


@pytest.mark.parametrize(("label", "op_type"), _SET_CASES)
def test_op_sets_exist(label, op_type):
    if label == "QUANTIZED_OPS" and op_type in _CONTRIB_QUANTIZED_OPS:
        # If onnx adopts the operator, move it out of the contrib list.
        assert not onnx.defs.has(op_type)
        return
    assert onnx.defs.has(op_type), f"{op_type} in {label}"


def test_bias_arithmetic_subset():
    assert BIAS_ARITHMETIC <= ARITHMETIC


@pytest.mark.parametrize("op_type", sorted(SUBGRAPH_INPUT_OFFSET))
def test_subgraph_offsets_match_schema(op_type):
    attribute, first_slot, offset = SUBGRAPH_INPUT_OFFSET[op_type]
    schema = onnx.defs.get_schema(op_type)
    assert attribute in schema.attributes
    assert schema_input_name(op_type, first_slot) is not None
    assert first_slot + offset >= 0


def test_loop_carried_slot_is_v_initial():
    # Loop inputs are (M, cond, v_initial...) and the body reads (iter, cond, v...), so
    # explicit input 2 feeds body input 2.
    assert SUBGRAPH_INPUT_OFFSET["Loop"] == ("body", 2, 0)
    assert schema_input_name("Loop", 2) == "v_initial"


def test_pass_through_excludes_slot_tables():
    for op_type in PASS_THROUGH:
        assert op_type not in SLOT_ROLES, op_type


@pytest.mark.parametrize("role", list(Role))
def test_action_for_every_role(role):
    assert isinstance(action_for(role), Action)
    assert isinstance(action_for(role, recurrent_as_weight=True), Action)


@pytest.mark.parametrize(
    ("role", "generic", "recurrent"),
    [
        (Role.WEIGHT, Action.WEIGHT, Action.WEIGHT),
        (Role.BIAS, Action.ZERO, Action.ZERO),
        (Role.NORM_SCALE, Action.WEIGHT, Action.WEIGHT),
        (Role.NORM_SHIFT, Action.ZERO, Action.ZERO),
        (Role.NORM_STAT, Action.UNUSED, Action.UNUSED),
        (Role.EMBEDDING, Action.UNIFORM, Action.UNIFORM),
        (Role.RECURRENT_WEIGHT, Action.WEIGHT, Action.WEIGHT),
        (Role.RECURRENT_BIAS, Action.ZERO, Action.WEIGHT),
        (Role.RECURRENT_STATE, Action.KEEP, Action.WEIGHT),
        (Role.KEEP, Action.KEEP, Action.KEEP),
        (Role.UNKNOWN, Action.KEEP, Action.KEEP),
    ],
)
def test_action_for_table(role, generic, recurrent):
    assert action_for(role) is generic
    assert action_for(role, recurrent_as_weight=True) is recurrent
