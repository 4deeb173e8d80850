"""Tests of the NAS-Bench-NLP converter against an independent PyTorch model."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnxeps.converters import nlp
from onnxeps.converters.cli import convert as convert_group

RNN_RECIPE = {
    "f": {"op": "linear", "input": ["x", "h_prev_0"]},
    "h_new_0": {"op": "activation_tanh", "input": ["f"]},
}
GRU_RECIPE = {
    "r": {"op": "linear", "input": ["x", "h_prev_0"]},
    "r_act": {"op": "activation_sigm", "input": ["r"]},
    "z": {"op": "linear", "input": ["x", "h_prev_0"]},
    "z_act": {"op": "activation_sigm", "input": ["z"]},
    "rh": {"op": "elementwise_prod", "input": ["r_act", "h_prev_0"]},
    "h_tilde": {"op": "linear", "input": ["x", "rh"]},
    "h_tilde_act": {"op": "activation_tanh", "input": ["h_tilde"]},
    "h_new_0": {"op": "blend", "input": ["z_act", "h_prev_0", "h_tilde_act"]},
}
HAND_WRITTEN_IDS = ("1000000", "1000001", "1000002")
# Random-space recipes with three states, a blend, and a 3-input linear with an
# elementwise op.
FEATURE_IDS = ("1012023", "1001551", "1000434")
NUM_SAMPLED_RECIPES = 3
NUM_COUNTED_RECIPES = 20
SAMPLE_SEED = 17
VOCAB = 50
SEQ_LEN = 5
BATCH = 3
WIKITEXT2_VOCAB = 33278
RTOL = 1e-4
ATOL = 1e-5

Recipe = dict[str, Any]
Rows = dict[str, dict[str, str]]


# ----- an independent PyTorch recipe language model -----


def torch_order(recipe: Recipe) -> list[str]:
    """Order recipe nodes by repeatedly taking those whose inputs are all known."""
    known = {"x"} | {f"h_prev_{k}" for k in range(3)}
    order: list[str] = []
    while len(order) < len(recipe):
        for name, node in recipe.items():
            if name not in order and all(source in known for source in node["input"]):
                order.append(name)
                known.add(name)
    return order


class MultiInputLinear(nn.Module):
    def __init__(self, input_sizes: list[int], hidden: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(hidden)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(hidden, size).uniform_(-bound, bound))
            for size in input_sizes
        )
        self.bias = nn.Parameter(torch.empty(hidden).uniform_(-bound, bound))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        result = nn.functional.linear(inputs[0], self.weights[0], self.bias)
        for x, weight in zip(inputs[1:], self.weights[1:]):
            result = result + nn.functional.linear(x, weight)
        return result


class TorchRecipeCell(nn.Module):
    def __init__(self, recipe: Recipe, input_size: int, hidden: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.order = torch_order(recipe)
        states = ("h_new_0", "h_new_1", "h_new_2")
        self.num_states = sum(1 for name in recipe if name in states)
        self.linears = nn.ModuleDict(
            {
                name: MultiInputLinear(
                    [input_size if s == "x" else hidden for s in node["input"]], hidden
                )
                for name, node in recipe.items()
                if node["op"] == "linear"
            }
        )

    def forward(
        self, x: torch.Tensor, states: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        values = {"x": x, **{f"h_prev_{k}": state for k, state in enumerate(states)}}
        for name in self.order:
            op = self.recipe[name]["op"]
            args = [values[source] for source in self.recipe[name]["input"]]
            if op == "linear":
                values[name] = self.linears[name](*args)
            elif op == "activation_tanh":
                values[name] = torch.tanh(args[0])
            elif op == "activation_sigm":
                values[name] = torch.sigmoid(args[0])
            elif op == "activation_leaky_relu":
                values[name] = nn.functional.leaky_relu(args[0], 0.01)
            elif op == "elementwise_prod":
                values[name] = args[0] * args[1]
            elif op == "elementwise_sum":
                values[name] = args[0] + args[1]
            elif op == "blend":
                values[name] = args[0] * args[1] + (1 - args[0]) * args[2]
        return [values[f"h_new_{k}"] for k in range(self.num_states)]


class TorchRecipeLM(nn.Module):
    def __init__(self, recipe: Recipe, vocab: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 400)
        sizes = [(400, 600), (600, 600), (600, 400)]
        self.cells = nn.ModuleList(TorchRecipeCell(recipe, i, h) for i, h in sizes)
        self.initial_states = nn.ParameterDict(
            {
                f"{layer}_{k}": nn.Parameter(torch.randn(1, hidden) * 0.5)
                for layer, (_, hidden) in enumerate(sizes)
                for k in range(self.cells[0].num_states)
            }
        )
        self.decoder = nn.Linear(400, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(tokens)
        for layer, cell in enumerate(self.cells):
            states = [
                self.initial_states[f"{layer}_{k}"].expand(tokens.shape[1], -1)
                for k in range(cell.num_states)
            ]
            outputs = []
            for step in x.unbind(0):
                states = cell(step, states)
                outputs.append(states[0])
            x = torch.stack(outputs)
        return self.decoder(x), x[:, :, 0]


def exported_weights(network: TorchRecipeLM, recipe: Recipe) -> dict[str, np.ndarray]:
    """Map the torch parameters to the converter's initializer names.

    The decoder weight is left out, so the converter derives it from the embedding.
    Initial states exist in the ONNX model only for the states the recipe reads.
    """
    read = {source for node in recipe.values() for source in node["input"]}
    weights = {
        "embedding.weight": network.embedding.weight,
        "decoder.bias": network.decoder.bias,
    }
    for layer, cell in enumerate(network.cells):
        for name, linear in cell.linears.items():
            for i, weight in enumerate(linear.weights):
                weights[f"layers.{layer}.{name}.weight{i}"] = weight
            weights[f"layers.{layer}.{name}.bias"] = linear.bias
        for k in range(cell.num_states):
            if f"h_prev_{k}" in read:
                state = network.initial_states[f"{layer}_{k}"]
                weights[f"layers.{layer}.h_prev_{k}"] = state
    return {name: value.detach().numpy() for name, value in weights.items()}


def run_onnx(model: onnx.ModelProto, tokens: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(["logits", "hidden_unit0"], {"tokens": tokens})


def random_tokens(batch: int = BATCH, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, size=(SEQ_LEN, batch), dtype=np.int64)


def assert_matches_torch(recipe: Recipe, seed: int) -> None:
    torch.manual_seed(seed)
    network = TorchRecipeLM(recipe, VOCAB).eval()
    with torch.no_grad():
        network.decoder.bias.normal_(0.0, 0.5)
    weights = exported_weights(network, recipe)
    model = nlp.build(recipe, vocab_size=VOCAB, seq_len=SEQ_LEN, weights=weights)
    tokens = random_tokens(seed=seed)
    with torch.no_grad():
        expected_logits, expected_unit0 = network(torch.from_numpy(tokens))
    logits, unit0 = run_onnx(model, tokens)
    assert logits.shape == (SEQ_LEN, BATCH, VOCAB)
    assert unit0.shape == (SEQ_LEN, BATCH)
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(unit0, expected_unit0.numpy(), rtol=RTOL, atol=ATOL)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def benchmark_parameter_count(model: onnx.ModelProto) -> int:
    """Count parameters as the benchmark does: the tied decoder weight once."""
    roles = json.loads(metadata(model)["onnxeps.roles"])
    counted = {"embedding", "bias", "recurrent_weight", "recurrent_bias"}
    return sum(
        math.prod(tensor.dims)
        for tensor in model.graph.initializer
        if roles.get(tensor.name) in counted
    )


@pytest.fixture(scope="module")
def recipe_rows(data_dir: Path) -> dict[str, dict[str, str]]:
    path = data_dir / "nas-bench-nlp" / "nlp_wt2_recipes_joined_ptb.csv"
    with open(path, newline="") as file:
        return {row["recipe_id"]: row for row in csv.DictReader(file)}


def recipe_of(rows: Rows, recipe_id: str) -> dict[str, Any]:
    return json.loads(rows[recipe_id]["recipe"])


def sampled_ids(rows: Rows, count: int) -> list[str]:
    candidates = sorted(set(rows) - set(HAND_WRITTEN_IDS) - set(FEATURE_IDS))
    return random.Random(SAMPLE_SEED).sample(candidates, count)


# ----- parity with the torch model -----


@pytest.mark.parametrize("recipe_id", [*HAND_WRITTEN_IDS, *FEATURE_IDS])
def test_build_matches_torch_recipe(recipe_rows: Rows, recipe_id: str) -> None:
    assert_matches_torch(recipe_of(recipe_rows, recipe_id), seed=int(recipe_id) % 1000)


@pytest.mark.parametrize("position", range(NUM_SAMPLED_RECIPES))
def test_build_matches_torch_sampled_recipe(
    recipe_rows: Rows, position: int
) -> None:
    recipe_id = sampled_ids(recipe_rows, NUM_SAMPLED_RECIPES)[position]
    assert_matches_torch(recipe_of(recipe_rows, recipe_id), seed=position)


def test_build_untied_decoder_weight() -> None:
    torch.manual_seed(0)
    network = TorchRecipeLM(RNN_RECIPE, VOCAB).eval()
    network.decoder.weight = nn.Parameter(torch.randn(VOCAB, 400) * 0.05)
    weights = exported_weights(network, RNN_RECIPE)
    weights["decoder.weight"] = network.decoder.weight.detach().numpy().T
    model = nlp.build(RNN_RECIPE, vocab_size=VOCAB, seq_len=SEQ_LEN, weights=weights)
    tokens = random_tokens()
    with torch.no_grad():
        expected_logits, _ = network(torch.from_numpy(tokens))
    logits, _ = run_onnx(model, tokens)
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=RTOL, atol=ATOL)


# ----- parameter counts -----


def test_build_parameter_count_rnn_wikitext2() -> None:
    model = nlp.build(RNN_RECIPE, vocab_size=WIKITEXT2_VOCAB, seq_len=1)
    # embedding + decoder bias + the three cells; the tied decoder weight counts once
    expected = 33278 * 400 + 33278 + 600_600 + 720_600 + 400_400
    assert expected == 15_066_078
    assert benchmark_parameter_count(model) == expected


def test_build_parameter_count_matches_logs(recipe_rows: Rows) -> None:
    # Only the embedding and decoder bias depend on the vocabulary, so a 1-word model
    # plus 401 parameters per extra word gives the WikiText-2 count.
    ids = [*HAND_WRITTEN_IDS, *sampled_ids(recipe_rows, NUM_COUNTED_RECIPES)]
    for recipe_id in ids:
        model = nlp.build(recipe_of(recipe_rows, recipe_id), vocab_size=1, seq_len=1)
        count = benchmark_parameter_count(model) + (WIKITEXT2_VOCAB - 1) * 401
        assert count == int(recipe_rows[recipe_id]["wt2_num_params"]), recipe_id


# ----- validation -----


def linear(*inputs: str) -> dict[str, Any]:
    return {"op": "linear", "input": list(inputs)}


def tanh(source: str) -> dict[str, Any]:
    return {"op": "activation_tanh", "input": [source]}


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"f": linear("x", "h_prev_0"), "h_new_1": tanh("f")}, "no 'h_new_0' node"),
        (
            {"a": linear("x", "b"), "b": tanh("a"), "h_new_0": tanh("b")},
            "the recipe has a cycle: a -> b -> a",
        ),
        (
            {
                "f": linear("x", "h_prev_0"),
                "h_new_0": {"op": "activation_relu", "input": ["f"]},
            },
            "node 'h_new_0' has unknown op 'activation_relu'; valid ops are linear",
        ),
        (
            {
                "f": linear("x", "h_prev_0"),
                "h_new_0": {"op": "blend", "input": ["f", "f"]},
            },
            "node 'h_new_0' (blend) has 2 inputs, expected 3",
        ),
        (
            {"f": linear("x", "y"), "h_new_0": tanh("f")},
            "node 'f' reads 'y', which is not",
        ),
        (
            {"f": linear("x", "h_prev_1"), "h_new_0": tanh("f")},
            "node 'f' reads 'h_prev_1', but the recipe has no 'h_new_1'",
        ),
        (
            {"f": linear("x", "h_prev_0"), "h_new_0": tanh("f"), "h_new_2": tanh("f")},
            "has h_new_2 but no h_new_1",
        ),
        (
            {"h_new_0": "tanh"},
            "node 'h_new_0' must be an object with \"op\" and \"input\"",
        ),
        ({"x": linear("h_prev_0"), "h_new_0": tanh("x")}, "node name 'x' is reserved"),
        (
            {
                "f": linear("h_prev_0"),
                "h_new_0": {"op": "elementwise_sum", "input": ["f", "x"]},
            },
            "node 'h_new_0' (elementwise_sum) combines widths [600, 400] in layer 0",
        ),
        ({}, "a recipe must be a non-empty JSON object"),
        ("{not json", "the recipe is not valid JSON"),
    ],
)
def test_build_rejects_invalid_recipe(recipe: Any, message: str) -> None:
    with pytest.raises(ValueError) as error:
        nlp.build(recipe, vocab_size=VOCAB, seq_len=1)
    assert message in str(error.value)


def test_parse_recipe_drops_unused_nodes() -> None:
    recipe = {**RNN_RECIPE, "dead": linear("x", "h_prev_0"), "dead_act": tanh("dead")}
    parsed = nlp.parse_recipe(recipe)
    model = nlp.build(recipe, vocab_size=VOCAB, seq_len=2)
    names = {t.name for t in model.graph.initializer}
    assert list(parsed.nodes) == ["f", "h_new_0"]
    assert "layers.0.f.weight0" in names
    assert "layers.0.dead.weight0" not in names


def test_parse_recipe_accepts_json_text() -> None:
    parsed = nlp.parse_recipe(json.dumps(RNN_RECIPE))
    assert parsed.num_states == 1
    assert parsed.nodes["f"] == nlp.RecipeNode("linear", ("x", "h_prev_0"))


def test_parse_recipe_accepts_every_csv_recipe(recipe_rows: Rows) -> None:
    for recipe_id, row in recipe_rows.items():
        parsed = nlp.parse_recipe(row["recipe"])
        assert len(parsed.nodes) == len(json.loads(row["recipe"])), recipe_id


# ----- structure and metadata -----


def test_build_metadata_entries() -> None:
    model = nlp.build(RNN_RECIPE, vocab_size=VOCAB, seq_len=2)
    entries = metadata(model)
    tied = json.loads(entries["onnxeps.tied_weights"])
    assert json.loads(entries["onnxeps.encoding"]) == RNN_RECIPE
    assert entries["onnxeps.converter"] == "onnxeps.converters.nlp 1"
    assert len(tied) == 1
    assert tied[0]["tensor"] == "decoder.weight"
    assert tied[0]["tied_to"] == "embedding.weight"
    assert tied[0]["transform"] == "transpose"


def test_build_roles_of_initializers() -> None:
    model = nlp.build(GRU_RECIPE, vocab_size=VOCAB, seq_len=2)
    roles = json.loads(metadata(model)["onnxeps.roles"])
    floats = {
        tensor.name
        for tensor in model.graph.initializer
        if tensor.data_type == onnx.TensorProto.FLOAT
    }
    assert set(roles) == floats
    assert roles["embedding.weight"] == "embedding"
    assert roles["decoder.weight"] == "weight"
    assert roles["decoder.bias"] == "bias"
    assert roles["layers.2.h_tilde.weight1"] == "recurrent_weight"
    assert roles["layers.2.h_tilde.bias"] == "recurrent_bias"
    assert roles["layers.1.h_prev_0"] == "recurrent_state"
    assert roles["one"] == "keep"


def test_build_default_weights() -> None:
    model = nlp.build(RNN_RECIPE, vocab_size=VOCAB, seq_len=2, init_seed=5)
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    bound = 1 / math.sqrt(600)
    embedding = tensors["embedding.weight"]
    np.testing.assert_array_equal(tensors["decoder.weight"], embedding.T)
    assert np.abs(tensors["embedding.weight"]).max() <= 0.1
    assert np.abs(tensors["layers.0.f.weight1"]).max() <= bound
    assert (tensors["layers.0.h_prev_0"] == 0).all()
    assert tensors["layers.0.h_prev_0"].shape == (1, 600)
    assert tensors["layers.2.f.weight0"].shape == (400, 600)


def test_build_omits_unread_initial_state() -> None:
    recipe = {**RNN_RECIPE, "g": linear("x", "h_prev_0"), "h_new_1": tanh("g")}
    model = nlp.build(recipe, vocab_size=VOCAB, seq_len=2)
    names = {tensor.name for tensor in model.graph.initializer}
    assert "layers.0.h_prev_0" in names
    assert "layers.0.h_prev_1" not in names


def test_build_symbolic_batch_axis() -> None:
    model = nlp.build(RNN_RECIPE, vocab_size=VOCAB, seq_len=SEQ_LEN)
    tokens = model.graph.input[0].type.tensor_type
    logits, unit0 = (output.type.tensor_type for output in model.graph.output)
    assert tokens.elem_type == onnx.TensorProto.INT64
    assert tokens.shape.dim[0].dim_value == SEQ_LEN
    assert tokens.shape.dim[1].dim_param == "batch"
    assert logits.shape.dim[1].dim_param == "batch"
    assert logits.shape.dim[2].dim_value == VOCAB
    assert unit0.shape.dim[1].dim_param == "batch"


def test_build_runs_at_two_batch_sizes() -> None:
    model = nlp.build(GRU_RECIPE, vocab_size=VOCAB, seq_len=SEQ_LEN)
    tokens = random_tokens(batch=4)
    logits_four, unit0_four = run_onnx(model, tokens)
    logits_one, unit0_one = run_onnx(model, tokens[:, :1])
    assert logits_four.shape == (SEQ_LEN, 4, VOCAB)
    assert logits_one.shape == (SEQ_LEN, 1, VOCAB)
    np.testing.assert_allclose(unit0_one[:, 0], unit0_four[:, 0], rtol=RTOL, atol=ATOL)


def test_build_same_seed_same_model() -> None:
    first = nlp.build(RNN_RECIPE, vocab_size=VOCAB, seq_len=2, init_seed=1)
    second = nlp.build(RNN_RECIPE, vocab_size=VOCAB, seq_len=2, init_seed=1)
    assert first.SerializeToString() == second.SerializeToString()


def test_build_rejects_zero_seq_len() -> None:
    with pytest.raises(ValueError, match="must be at least 1, got 50 and 0"):
        nlp.build(RNN_RECIPE, vocab_size=VOCAB, seq_len=0)


# ----- files and the command line -----


def test_convert_writes_loadable_file(tmp_path: Path) -> None:
    path = nlp.convert(RNN_RECIPE, tmp_path / "lm.onnx", vocab_size=VOCAB, seq_len=3)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.onnx"]


def test_cli_nlp_recipe_file(tmp_path: Path) -> None:
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(GRU_RECIPE))
    output = tmp_path / "lm.onnx"
    arguments = ["nlp", str(recipe_file), "-o", str(output)]
    arguments += ["--vocab-size", "30", "--seq-len", "4"]
    result = CliRunner().invoke(convert_group, arguments)
    assert result.exit_code == 0
    model = onnx.load(output)
    onnx.checker.check_model(model, full_check=True)
    logits = model.graph.output[0].type.tensor_type.shape.dim
    assert [logits[0].dim_value, logits[2].dim_value] == [4, 30]


def test_cli_nlp_recipe_text(tmp_path: Path) -> None:
    # The text is longer than the 255-byte file-name limit of common file systems.
    recipe_text = json.dumps(GRU_RECIPE)
    output = tmp_path / "lm.onnx"
    arguments = ["nlp", recipe_text, "-o", str(output), "--vocab-size", "30"]
    result = CliRunner().invoke(convert_group, [*arguments, "--seq-len", "2"])
    assert len(recipe_text) > 255
    assert result.exit_code == 0
    assert json.loads(metadata(onnx.load(output))["onnxeps.encoding"]) == GRU_RECIPE


@pytest.mark.parametrize(
    ("recipe_text", "message"),
    [
        ('{"f": {"op": "linear", "input": ["x"]}}', "no 'h_new_0' node"),
        ("{not json", "is neither an existing file nor valid JSON"),
    ],
)
def test_cli_nlp_bad_recipe_exits_1(
    tmp_path: Path, recipe_text: str, message: str
) -> None:
    output = tmp_path / "lm.onnx"
    result = CliRunner().invoke(convert_group, ["nlp", recipe_text, "-o", str(output)])
    lines = result.output.splitlines()
    error_lines = [line for line in lines if line.startswith("Error:")]
    assert result.exit_code == 1
    assert len(error_lines) == 1
    assert message in error_lines[0]
    assert "Traceback" not in result.output
    assert not output.exists()
