"""Parity of onnxeps scores with epsilon computed natively in PyTorch.

Each torch module is exported to ONNX (eval mode, BatchNormalization kept as nodes) and
scored with ``onnxeps.score``. The native side applies the same constants to a deep copy
of the module. Weights and normalisation scales become w, and biases and shifts 0.
Embeddings get the U(0, 1) values the core draws, BatchNorm uses batch statistics and
dropout is off. Both outputs then go through ``onnxeps.epsilon``, and the two scores
must agree within relative 1e-4.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import onnxeps  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
PARITY_TOLERANCE = 1e-4
WEIGHT_PAIRS = [(1e-7, 1.0), (1e-4, 10.0)]
BATCH_SIZE = 32
SEQ_LEN = 20
# The core's default seed: synthetic inputs first, then embedding tables, one generator.
DEFAULT_SEED = 21
# CIFAR per-channel (RGB) statistics in [0, 1] units, as the reference loaders used.
CIFAR_MEAN = np.array([125.3, 123.0, 113.9]) / 255
CIFAR_STD = np.array([63.0, 62.1, 66.7]) / 255


def load_make_models():
    """Import models/make_models.py, which is a script rather than a package module."""
    name = "make_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MODELS_DIR / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


make_models = load_make_models()


class BiasedResidualBlock(nn.Module):
    """A conv-BN residual block whose convolutions carry biases."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class MaxPoolResNet(nn.Module):
    """A residual CNN with a max-pooled stem, biased convolutions and non-default BN.

    Every BatchNorm gets random scale, shift and running statistics, so a rewrite that
    kept any of them would change the score.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.block1 = BiasedResidualBlock(8, 8)
        self.block2 = BiasedResidualBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_()
                    module.running_mean.normal_()
                    module.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        out = self.block2(self.block1(self.stem(x)))
        return self.head(torch.flatten(self.pool(out), 1))


def set_constants(module: nn.Module, weight: float, tables: list[np.ndarray]) -> None:
    """Set every parameter of ``module`` in place as the epsilon metric prescribes.

    Embedding tables take the arrays of ``tables`` in module order. A module type with
    parameters and no rule here raises TypeError, so no parameter keeps its trained value.
    """
    pending = list(tables)
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d | nn.Linear | nn.BatchNorm1d | nn.BatchNorm2d):
            sub.weight.fill_(weight)
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, nn.LSTM):
            for name, parameter in sub.named_parameters():
                if name.startswith("weight_"):
                    parameter.fill_(weight)
                else:
                    parameter.zero_()
        elif isinstance(sub, nn.Embedding):
            sub.weight.copy_(torch.from_numpy(pending.pop(0)))
        elif any(True for _ in sub.parameters(recurse=False)):
            raise TypeError(f"no constant rule for {type(sub).__name__} parameters")


def native_output(
    module: nn.Module,
    batch: np.ndarray,
    weight: float,
    tables: list[np.ndarray],
    batch_statistics: bool = True,
) -> np.ndarray:
    """Run a constant-weight copy of ``module`` on ``batch``; return the output as float64."""
    copied = copy.deepcopy(module).eval()
    with torch.no_grad():
        set_constants(copied, weight, tables)
        for sub in copied.modules():
            if isinstance(sub, nn.BatchNorm1d | nn.BatchNorm2d):
                # Training mode normalises with the batch mean and biased variance.
                sub.train(batch_statistics)
        output = copied(torch.from_numpy(batch))
    return output.double().numpy()


def native_epsilon(
    module: nn.Module,
    batch: np.ndarray,
    weights: tuple[float, float],
    tables: list[np.ndarray] = (),
    batch_statistics: bool = True,
) -> float:
    """Compute epsilon of ``module`` in PyTorch with the metric's constants."""
    outputs = [
        native_output(module, batch, weight, list(tables), batch_statistics)
        for weight in weights
    ]
    return onnxeps.epsilon(outputs[0], outputs[1]).value


def grey_batch(shape: tuple[int, ...]) -> np.ndarray:
    """Return the synthetic grey batch: sample i is the constant i/B everywhere."""
    size = shape[0]
    ramp = np.arange(size, dtype=np.float64) / size
    view = (size,) + (1,) * (len(shape) - 1)
    return np.broadcast_to(ramp.reshape(view), shape).astype(np.float32)


def cifar_batch(data_dir: Path) -> np.ndarray:
    """Return all 256 CIFAR-10 images as normalised float32 NCHW."""
    images = np.load(data_dir / "inputs" / "cifar10_256.npz")["x"]
    scaled = images.transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    normalised = (scaled - CIFAR_MEAN.reshape(1, 3, 1, 1)) / CIFAR_STD.reshape(1, 3, 1, 1)
    return normalised.astype(np.float32)


def token_batch_and_tables(vocab_size: int, embedding_dim: int, seed: int = DEFAULT_SEED):
    """Draw the synthetic token ids and the embedding table in the core's order."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(SEQ_LEN, BATCH_SIZE)).astype(np.int64)
    table = rng.random((vocab_size, embedding_dim)).astype(np.float32)
    return tokens, [table]


def export(module: nn.Module, name: str, folder: Path) -> Path:
    """Export ``module`` like make_models does; the variant takes the CNN's settings."""
    spec_name = "resnet_bn" if name == "maxpool_resnet" else name
    spec = make_models.SPECS[spec_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and LSTM notes
        return make_models.export_model(
            module,
            make_models.example_input(spec_name),
            folder / f"{name}.onnx",
            spec.input_name,
            spec.output_name,
            spec.dynamic_axes,
        )


@pytest.fixture(scope="module")
def torch_models() -> dict[str, nn.Module]:
    models = make_models.build_models()
    torch.manual_seed(1)
    models["maxpool_resnet"] = MaxPoolResNet()
    return models


@pytest.fixture(scope="module")
def onnx_paths(torch_models, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    return {name: export(module, name, folder) for name, module in torch_models.items()}


@pytest.fixture(scope="module")
def cifar_npz(data_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "cifar10_normalised.npz"
    np.savez(path, x=cifar_batch(data_dir))
    return path


def score_onnx(path: Path, kind: str, weights, cifar_npz: Path | None = None) -> float:
    """Score an exported model with onnxeps on the batch ``kind`` names."""
    if kind == "cifar":
        result = onnxeps.score(path, inputs=cifar_npz, weights=weights, batch_size=BATCH_SIZE)
    elif kind == "grey":
        result = onnxeps.score(path, synthetic="grey", weights=weights, batch_size=BATCH_SIZE)
    else:
        result = onnxeps.score(path, weights=weights, batch_size=BATCH_SIZE, seq_len=SEQ_LEN)
    return math.nan if result.epsilon is None else result.epsilon


def native_score(module: nn.Module, name: str, kind: str, weights, data_dir: Path) -> float:
    """Compute the native epsilon of a model on the same batch the core scores."""
    if kind == "cifar":
        return native_epsilon(module, cifar_batch(data_dir)[:BATCH_SIZE], weights)
    if kind == "grey":
        features = (3, 32, 32) if "resnet" in name else (64,)
        return native_epsilon(module, grey_batch((BATCH_SIZE, *features)), weights)
    embedding = module.embedding
    tokens, tables = token_batch_and_tables(embedding.num_embeddings, embedding.embedding_dim)
    return native_epsilon(module, tokens, weights, tables)


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


CASES = [
    ("resnet_bn", "grey"),
    ("resnet_bn", "cifar"),
    ("maxpool_resnet", "grey"),
    ("maxpool_resnet", "cifar"),
    ("mlp", "grey"),
    ("lstm_lm", "tokens"),
]


@pytest.mark.parametrize("weights", WEIGHT_PAIRS, ids=lambda pair: f"w{pair[0]:g}-{pair[1]:g}")
@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_score_matches_torch_native(
    name, kind, weights, torch_models, onnx_paths, cifar_npz, data_dir
):
    expected = native_score(torch_models[name], name, kind, weights, data_dir)
    scored = score_onnx(onnx_paths[name], kind, weights, cifar_npz)

    assert math.isfinite(expected), f"native epsilon of {name} is undefined"
    assert math.isfinite(scored), f"onnxeps epsilon of {name} is undefined"
    assert relative_difference(scored, expected) <= PARITY_TOLERANCE, (
        f"{name} on {kind}: onnxeps {scored!r}, torch {expected!r}"
    )


@pytest.mark.parametrize("name", ["resnet_bn", "maxpool_resnet"])
def test_export_keeps_batchnorm_nodes(name, onnx_paths):
    model = onnx.load(onnx_paths[name])
    op_types = {node.op_type for node in model.graph.node}

    assert "BatchNormalization" in op_types
    assert "Dropout" not in op_types


def test_native_epsilon_differs_across_models(torch_models, data_dir):
    weights = WEIGHT_PAIRS[0]
    scores = {
        name: native_score(torch_models[name], name, kind, weights, data_dir)
        for name, kind in CASES
        if kind != "cifar"
    }
    names = sorted(scores)
    for index, first in enumerate(names):
        for second in names[index + 1 :]:
            difference = relative_difference(scores[first], scores[second])
            assert difference > 1e-3, f"{first} and {second} both score {scores[first]!r}"


def test_parity_detects_running_statistics(torch_models, data_dir):
    """The native helper must tell BN on running statistics from batch statistics."""
    module = torch_models["resnet_bn"]
    batch = cifar_batch(data_dir)[:BATCH_SIZE]
    weights = WEIGHT_PAIRS[0]
    running = native_epsilon(module, batch, weights, batch_statistics=False)
    batch_stats = native_epsilon(module, batch, weights)

    assert math.isfinite(running)
    assert relative_difference(running, batch_stats) > 1e-3


def test_parity_detects_other_embedding_seed(torch_models, onnx_paths):
    module = torch_models["lstm_lm"]
    embedding = module.embedding
    weights = WEIGHT_PAIRS[0]
    tokens, tables = token_batch_and_tables(
        embedding.num_embeddings, embedding.embedding_dim, seed=DEFAULT_SEED + 1
    )
    other_seed = native_epsilon(module, tokens, weights, tables)
    scored = score_onnx(onnx_paths["lstm_lm"], "tokens", weights)

    assert relative_difference(scored, other_seed) > 1e-3


def test_native_helper_leaves_module_unchanged(torch_models, data_dir):
    module = torch_models["maxpool_resnet"]
    before = {key: value.clone() for key, value in module.state_dict().items()}
    was_training = module.training
    native_epsilon(module, cifar_batch(data_dir)[:BATCH_SIZE], WEIGHT_PAIRS[0])
    after = module.state_dict()

    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert module.training == was_training
