"""Roles of operator inputs for the metric: the per-op knowledge of the planner.

Every rule is one table entry keyed by operator type and input slot, so supporting a new
operator is one reviewed line. ``tests/test_roles.py`` checks every slot and input name
against the ONNX operator schemas.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

__all__ = [
    "Role",
    "Action",
    "SlotRule",
    "SLOT_ROLES",
    "KEEP_SLOTS",
    "PASS_THROUGH",
    "VALUE_INDEPENDENT",
    "ARITHMETIC",
    "BIAS_ARITHMETIC",
    "LINEAR_PRODUCERS",
    "QUANTIZED_OPS",
    "SUBGRAPH_INPUT_OFFSET",
    "SUBGRAPH_OUTPUT_OFFSET",
    "NOISE_OPS",
    "NORMALISATION_OPS",
    "action_for",
]


class Role(StrEnum):
    """Role of a floating-point constant in the network."""

    WEIGHT = "weight"
    BIAS = "bias"
    NORM_SCALE = "norm_scale"
    NORM_SHIFT = "norm_shift"
    NORM_STAT = "norm_stat"
    EMBEDDING = "embedding"
    RECURRENT_WEIGHT = "recurrent_weight"
    RECURRENT_BIAS = "recurrent_bias"
    RECURRENT_STATE = "recurrent_state"
    KEEP = "keep"
    UNKNOWN = "unknown"


class Action(StrEnum):
    """Rewrite applied to a tensor of a role."""

    WEIGHT = "set to w"
    ZERO = "set to 0"
    UNIFORM = "fill U(0,1)"
    UNUSED = "unused (batch statistics)"
    KEEP = "keep"


# Generic actions (reference semantics for any model).
_GENERIC_ACTIONS = {
    Role.WEIGHT: Action.WEIGHT,
    Role.BIAS: Action.ZERO,
    Role.NORM_SCALE: Action.WEIGHT,
    Role.NORM_SHIFT: Action.ZERO,
    Role.NORM_STAT: Action.UNUSED,
    Role.EMBEDDING: Action.UNIFORM,
    Role.RECURRENT_WEIGHT: Action.WEIGHT,
    Role.RECURRENT_BIAS: Action.ZERO,
    Role.RECURRENT_STATE: Action.KEEP,
    Role.KEEP: Action.KEEP,
    Role.UNKNOWN: Action.KEEP,
}

# The NAS-Bench-NLP experiments set recurrent biases and initial states to w as well.
_RECURRENT_AS_WEIGHT = {
    Role.RECURRENT_BIAS: Action.WEIGHT,
    Role.RECURRENT_STATE: Action.WEIGHT,
}


def action_for(role: Role, recurrent_as_weight: bool = False) -> Action:
    """Return the rewrite action for a role."""
    if recurrent_as_weight and role in _RECURRENT_AS_WEIGHT:
        return _RECURRENT_AS_WEIGHT[role]
    return _GENERIC_ACTIONS[role]


class SlotRule(NamedTuple):
    """The role of one operator input slot, with the slot's name in the ONNX schema."""

    role: Role
    input_name: str


_W, _B = Role.WEIGHT, Role.BIAS
_RW, _RB, _RS = Role.RECURRENT_WEIGHT, Role.RECURRENT_BIAS, Role.RECURRENT_STATE

# Operator type -> {input slot: rule}. Slots not listed fall through to KEEP_SLOTS, then
# to the arithmetic and pass-through rules, then to UNKNOWN.
SLOT_ROLES: dict[str, dict[int, SlotRule]] = {
    "Conv": {1: SlotRule(_W, "W"), 2: SlotRule(_B, "B")},
    "ConvTranspose": {1: SlotRule(_W, "W"), 2: SlotRule(_B, "B")},
    "Gemm": {0: SlotRule(_W, "A"), 1: SlotRule(_W, "B"), 2: SlotRule(_B, "C")},
    "MatMul": {0: SlotRule(_W, "A"), 1: SlotRule(_W, "B")},
    "BatchNormalization": {
        1: SlotRule(Role.NORM_SCALE, "scale"),
        2: SlotRule(Role.NORM_SHIFT, "B"),
        3: SlotRule(Role.NORM_STAT, "input_mean"),
        4: SlotRule(Role.NORM_STAT, "input_var"),
    },
    "InstanceNormalization": {
        1: SlotRule(Role.NORM_SCALE, "scale"),
        2: SlotRule(Role.NORM_SHIFT, "B"),
    },
    "LayerNormalization": {
        1: SlotRule(Role.NORM_SCALE, "Scale"),
        2: SlotRule(Role.NORM_SHIFT, "B"),
    },
    "GroupNormalization": {
        1: SlotRule(Role.NORM_SCALE, "scale"),
        2: SlotRule(Role.NORM_SHIFT, "bias"),
    },
    "RMSNormalization": {1: SlotRule(Role.NORM_SCALE, "scale")},
    "LSTM": {
        1: SlotRule(_RW, "W"),
        2: SlotRule(_RW, "R"),
        3: SlotRule(_RB, "B"),
        5: SlotRule(_RS, "initial_h"),
        6: SlotRule(_RS, "initial_c"),
        7: SlotRule(_RW, "P"),
    },
    "GRU": {
        1: SlotRule(_RW, "W"),
        2: SlotRule(_RW, "R"),
        3: SlotRule(_RB, "B"),
        5: SlotRule(_RS, "initial_h"),
    },
    "RNN": {
        1: SlotRule(_RW, "W"),
        2: SlotRule(_RW, "R"),
        3: SlotRule(_RB, "B"),
        5: SlotRule(_RS, "initial_h"),
    },
    # Gather's data is an embedding table only when its indices vary at run time; with
    # constant indices it is a pass-through (see the planner).
    "Gather": {0: SlotRule(Role.EMBEDDING, "data")},
}

# Operator type -> {input slot: (schema input name, reason)}: float inputs that are
# hyper-parameters, never weights.
KEEP_SLOTS: dict[str, dict[int, tuple[str, str]]] = {
    "Resize": {1: ("roi", "Resize region of interest"), 2: ("scales", "Resize scales")},
    "Upsample": {1: ("scales", "Upsample scales")},
    "Clip": {1: ("min", "Clip bound"), 2: ("max", "Clip bound")},
    "Pad": {2: ("constant_value", "Pad value")},
    "Dropout": {1: ("ratio", "Dropout ratio")},
    "QuantizeLinear": {
        1: ("y_scale", "quantisation scale"),
        2: ("y_zero_point", "quantisation zero point"),
    },
    "DequantizeLinear": {
        1: ("x_scale", "quantisation scale"),
        2: ("x_zero_point", "quantisation zero point"),
    },
    "PRelu": {1: ("slope", "PRelu slope (an activation parameter)")},
    "Range": {
        0: ("start", "Range bound"),
        1: ("limit", "Range bound"),
        2: ("delta", "Range step"),
    },
    "ConstantOfShape": {0: ("input", "output shape")},
    "CumSum": {1: ("axis", "CumSum axis")},
}

# Operators whose output holds only values of the listed inputs (reordered, reshaped,
# sliced or re-typed): a constant-filled input stays constant-filled. None = all inputs.
PASS_THROUGH: dict[str, tuple[int, ...] | None] = {
    "Identity": (0,),
    "Cast": (0,),
    "CastLike": (0,),
    "Transpose": (0,),
    "Reshape": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Flatten": (0,),
    "Expand": (0,),
    "Tile": (0,),
    "Slice": (0,),
    "Split": (0,),
    "Concat": None,
}

# Consumers that read only a tensor's shape or size, never its values.
VALUE_INDEPENDENT = frozenset({"Shape", "Size"})

# Elementwise arithmetic: a scalar constant here is a coefficient (attention scale, GELU
# constant, epsilon) and is kept; a non-scalar constant added to the output of a linear
# operator is that operator's bias.
ARITHMETIC = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod",
        "Where", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
    }
)  # fmt: skip
BIAS_ARITHMETIC = frozenset({"Add", "Sum"})
LINEAR_PRODUCERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})

# Operators that carry quantized (integer) weights; onnxeps does not score them.
# QLinearAdd, QLinearMul, MatMulNBits, GatherBlockQuantized, QGemm, QAttention and
# DynamicQuantizeMatMul are ONNX Runtime contrib operators (domain com.microsoft)
# that its quantizer emits; the planner matches these op types in any domain.
QUANTIZED_OPS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
        "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "MatMulNBits",
        "GatherBlockQuantized", "QGemm", "QAttention", "DynamicQuantizeMatMul",
    }
)  # fmt: skip

# Control-flow operators whose explicit input k feeds subgraph input k + offset.
SUBGRAPH_INPUT_OFFSET: dict[str, tuple[str, int, int]] = {
    # op: (subgraph attribute, first explicit input slot that maps, offset)
    "Loop": ("body", 2, 0),
    "Scan": ("body", 0, 0),
}

# Control-flow operators whose subgraph output k is returned as node output k - offset.
# A Loop body returns its condition first; If branches and Scan bodies do not.
SUBGRAPH_OUTPUT_OFFSET: dict[str, tuple[tuple[str, ...], int]] = {
    # op: (subgraph attributes, offset)
    "If": (("then_branch", "else_branch"), 0),
    "Loop": (("body",), 1),
    "Scan": (("body",), 0),
}

# Operators that draw random numbers at run time; the metric assumes none.
NOISE_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
     "Bernoulli", "Multinomial"}
)  # fmt: skip

NORMALISATION_OPS = frozenset(
    {"BatchNormalization", "InstanceNormalization", "LayerNormalization",
     "GroupNormalization", "RMSNormalization", "LpNormalization"}
)  # fmt: skip
