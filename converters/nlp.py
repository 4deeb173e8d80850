"""Convert NAS-Bench-NLP recurrent-cell recipes to ONNX language models.

A recipe maps node names to ``{"op": ..., "input": [...]}``. Node inputs are other
nodes, ``x`` (the layer input at this time step) or ``h_prev_k`` (state k from the
previous step). ``h_new_0`` is required: it is the new hidden state and the layer's
output. Every ``h_new_k`` is carried to the next step as ``h_prev_k``, so the state
numbers must run 0..K-1. Nodes that reach no ``h_new_k`` are dropped.

Ops: ``linear`` (one or more inputs) computes W_1 a_1 + ... + W_n a_n + b with one
weight matrix per input and one bias, mapping to the hidden size.
``activation_tanh``, ``activation_sigm`` and ``activation_leaky_relu`` (slope 0.01)
take one input. ``elementwise_prod`` and ``elementwise_sum`` take two inputs of equal
width, and ``blend`` (z, a, b) computes z*a + (1 - z)*b.

The model is the benchmark's 3-layer language model in eval mode (no dropout): a
400-wide embedding, recurrent layers with hidden sizes 600, 600 and 400, and a decoder
tied to the embedding. The graph is unrolled over ``seq_len`` steps, so the sequence
axis is fixed and only the batch axis is symbolic. Input ``tokens`` is int64
(seq_len, batch), sequence first. Outputs are ``logits`` (seq_len, batch, vocab_size)
and ``hidden_unit0`` (seq_len, batch): unit 0 of the last layer's ``h_new_0`` at every
step.

The tie is exported as two tensors: the embedding table, read by a Gather, and a
transposed copy used by the decoder MatMul. The ``onnxeps.tied_weights`` metadata entry
records the pair. The benchmark counts the tied matrix once, so its parameter count
excludes ``decoder.weight``.

Initializer names (``l`` is the layer 0..2, ``node`` a recipe node name):

- ``embedding.weight`` (vocab_size, 400), role ``embedding``
- ``layers.{l}.{node}.weight{i}`` (hidden, width of input i) and
  ``layers.{l}.{node}.bias`` (hidden,) for a linear node, roles ``recurrent_weight``
  and ``recurrent_bias``
- ``layers.{l}.h_prev_{k}`` (1, hidden), the initial state k, role
  ``recurrent_state``, present only when the recipe reads ``h_prev_k``
- ``decoder.weight`` (400, vocab_size), role ``weight``, and ``decoder.bias``
  (vocab_size,), role ``bias``
- ``one`` (a scalar 1.0, role ``keep``) when the recipe has a blend

Default initial values: linear weights and biases are U(-1/sqrt(hidden),
1/sqrt(hidden)), as the benchmark's ``CustomRNN.reset_parameters`` draws them. The
embedding is U(-0.1, 0.1) and the decoder bias 0, a common language-model
initialization that is not taken from the benchmark's code. Initial states are 0, and
``decoder.weight`` defaults to the transpose of the embedding's value.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ._builder import (
    BATCH_DIM,
    CONVERTER_KEY,
    ENCODING_KEY,
    GraphBuilder,
    filled,
    make_value_info,
    save_model_atomic,
    uniform,
)

__all__ = ["OPS", "Recipe", "RecipeNode", "parse_recipe", "build", "convert"]

CONVERTER_ID = "onnxeps.converters.nlp 1"
TIED_WEIGHTS_KEY = "onnxeps.tied_weights"
EMBEDDING_SIZE = 400
HIDDEN_SIZES = (600, 600, 400)
LEAKY_RELU_SLOPE = 0.01
EMBEDDING_INIT_RANGE = 0.1
ACTIVATIONS = {
    "activation_tanh": "Tanh",
    "activation_sigm": "Sigmoid",
    "activation_leaky_relu": "LeakyRelu",
}
ELEMENTWISE = {"elementwise_prod": "Mul", "elementwise_sum": "Add"}
# Number of inputs per op. None means one or more.
ARITY: dict[str, int | None] = {
    "linear": None,
    **{op: 1 for op in ACTIVATIONS},
    **{op: 2 for op in ELEMENTWISE},
    "blend": 3,
}
OPS = tuple(ARITY)
STATE_PATTERN = re.compile(r"h_(new|prev)_(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class RecipeNode:
    """One recipe node: its op and the names of its inputs, in order."""

    op: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the nodes that reach a state, in topological order."""

    nodes: dict[str, RecipeNode]
    num_states: int


def parse_recipe(recipe: Mapping[str, Any] | str) -> Recipe:
    """Validate a recipe (a mapping or its JSON text) and order its nodes.

    Raises ValueError naming the node at fault for malformed entries, unknown ops, wrong
    input counts, unknown input names, a missing ``h_new_0``, state numbers with gaps,
    ``h_prev_k`` without ``h_new_k``, or a cycle.
    """
    raw = _load_recipe(recipe)
    nodes = {name: _parse_node(name, entry) for name, entry in raw.items()}
    num_states = _count_states(nodes)
    _check_references(nodes, num_states)
    order = _topological_order(nodes)
    used = _reaching_states(nodes, num_states)
    return Recipe({name: nodes[name] for name in order if name in used}, num_states)


def _load_recipe(recipe: Mapping[str, Any] | str) -> Mapping[str, Any]:
    if isinstance(recipe, str):
        try:
            recipe = json.loads(recipe)
        except json.JSONDecodeError as error:
            raise ValueError(f"the recipe is not valid JSON: {error}") from None
    if not isinstance(recipe, Mapping) or not recipe:
        raise ValueError(
            "a recipe must be a non-empty JSON object mapping node names to "
            '{"op": ..., "input": [...]}'
        )
    return recipe


def _parse_node(name: str, entry: Any) -> RecipeNode:
    if name == "x" or (STATE_PATTERN.fullmatch(name) and name.startswith("h_prev")):
        raise ValueError(f"node name {name!r} is reserved for a cell input")
    if not isinstance(entry, Mapping) or not isinstance(entry.get("op"), str):
        raise ValueError(
            f'node {name!r} must be an object with "op" and "input", got {entry!r}'
        )
    inputs = entry.get("input")
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise ValueError(f'node {name!r} must have "input" as a list of node names')
    op = entry["op"]
    if op not in ARITY:
        raise ValueError(
            f"node {name!r} has unknown op {op!r}; valid ops are {', '.join(OPS)}"
        )
    expected = ARITY[op]
    if expected is None:
        valid, count = bool(inputs), "one or more"
    else:
        valid, count = len(inputs) == expected, str(expected)
    if not valid:
        raise ValueError(
            f"node {name!r} ({op}) has {len(inputs)} inputs, expected {count}"
        )
    return RecipeNode(op, tuple(inputs))


def _count_states(nodes: Mapping[str, RecipeNode]) -> int:
    """Return K for states h_new_0..h_new_{K-1}. Raise ValueError if one is missing."""
    numbers = sorted(
        int(match.group(2))
        for name in nodes
        if (match := STATE_PATTERN.fullmatch(name)) and match.group(1) == "new"
    )
    if not numbers or numbers[0] != 0:
        raise ValueError(
            "the recipe has no 'h_new_0' node, which is the required output"
        )
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1])) - set(numbers))
        raise ValueError(
            f"the recipe has h_new_{numbers[-1]} but no h_new_{missing[0]}; "
            f"state numbers must run from 0 without gaps"
        )
    return len(numbers)


def _check_references(nodes: Mapping[str, RecipeNode], num_states: int) -> None:
    for name, node in nodes.items():
        for source in node.inputs:
            if source == "x" or source in nodes:
                continue
            match = STATE_PATTERN.fullmatch(source)
            if match and match.group(1) == "prev" and int(match.group(2)) < num_states:
                continue
            if match and match.group(1) == "prev":
                raise ValueError(
                    f"node {name!r} reads {source!r}, but the recipe has no "
                    f"'h_new_{match.group(2)}' to carry that state"
                )
            raise ValueError(
                f"node {name!r} reads {source!r}, which is not a recipe node, 'x' or "
                f"h_prev_0..h_prev_{num_states - 1}"
            )


def _topological_order(nodes: Mapping[str, RecipeNode]) -> list[str]:
    """Order nodes so each follows its inputs. Raise ValueError naming a cycle."""
    order: list[str] = []
    state: dict[str, str] = {}
    for start in nodes:
        _visit(start, nodes, state, order, [])
    return order


def _visit(
    name: str,
    nodes: Mapping[str, RecipeNode],
    state: dict[str, str],
    order: list[str],
    path: list[str],
) -> None:
    if name not in nodes or state.get(name) == "done":
        return
    if state.get(name) == "active":
        # ``path`` runs from readers to their inputs, so reverse it to show data flow.
        cycle = [name, *reversed(path[path.index(name) :])]
        raise ValueError(f"the recipe has a cycle: {' -> '.join(cycle)}")
    state[name] = "active"
    path.append(name)
    for source in nodes[name].inputs:
        _visit(source, nodes, state, order, path)
    path.pop()
    state[name] = "done"
    order.append(name)


def _reaching_states(nodes: Mapping[str, RecipeNode], num_states: int) -> set[str]:
    """Return the nodes that some h_new_k depends on, the states included."""
    used: set[str] = set()
    pending = [f"h_new_{k}" for k in range(num_states)]
    while pending:
        name = pending.pop()
        if name in used or name not in nodes:
            continue
        used.add(name)
        pending.extend(nodes[name].inputs)
    return used


def build(
    recipe: Mapping[str, Any] | str,
    vocab_size: int = 10000,
    seq_len: int = 70,
    init_seed: int | None = 0,
    weights: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """Build the 3-layer language model of one recipe as a checked ONNX model.

    ``weights`` maps initializer names (see the module docstring) to values that
    replace the seeded initial values. Raises ValueError for an invalid recipe (see
    :func:`parse_recipe`), a recipe whose elementwise ops mix widths in some layer,
    non-positive sizes, or unknown or mis-shaped ``weights`` entries.
    """
    parsed = parse_recipe(recipe)
    if vocab_size < 1 or seq_len < 1:
        raise ValueError(
            f"vocab_size and seq_len must be at least 1, got {vocab_size} and {seq_len}"
        )
    builder = GraphBuilder(init_seed, weights)
    tokens = builder.reserve_name("tokens")
    steps = _add_embedding(builder, tokens, vocab_size, seq_len)
    batch = builder.add_node("Shape", [tokens], "batch_size", start=1, end=2)
    in_size = EMBEDDING_SIZE
    for layer, hidden in enumerate(HIDDEN_SIZES):
        _check_widths(parsed, layer, in_size, hidden)
        steps = _add_layer(builder, steps, parsed, layer, (in_size, hidden), batch)
        in_size = hidden
    sequence = _stack_steps(builder, steps)
    _add_decoder(builder, sequence, vocab_size)
    _add_hidden_unit0(builder, sequence)
    float32 = onnx.TensorProto.FLOAT
    return builder.build_model(
        "nas_bench_nlp",
        [make_value_info("tokens", onnx.TensorProto.INT64, (seq_len, BATCH_DIM))],
        [
            make_value_info("logits", float32, (seq_len, BATCH_DIM, vocab_size)),
            make_value_info("hidden_unit0", float32, (seq_len, BATCH_DIM)),
        ],
        _metadata(recipe),
    )


def convert(
    recipe: Mapping[str, Any] | str,
    path: str | os.PathLike[str],
    vocab_size: int = 10000,
    seq_len: int = 70,
    init_seed: int | None = 0,
    weights: Mapping[str, Any] | None = None,
) -> Path:
    """Build the language model of ``recipe`` and write it atomically to ``path``.

    Raises ValueError for invalid arguments (see :func:`build`) and OSError if the
    file cannot be written.
    """
    model = build(recipe, vocab_size, seq_len, init_seed, weights)
    return save_model_atomic(model, path)


def _metadata(recipe: Mapping[str, Any] | str) -> dict[str, str]:
    encoding = json.dumps(_load_recipe(recipe))
    tied = [
        {
            "tensor": "decoder.weight",
            "tied_to": "embedding.weight",
            "transform": "transpose",
        }
    ]
    return {
        ENCODING_KEY: encoding,
        CONVERTER_KEY: CONVERTER_ID,
        TIED_WEIGHTS_KEY: json.dumps(tied),
    }


def _check_widths(recipe: Recipe, layer: int, in_size: int, hidden: int) -> None:
    """Raise ValueError if an op in ``layer`` would combine unequal widths."""
    widths = {"x": in_size, **{f"h_prev_{k}": hidden for k in range(recipe.num_states)}}
    for name, node in recipe.nodes.items():
        input_widths = [widths[source] for source in node.inputs]
        if node.op == "linear":
            _check_linear_widths(name, node, input_widths, layer, hidden)
        elif len(set(input_widths)) > 1:
            raise ValueError(
                f"node {name!r} ({node.op}) combines widths {input_widths} in "
                f"layer {layer} (input size {in_size}, hidden size {hidden}); its "
                f"inputs must have equal widths, so x may reach it only through a "
                f"linear node"
            )
        widths[name] = hidden if node.op == "linear" else input_widths[0]
        if STATE_PATTERN.fullmatch(name) and widths[name] != hidden:
            raise ValueError(
                f"state {name!r} has width {widths[name]} in layer {layer}, but states "
                f"must have the hidden size {hidden}"
            )


def _check_linear_widths(
    name: str, node: RecipeNode, input_widths: list[int], layer: int, hidden: int
) -> None:
    # Like the benchmark's multi-input linear layer, a weight matrix reads x or a
    # tensor of the hidden size.
    for source, width in zip(node.inputs, input_widths):
        if source != "x" and width != hidden:
            raise ValueError(
                f"linear node {name!r} reads {source!r} of width {width} in layer "
                f"{layer}; inputs other than x must have the hidden size {hidden}"
            )


def _add_embedding(
    builder: GraphBuilder, tokens: str, vocab_size: int, seq_len: int
) -> list[str]:
    """Look up the token embeddings and split them into one (batch, 400) per step."""
    table = builder.add_parameter(
        "embedding.weight",
        (vocab_size, EMBEDDING_SIZE),
        "embedding",
        uniform(EMBEDDING_INIT_RANGE),
    )
    embedded = builder.add_node("Gather", [table, tokens], "embedding", axis=0)
    sizes = builder.add_constant(
        "embedding.split_sizes", np.ones(seq_len, dtype=np.int64)
    )
    pieces = builder.add_node_outputs(
        "Split", [embedded, sizes], "embedding", seq_len, axis=0
    )
    axes = builder.shared_constant("axes_0", np.array([0], dtype=np.int64))
    return [
        builder.add_node("Squeeze", [piece, axes], f"embedding.step{t}")
        for t, piece in enumerate(pieces)
    ]


def _add_layer(
    builder: GraphBuilder,
    inputs: list[str],
    recipe: Recipe,
    layer: int,
    sizes: tuple[int, int],
    batch: str,
) -> list[str]:
    """Run the cell of one layer over all steps and return its h_new_0 per step."""
    prefix = f"layers.{layer}"
    parameters = _add_cell_parameters(builder, recipe, prefix, sizes)
    states = [
        _add_initial_state(builder, recipe, prefix, k, sizes[1], batch)
        for k in range(recipe.num_states)
    ]
    outputs = []
    for t, x in enumerate(inputs):
        step = f"{prefix}.step{t}"
        states = _add_cell_step(builder, x, states, recipe, parameters, step)
        outputs.append(states[0])
    return outputs


def _add_cell_parameters(
    builder: GraphBuilder, recipe: Recipe, prefix: str, sizes: tuple[int, int]
) -> dict[str, tuple[list[str], str]]:
    """Add the weights and bias of every linear node and return them by node name."""
    in_size, hidden = sizes
    init = uniform(1.0 / np.sqrt(hidden))
    parameters = {}
    for name, node in recipe.nodes.items():
        if node.op != "linear":
            continue
        weights = [
            builder.add_parameter(
                f"{prefix}.{name}.weight{i}",
                (hidden, in_size if source == "x" else hidden),
                "recurrent_weight",
                init,
            )
            for i, source in enumerate(node.inputs)
        ]
        bias = builder.add_parameter(
            f"{prefix}.{name}.bias", (hidden,), "recurrent_bias", init
        )
        parameters[name] = (weights, bias)
    return parameters


def _add_initial_state(
    builder: GraphBuilder,
    recipe: Recipe,
    prefix: str,
    state: int,
    hidden: int,
    batch: str,
) -> str | None:
    """Add initial state ``state`` broadcast to (batch, hidden), or None if unread."""
    source = f"h_prev_{state}"
    if not any(source in node.inputs for node in recipe.nodes.values()):
        return None
    name = f"{prefix}.{source}"
    value = builder.add_parameter(name, (1, hidden), "recurrent_state", filled(0.0))
    width = builder.add_constant(f"{name}.width", np.array([hidden], dtype=np.int64))
    shape = builder.add_node("Concat", [batch, width], name, axis=0)
    return builder.add_node("Expand", [value, shape], name)


def _add_cell_step(
    builder: GraphBuilder,
    x: str,
    states: list[str | None],
    recipe: Recipe,
    parameters: dict[str, tuple[list[str], str]],
    prefix: str,
) -> list[str | None]:
    """Add one time step of the cell and return the new states."""
    values = {"x": x, **{f"h_prev_{k}": state for k, state in enumerate(states)}}
    for name, node in recipe.nodes.items():
        inputs = [values[source] for source in node.inputs]
        values[name] = _add_recipe_op(
            builder, node.op, inputs, parameters.get(name), f"{prefix}.{name}"
        )
    return [values[f"h_new_{k}"] for k in range(recipe.num_states)]


def _add_recipe_op(
    builder: GraphBuilder,
    op: str,
    inputs: list[str],
    parameters: tuple[list[str], str] | None,
    prefix: str,
) -> str:
    if op == "linear":
        assert parameters is not None
        return _add_linear(builder, inputs, parameters, prefix)
    if op in ACTIVATIONS:
        attributes = {}
        if op == "activation_leaky_relu":
            attributes["alpha"] = LEAKY_RELU_SLOPE
        return builder.add_node(ACTIVATIONS[op], inputs, prefix, **attributes)
    if op in ELEMENTWISE:
        return builder.add_node(ELEMENTWISE[op], inputs, prefix)
    return _add_blend(builder, inputs, prefix)


def _add_linear(
    builder: GraphBuilder,
    inputs: list[str],
    parameters: tuple[list[str], str],
    prefix: str,
) -> str:
    """Add W_0 a_0 + b + W_1 a_1 + ..., summed in that order like the benchmark."""
    weights, bias = parameters
    result = builder.add_node("Gemm", [inputs[0], weights[0], bias], prefix, transB=1)
    for source, weight in zip(inputs[1:], weights[1:]):
        term = builder.add_node("Gemm", [source, weight], prefix, transB=1)
        result = builder.add_node("Add", [result, term], prefix)
    return result


def _add_blend(builder: GraphBuilder, inputs: list[str], prefix: str) -> str:
    """Add z*a + (1 - z)*b for inputs (z, a, b)."""
    z, a, b = inputs
    one = builder.shared_constant("one", np.ones((), dtype=np.float32))
    z_times_a = builder.add_node("Mul", [z, a], prefix)
    one_minus_z = builder.add_node("Sub", [one, z], prefix)
    rest_times_b = builder.add_node("Mul", [one_minus_z, b], prefix)
    return builder.add_node("Add", [z_times_a, rest_times_b], prefix)


def _stack_steps(builder: GraphBuilder, steps: list[str]) -> str:
    """Stack per-step (batch, hidden) tensors into (seq_len, batch, hidden)."""
    axes = builder.shared_constant("axes_0", np.array([0], dtype=np.int64))
    expanded = [
        builder.add_node("Unsqueeze", [step, axes], f"output.step{t}")
        for t, step in enumerate(steps)
    ]
    if len(expanded) == 1:
        return expanded[0]
    return builder.add_node("Concat", expanded, "output", axis=0)


def _add_decoder(builder: GraphBuilder, sequence: str, vocab_size: int) -> str:
    """Add the decoder, whose weight defaults to the transposed embedding table."""
    table = builder.value("embedding.weight")
    weight = builder.add_parameter(
        "decoder.weight",
        (EMBEDDING_SIZE, vocab_size),
        "weight",
        lambda rng, shape: table.T,
    )
    bias = builder.add_parameter("decoder.bias", (vocab_size,), "bias", filled(0.0))
    projected = builder.add_node("MatMul", [sequence, weight], "decoder")
    return builder.add_node("Add", [projected, bias], "decoder", output="logits")


def _add_hidden_unit0(builder: GraphBuilder, sequence: str) -> str:
    """Add output ``hidden_unit0``: unit 0 of the last layer's h_new_0 at every step."""
    starts = builder.add_constant("hidden_unit0.starts", np.array([0], dtype=np.int64))
    ends = builder.add_constant("hidden_unit0.ends", np.array([1], dtype=np.int64))
    axes = builder.add_constant("hidden_unit0.axes", np.array([2], dtype=np.int64))
    unit = builder.add_node("Slice", [sequence, starts, ends, axes], "hidden_unit0")
    return builder.add_node(
        "Squeeze", [unit, axes], "hidden_unit0", output="hidden_unit0"
    )
