"""Build the small example models and export them to ONNX in this folder.

Run ``python models/make_models.py`` (needs torch 2.13, the ``torch`` extra). The
modules are seeded, so every run writes the same weights. Tests import this file to
reuse the module definitions through :func:`build_models` and :func:`export_model`.

Models are exported with the TorchScript exporter (``dynamo=False``) at opset 17 and
``do_constant_folding=False``, because constant folding in eval mode folds
BatchNormalization into the preceding Conv. Each export runs in eval mode on a deep
copy, so the caller's module keeps its mode and running statistics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ModelSpec",
    "ResidualBlock",
    "ResNetBN",
    "MLP",
    "LSTMLanguageModel",
    "SEED",
    "OPSET",
    "build_models",
    "example_input",
    "export_model",
    "main",
]

SEED = 0
OPSET = 17
MODELS_DIR = Path(__file__).resolve().parent
VOCAB_SIZE = 100
EMBEDDING_DIM = 16
HIDDEN_SIZE = 32


class ResidualBlock(nn.Module):
    """Two conv-BN stages with a skip connection (the basic block of ResNet).

    A block that changes the stride or the channel count gets a 1x1 conv-BN projection
    on the shortcut; otherwise the shortcut is the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetBN(nn.Module):
    """A small residual CNN for 3x32x32 images with 10 output logits."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.block1 = ResidualBlock(width, width)
        self.block2 = ResidualBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block2(self.block1(self.stem(x)))
        return self.head(torch.flatten(self.pool(out), 1))


class MLP(nn.Module):
    """A multilayer perceptron on 64 features with tanh, sigmoid, dropout and 10 outputs.

    Both hidden layers are residual (x + tanh(Wx)). At w = 1e-7 every pre-activation is
    about 1e-6, so a plain Linear-sigmoid stack outputs 0.5 plus a few float32 ulps,
    and at w >= 1 tanh saturates to 1. Either way a plain stack gives a constant or
    quantised output and an undefined epsilon, while the skip path keeps the input.
    """

    def __init__(self, features: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, features)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(features, features)
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.sigmoid(x + torch.tanh(self.fc1(x)))
        out = self.dropout(out)
        out = out + torch.tanh(self.fc2(out))
        return self.head(out)


class LSTMLanguageModel(nn.Module):
    """An LSTM language model on sequence-first (seq, batch) int64 token ids.

    The embedding and the decoder have separate (untied) weights, so the exported
    embedding table has a single role. The output is (seq, batch, vocab) logits.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        embedding_dim: int = EMBEDDING_DIM,
        hidden_size: int = HIDDEN_SIZE,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=1)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.decoder(hidden)


@dataclass(frozen=True)
class ModelSpec:
    """Export settings of one example model: file name, input and output names, axes."""

    file_name: str
    input_name: str
    output_name: str
    dynamic_axes: dict[int, str]


SPECS: dict[str, ModelSpec] = {
    "resnet_bn": ModelSpec("resnet_bn.onnx", "x", "logits", {0: "batch"}),
    "mlp": ModelSpec("mlp.onnx", "x", "logits", {0: "batch"}),
    "lstm_lm": ModelSpec("lstm_lm.onnx", "tokens", "logits", {0: "seq", 1: "batch"}),
}


def build_models() -> dict[str, nn.Module]:
    """Build the example modules, seeded with :data:`SEED`, keyed by model name."""
    torch.manual_seed(SEED)
    return {
        "resnet_bn": ResNetBN(),
        "mlp": MLP(),
        "lstm_lm": LSTMLanguageModel(),
    }


def example_input(name: str, batch_size: int = 2, seq_len: int = 5) -> torch.Tensor:
    """Return an input for tracing the named model; only its shape and dtype matter."""
    if name == "resnet_bn":
        return torch.zeros(batch_size, 3, 32, 32)
    if name == "mlp":
        return torch.zeros(batch_size, 64)
    if name == "lstm_lm":
        return torch.zeros(seq_len, batch_size, dtype=torch.int64)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(SPECS)}")


def export_model(
    module: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    input_name: str,
    output_name: str,
    dynamic_axes: dict[int, str],
) -> Path:
    """Export an eval-mode deep copy of ``module`` to ONNX at ``path``.

    BatchNormalization stays a node, and the axes in ``dynamic_axes`` (axis index to
    name) are symbolic in the input and the output.
    """
    exported = copy.deepcopy(module).eval()
    path = Path(path)
    torch.onnx.export(
        exported,
        (example,),
        str(path),
        dynamo=False,
        do_constant_folding=False,
        opset_version=OPSET,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: dynamic_axes, output_name: dynamic_axes},
    )
    return path


def main(output_dir: str | Path = MODELS_DIR) -> list[Path]:
    """Write every example model into ``output_dir``; return the written paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, module in build_models().items():
        spec = SPECS[name]
        path = export_model(
            module,
            example_input(name),
            output_dir / spec.file_name,
            spec.input_name,
            spec.output_name,
            spec.dynamic_axes,
        )
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in main():
        print(written_path)
