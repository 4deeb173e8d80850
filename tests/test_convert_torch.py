"""Tests of the PyTorch converter (onnxeps.converters.torch_export and convert torch).

The main check is parity: epsilon of the exported model, scored by ``onnxeps.score``,
must equal epsilon computed natively in PyTorch within relative 1e-4. The native side
runs a deep copy on the same batch. Every weight is w and every bias 0, embedding
tables hold the U(0, 1) values the core draws, BatchNorm uses batch statistics and
dropout is off. Both outputs then go through ``onnxeps.epsilon``.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import onnxeps  # noqa: E402
from onnxeps.cli import main as cli_main  # noqa: E402
from onnxeps.converters import nb201, torch_export  # noqa: E402
from onnxeps.converters._extras import MissingExtraError, import_extra  # noqa: E402

PARITY_TOLERANCE = 1e-4
WEIGHT_PAIRS = [(1e-7, 1.0), (1e-4, 10.0)]
BATCH_SIZE = 32
SEQ_LEN = 12
VOCAB_SIZE = 100
# The core's default seed. With an explicit input batch nothing is drawn before the
# embedding tables, so the first table is the first draw of this generator.
CORE_SEED = 21
NB201_ARCH = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|"
    "+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
)
NB201_WEIGHTS = (1e-7, 1.0)  # the nb201 preset


# ----- the modules under test -----


def randomise_batch_norm(module: nn.Module) -> None:
    """Give every BatchNorm random affine parameters and running statistics, so a
    rewrite that kept any of them would change the score."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                if sub.affine:
                    sub.weight.uniform_(0.5, 1.5)
                    sub.bias.normal_()
                sub.running_mean.normal_()
                sub.running_var.uniform_(0.5, 2.0)


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResidualCNN(nn.Module):
    """A residual CNN with BatchNorm on 3x16x16 images."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.block1 = ResidualBlock(8, 8, 1)
        self.block2 = ResidualBlock(8, 16, 2)
        self.head = nn.Linear(16, 10)
        randomise_batch_norm(self)

    def forward(self, x):
        out = self.block2(self.block1(self.stem(x)))
        return self.head(out.mean(dim=(2, 3)))


class DepthwiseSeparableCNN(nn.Module):
    """Depthwise and pointwise convolutions with BatchNorm and two kinds of dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 16, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.Dropout2d(0.2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(16, 10)
        randomise_batch_norm(self)

    def forward(self, x):
        out = torch.flatten(self.pool(self.features(x)), 1)
        return self.head(self.dropout(out))


# With constant weights every unit of a Linear output is equal, and LayerNorm output
# sums to zero over its features when its shift is 0. So LayerNorm right after a Linear
# outputs zeros, and a Linear right after LayerNorm outputs zeros plus rounding noise.
# The LayerNorm models below read varying features and put a nonlinearity after each
# LayerNorm, so their epsilon is well defined.


class LayerNormMLP(nn.Module):
    """An MLP with LayerNorm on its 24 input features, tanh, GELU and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.fc1 = nn.Linear(24, 32)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    def forward(self, x):
        gelu = nn.functional.gelu
        x = self.fc1(self.dropout(torch.tanh(self.norm(x))))
        return self.head(gelu(self.fc2(gelu(x))))


class TransformerClassifier(nn.Module):
    """A post-norm transformer encoder block on (batch, 5, 16), then a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)).mean(dim=1))


class LSTMLanguageModel(nn.Module):
    """An LSTM language model on (seq, batch) token ids with an untied decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, 16)
        self.lstm = nn.LSTM(16, 24)
        self.decoder = nn.Linear(24, VOCAB_SIZE)

    def forward(self, tokens):
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.decoder(hidden)


class NonAffineCNN(nn.Module):
    """BatchNorm and LayerNorm without affine parameters, which export as constants."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.norm = nn.LayerNorm(4 * 8 * 8, elementwise_affine=False)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        out = torch.flatten(torch.relu(self.bn(self.conv(x))), 1)
        return self.head(torch.tanh(self.norm(out)))


# ----- NAS-Bench-201 written directly in PyTorch -----


def nb201_edges(arch_str: str) -> dict[tuple[int, int], str]:
    edges = {}
    for target, group in enumerate(arch_str.split("+"), start=1):
        for entry in group.strip("|").split("|"):
            op, source = entry.split("~")
            edges[(int(source), target)] = op
    return edges


def relu_conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out, eps=1e-5),
    )


class NB201Cell(nn.Module):
    def __init__(self, edges: dict[tuple[int, int], str], channels: int) -> None:
        super().__init__()
        self.edges = edges
        self.ops = nn.ModuleDict()
        for (source, target), op in edges.items():
            key = f"{source}_{target}"
            if op.startswith("nor_conv"):
                self.ops[key] = relu_conv_bn(channels, channels, int(op[-1]), 1)
            elif op == "avg_pool_3x3":
                self.ops[key] = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            elif op == "skip_connect":
                self.ops[key] = nn.Identity()
            else:
                raise ValueError(f"this test network has no {op!r} edges")

    def forward(self, x):
        nodes = [x]
        for target in (1, 2, 3):
            terms = [
                self.ops[f"{source}_{target}"](nodes[source])
                for source in range(target)
            ]
            nodes.append(sum(terms[1:], terms[0]))
        return nodes[3]


class NB201Reduction(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = relu_conv_bn(c_in, c_out, 3, 2)
        self.conv_b = relu_conv_bn(c_out, c_out, 3, 1)
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False)
        )

    def forward(self, x):
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class NB201Network(nn.Module):
    """The NAS-Bench-201 topology network of one arch string, with 1 output."""

    def __init__(self, arch_str: str) -> None:
        super().__init__()
        edges = nb201_edges(arch_str)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        )
        blocks: list[nn.Module] = []
        for stage, channels in enumerate((16, 32, 64)):
            if stage > 0:
                blocks.append(NB201Reduction(channels // 2, channels))
            blocks.extend(NB201Cell(edges, channels) for _ in range(5))
        self.cells = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU())
        self.classifier = nn.Linear(64, 1)

    def forward(self, x):
        out = self.head(self.cells(self.stem(x)))
        return self.classifier(out.mean(dim=(2, 3)))


# ----- the PyTorch-native epsilon -----


def set_constants(module: nn.Module, weight: float, tables: list[np.ndarray]) -> None:
    """Set every parameter in place: embedding tables from ``tables`` in module order,
    parameters named like a bias to 0, parameters named like a weight to w."""
    pending = list(tables)
    for sub in module.modules():
        for name, parameter in sub.named_parameters(recurse=False):
            if isinstance(sub, nn.Embedding):
                parameter.copy_(torch.from_numpy(pending.pop(0)))
            elif "bias" in name:
                parameter.zero_()
            elif "weight" in name:
                parameter.fill_(weight)
            else:
                raise TypeError(f"no constant rule for {type(sub).__name__}.{name}")


def native_output(module, batch: np.ndarray, weight: float, tables) -> np.ndarray:
    copied = copy.deepcopy(module).eval()
    with torch.no_grad():
        set_constants(copied, weight, tables)
        for sub in copied.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.train()  # normalise with the batch mean and biased variance
        output = copied(torch.from_numpy(batch))
    return output.double().numpy()


def native_epsilon(module, batch: np.ndarray, weights, tables=()) -> float:
    outputs = [native_output(module, batch, weight, list(tables)) for weight in weights]
    return onnxeps.epsilon(outputs[0], outputs[1]).value


def onnx_epsilon(model, batch: np.ndarray, weights) -> float:
    result = onnxeps.score(model, inputs=batch, weights=weights, seed=CORE_SEED)
    return math.nan if result.epsilon is None else result.epsilon


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


def metadata_of(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def first_node(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.op_type == op_type)


def float_batch(shape: tuple[int, ...], seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def token_batch() -> tuple[np.ndarray, list[np.ndarray]]:
    """Return (seq, batch) token ids and the table the core fills the embedding with."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, VOCAB_SIZE, size=(SEQ_LEN, BATCH_SIZE))
    table = np.random.default_rng(CORE_SEED).random((VOCAB_SIZE, 16)).astype(np.float32)
    return tokens.astype(np.int64), [table]


class Case(NamedTuple):
    factory: Callable[[], nn.Module]
    example_shape: tuple[int, ...]
    weight_pairs: list[tuple[float, float]]
    options: dict


# Weight pairs are chosen where float32 rounding moves epsilon by less than the parity
# tolerance, which test_parity_cases_well_conditioned checks. The LayerNorm models run
# at w >= 0.1, because with smaller w their outputs are rounding noise (see the note
# above LayerNormMLP). At w = 10 the LSTM gates saturate, so its second pair is the
# NAS-Bench-NLP pair (1e-5, 1e-3). The non-affine CNN normalises w away once the
# convolution output outgrows BatchNorm's epsilon, so its pairs stay small. The
# depthwise CNN scores about 0.01 with w2 = 1, where rounding decides the fifth digit,
# and about 0.25 with w2 = 3, where ReLU6 clips.
CASES = {
    "residual_cnn": Case(ResidualCNN, (2, 3, 16, 16), WEIGHT_PAIRS, {}),
    "depthwise_cnn": Case(
        DepthwiseSeparableCNN, (2, 3, 16, 16), [(1e-7, 3.0), (1e-4, 10.0)], {}
    ),
    "layernorm_mlp": Case(LayerNormMLP, (2, 24), [(0.3, 1.0), (0.3, 3.0)], {}),
    "transformer": Case(
        TransformerClassifier, (2, 5, 16), [(0.1, 1.0), (0.3, 3.0)], {}
    ),
    "lstm_lm": Case(
        LSTMLanguageModel,
        (SEQ_LEN, 2),
        [(1e-7, 1.0), (1e-5, 1e-3)],
        {"dynamic_axes": {0: "seq", 1: "batch"}},
    ),
    "non_affine_cnn": Case(
        NonAffineCNN, (2, 3, 8, 8), [(1e-6, 1e-3), (1e-6, 1e-2)], {}
    ),
}
PARITY_CASES = [
    (name, pair) for name, case in CASES.items() for pair in case.weight_pairs
]
PARITY_IDS = [f"{name}-w{pair[0]:g}-{pair[1]:g}" for name, pair in PARITY_CASES]


def case_batch(name: str):
    """Return (batch, embedding tables) for the case."""
    if name == "lstm_lm":
        return token_batch()
    return float_batch((BATCH_SIZE, *CASES[name].example_shape[1:])), []


@pytest.fixture(scope="module")
def modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: case.factory() for name, case in CASES.items()}


@pytest.fixture(scope="module")
def exported(modules) -> dict[str, onnx.ModelProto]:
    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the transformer's
        for name, case in CASES.items():
            dtype = torch.int64 if name == "lstm_lm" else torch.float32
            example = torch.zeros(case.example_shape, dtype=dtype)
            models[name] = torch_export.export(modules[name], example, **case.options)
    return models


# ----- parity -----


@pytest.mark.parametrize(("name", "weights"), PARITY_CASES, ids=PARITY_IDS)
def test_export_parity_with_torch(name, weights, modules, exported):
    batch, tables = case_batch(name)
    expected = native_epsilon(modules[name], batch, weights, tables)
    scored = onnx_epsilon(exported[name], batch, weights)

    assert math.isfinite(expected), f"native epsilon of {name} is undefined"
    assert math.isfinite(scored), f"onnxeps epsilon of {name} is undefined"
    assert relative_difference(scored, expected) <= PARITY_TOLERANCE, (
        f"{name}: onnxeps {scored!r}, torch {expected!r}"
    )


@pytest.mark.parametrize(("name", "weights"), PARITY_CASES, ids=PARITY_IDS)
def test_parity_cases_well_conditioned(name, weights, modules):
    """The native epsilon in float32 and in float64 agree, so rounding noise cannot
    decide a parity check."""
    batch, tables = case_batch(name)
    single = native_epsilon(modules[name], batch, weights, tables)
    wide_batch = batch if name == "lstm_lm" else batch.astype(np.float64)
    wide_tables = [table.astype(np.float64) for table in tables]
    wide_module = copy.deepcopy(modules[name]).double()
    double = native_epsilon(wide_module, wide_batch, weights, wide_tables)

    assert relative_difference(single, double) <= PARITY_TOLERANCE, (single, double)


def test_native_helper_detects_running_statistics(modules):
    """Parity must fail if either side used the running statistics."""
    module = copy.deepcopy(modules["residual_cnn"])
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.reset_running_stats()  # mean 0 and variance 1 keep the output defined
    batch, _ = case_batch("residual_cnn")
    weights = WEIGHT_PAIRS[1]
    outputs = []
    with torch.no_grad():
        for weight in weights:
            set_constants(module, weight, [])
            outputs.append(module.eval()(torch.from_numpy(batch)).double().numpy())
    running = onnxeps.epsilon(outputs[0], outputs[1]).value

    assert math.isfinite(running)
    assert relative_difference(running, native_epsilon(module, batch, weights)) > 1e-3


# ----- structure and metadata -----


@pytest.mark.parametrize("name", ["residual_cnn", "depthwise_cnn", "non_affine_cnn"])
def test_export_keeps_batchnorm_nodes(name, exported):
    op_types = {node.op_type for node in exported[name].graph.node}

    assert "BatchNormalization" in op_types
    assert "Dropout" not in op_types


def test_export_records_settings(exported):
    metadata = metadata_of(exported["residual_cnn"])
    settings = json.loads(metadata["onnxeps.export_settings"])

    assert metadata["onnxeps.converter"] == torch_export.CONVERTER_ID
    assert "TorchScript" in metadata["onnxeps.exporter"]
    assert metadata["onnxeps.normalisation"] == "kept"
    assert settings["do_constant_folding"] is False
    assert settings["eval_mode"] is True
    assert settings["opset"] == 17


def test_export_falls_back_to_dynamo():
    """TorchScript tracing rejects a bare TransformerEncoderLayer in torch 2.13."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(
        16, nhead=2, dim_feedforward=32, batch_first=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = torch_export.export(layer, torch.zeros(2, 5, 16))
    metadata = metadata_of(model)
    settings = json.loads(metadata["onnxeps.export_settings"])
    plan = onnxeps.plan(model)

    assert "dynamo=True" in metadata["onnxeps.exporter"]
    assert settings["optimize"] is False
    assert "torchscript_error" in settings
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert plan.unclassified() == []


def test_export_mlp_records_no_normalisation(exported):
    metadata = metadata_of(exported["layernorm_mlp"])

    assert metadata["onnxeps.normalisation"] == "absent"


def test_export_batch_axis_is_symbolic(exported):
    model = exported["residual_cnn"]
    input_dims = model.graph.input[0].type.tensor_type.shape.dim
    output_dims = model.graph.output[0].type.tensor_type.shape.dim

    assert input_dims[0].dim_param == "batch"
    assert output_dims[0].dim_param == "batch"
    assert [dim.dim_value for dim in input_dims[1:]] == [3, 16, 16]


def test_export_sequence_axes_follow_dynamic_axes(exported):
    dims = exported["lstm_lm"].graph.input[0].type.tensor_type.shape.dim

    assert [dim.dim_param for dim in dims] == ["seq", "batch"]


def test_export_non_affine_constants_hinted_keep(exported):
    model = exported["non_affine_cnn"]
    hints = json.loads(metadata_of(model)["onnxeps.roles"])
    batch_norm = first_node(model, "BatchNormalization")

    assert hints[batch_norm.input[1]] == "keep"
    assert set(hints.values()) == {"keep"}
    assert not any(name.startswith(("conv.", "head.")) for name in hints)


def test_export_plan_has_no_warnings(exported):
    for name in ["residual_cnn", "depthwise_cnn", "layernorm_mlp", "lstm_lm"]:
        assert onnxeps.plan(exported[name]).warnings == [], name


def test_export_writes_path(modules, tmp_path):
    path = tmp_path / "mlp.onnx"
    model = torch_export.export(modules["layernorm_mlp"], torch.zeros(2, 24), path=path)

    assert onnx.load(path) == model


# ----- the caller's module is unchanged -----


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_leaves_module_unchanged(training):
    torch.manual_seed(3)
    module = DepthwiseSeparableCNN().train(training)
    module.features[1].eval()  # a mixed state must survive too
    before = {key: value.clone() for key, value in module.state_dict().items()}
    flags = [sub.training for sub in module.modules()]
    torch_export.export(module, torch.randn(4, 3, 16, 16))
    after = module.state_dict()

    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert [sub.training for sub in module.modules()] == flags


# ----- one architecture from PyTorch and from its NAS-Bench-201 encoding -----


@pytest.fixture(scope="module")
def nb201_scores():
    torch.manual_seed(1)
    network = NB201Network(NB201_ARCH)
    randomise_batch_norm(network)
    batch = float_batch((BATCH_SIZE, 3, 32, 32), seed=11)
    exported_model = torch_export.export(network, torch.zeros(2, 3, 32, 32))
    return {
        "native": native_epsilon(network, batch, NB201_WEIGHTS),
        "torch_export": onnx_epsilon(exported_model, batch, NB201_WEIGHTS),
        "encoding": onnx_epsilon(nb201.build(NB201_ARCH), batch, NB201_WEIGHTS),
    }


def test_nb201_encoding_defined(nb201_scores):
    assert math.isfinite(nb201_scores["encoding"])


@pytest.mark.parametrize("source", ["native", "torch_export"])
def test_nb201_torch_matches_encoding(source, nb201_scores):
    assert relative_difference(nb201_scores[source], nb201_scores["encoding"]) <= (
        PARITY_TOLERANCE
    ), nb201_scores


# ----- detection of folded normalisation -----


def plain_export(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Export as torch.onnx does by default (eval mode, constant folding on), with a
    symbolic batch axis."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


def test_plan_detects_torch_folded_batchnorm(modules):
    module = copy.deepcopy(modules["residual_cnn"])
    folded = plain_export(module, torch.zeros(2, 3, 16, 16))
    warnings_found = onnxeps.plan(folded).warnings

    assert any("torch.onnx computed at export" in text for text in warnings_found)


def test_score_reports_torch_folded_batchnorm(modules):
    module = copy.deepcopy(modules["residual_cnn"])
    folded = plain_export(module, torch.zeros(2, 3, 16, 16))
    batch, _ = case_batch("residual_cnn")
    result = onnxeps.score(folded, inputs=batch)

    assert any("folds BatchNormalization" in text for text in result.warnings)


def plain_cnn() -> nn.Module:
    """A CNN with biased convolutions that never had normalisation."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))


def test_plan_plain_cnn_warning_says_maybe():
    plain = plain_cnn()
    found = onnxeps.plan(plain_export(plain, torch.zeros(2, 3, 8, 8))).warnings

    assert any("never had normalisation" in text for text in found)


def test_plan_plain_cnn_from_converter_no_warning():
    plain = plain_cnn()
    model = torch_export.export(plain, torch.zeros(2, 3, 8, 8))

    assert onnxeps.plan(model).warnings == []


# ----- errors -----


def test_export_rejects_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        torch_export.export(lambda x: x, torch.zeros(1, 3))


def test_export_rejects_unknown_exporter(modules):
    with pytest.raises(ValueError, match="invalid exporter"):
        torch_export.export(
            modules["layernorm_mlp"], torch.zeros(2, 24), exporter="jit"
        )


def test_import_extra_names_the_extra():
    with pytest.raises(MissingExtraError) as caught:
        import_extra("onnxeps_no_such_framework", "NoSuchFramework", "nosuch")

    assert str(caught.value) == (
        "NoSuchFramework is not installed; pip install 'onnxeps[nosuch]'"
    )


# ----- the command line -----

USER_MODULE = """
from torch import nn


def make():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 2),
    )


def not_a_module():
    return 42


def broken():
    raise RuntimeError("cannot build")
"""


@pytest.fixture
def user_package(tmp_path: Path) -> Path:
    """Write the package ``pkg`` with the module ``pkg.mod`` into a fresh folder."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(textwrap.dedent(USER_MODULE))
    return tmp_path


@pytest.fixture
def cli_in(user_package, monkeypatch):
    """Run the CLI in-process with the package folder on sys.path."""
    monkeypatch.syspath_prepend(str(user_package))
    for name in ["pkg", "pkg.mod"]:
        monkeypatch.delitem(sys.modules, name, raising=False)

    def invoke(*args: str):
        return CliRunner().invoke(cli_main, ["convert", "torch", *args])

    return invoke


def test_cli_convert_torch_writes_model(cli_in, tmp_path):
    output = tmp_path / "out.onnx"
    result = cli_in("pkg.mod:make", "--input-shape", "1,3,8,8", "-o", str(output))
    model = onnx.load(output)
    op_types = {node.op_type for node in model.graph.node}

    assert result.exit_code == 0, result.output
    assert "BatchNormalization" in op_types
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_cli_convert_torch_from_pythonpath(user_package, tmp_path):
    """The console script finds the module through PYTHONPATH in a fresh process."""
    output = tmp_path / "out.onnx"
    environment = {**os.environ, "PYTHONPATH": str(user_package)}
    command = [
        sys.executable, "-c", "from onnxeps.cli import main; main()",
        "convert", "torch", "pkg.mod:make", "--input-shape", "1,3,8,8",
        "-o", str(output),
    ]  # fmt: skip
    finished = subprocess.run(
        command, env=environment, cwd=tmp_path / "..", capture_output=True, text=True
    )

    assert finished.returncode == 0, finished.stderr
    assert onnx.load(output).graph.node


def test_cli_convert_torch_bad_target_usage_error(cli_in, tmp_path):
    output = str(tmp_path / "o.onnx")
    result = cli_in("pkg.mod", "--input-shape", "1,3,8,8", "-o", output)

    assert result.exit_code == 2
    assert "is not MODULE:CALLABLE" in result.output


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_xyz:make", "module 'no_such_module_xyz' not found"),
        ("pkg.mod:absent", "module 'pkg.mod' has no attribute 'absent'"),
        ("pkg.mod:not_a_module", "returned int, expected a torch.nn.Module"),
        ("pkg.mod:broken", "RuntimeError: cannot build"),
    ],
    ids=["missing-module", "missing-attribute", "not-a-module", "raises"],
)
def test_cli_convert_torch_bad_callable_one_line(cli_in, tmp_path, target, message):
    result = cli_in(target, "--input-shape", "1,3,8,8", "-o", str(tmp_path / "o.onnx"))
    lines = result.stderr.strip().splitlines()

    assert result.exit_code == 1
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_cli_convert_torch_bad_shape_usage_error(cli_in, tmp_path):
    output = str(tmp_path / "o.onnx")
    result = cli_in("pkg.mod:make", "--input-shape", "1,x", "-o", output)

    assert result.exit_code == 2
    assert "comma-separated list of integers" in result.output


def test_cli_convert_torch_missing_torch_one_line(cli_in, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    output = str(tmp_path / "o.onnx")
    result = cli_in("pkg.mod:make", "--input-shape", "1,3,8,8", "-o", output)

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: PyTorch is not installed; pip install 'onnxeps[torch]'"
    )
