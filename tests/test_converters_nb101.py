"""Tests of the NAS-Bench-101 converter: pruning, channels and parity with PyTorch."""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnxeps.converters import nb101
from onnxeps.converters.cli import convert as convert_group

EXAMPLE_MATRIX = [
    [0, 1, 1, 0, 0, 1, 0],
    [0, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 1, 1],
    [0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0],
]
EXAMPLE_OPS = [
    "input",
    "conv3x3-bn-relu",
    "maxpool3x3",
    "conv1x1-bn-relu",
    "conv1x1-bn-relu",
    "maxpool3x3",
    "output",
]
EXAMPLE_PRUNED_MATRIX = [
    [0, 1, 1, 0, 0],
    [0, 0, 0, 1, 1],
    [0, 0, 0, 0, 1],
    [0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0],
]
EXAMPLE_PRUNED_OPS = [
    "input",
    "conv3x3-bn-relu",
    "maxpool3x3",
    "conv1x1-bn-relu",
    "output",
]
NUM_SAMPLED_CELLS = 8
SAMPLE_SEED = 101
CLASSES = 10
RTOL = 1e-4
ATOL = 1e-5

Matrix = list[list[int]]
Row = dict[str, str]


# ----- an independent PyTorch NB101 network, following the nasbench model builder -----


def reference_prune(matrix: Matrix, ops: list[str]) -> tuple[Matrix, list[str]]:
    size = len(matrix)
    forward = {0}
    for target in range(size):
        if any(matrix[source][target] for source in forward if source < target):
            forward.add(target)
    backward = {size - 1}
    for source in reversed(range(size)):
        if any(matrix[source][target] for target in backward if target > source):
            backward.add(source)
    kept = sorted(forward & backward)
    return [[matrix[s][t] for t in kept] for s in kept], [ops[v] for v in kept]


def reference_channels(c_in: int, c_out: int, matrix: Matrix) -> list[int]:
    size = len(matrix)
    channels = [c_in] + [0] * (size - 2) + [c_out]
    if size == 2:
        return channels
    in_degree = sum(matrix[v][size - 1] for v in range(1, size))
    base, extra = c_out // in_degree, c_out % in_degree
    for v in range(1, size - 1):
        if matrix[v][size - 1]:
            channels[v] = base + (1 if extra > 0 else 0)
            extra -= 1
    for v in range(size - 3, 0, -1):
        if not matrix[v][size - 1]:
            for dst in range(v + 1, size - 1):
                if matrix[v][dst]:
                    channels[v] = max(channels[v], channels[dst])
    return channels


def conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out, eps=1e-5),
        nn.ReLU(),
    )


class TorchCell(nn.Module):
    def __init__(self, matrix: Matrix, ops: list[str], c_in: int, c_out: int) -> None:
        super().__init__()
        self.matrix = matrix
        self.channels = reference_channels(c_in, c_out, matrix)
        size = len(matrix)
        self.vertex_ops = nn.ModuleDict()
        for v in range(1, size - 1):
            width = self.channels[v]
            if ops[v] == "maxpool3x3":
                self.vertex_ops[str(v)] = nn.MaxPool2d(3, 1, padding=1)
            else:
                kernel = 3 if ops[v] == "conv3x3-bn-relu" else 1
                self.vertex_ops[str(v)] = conv_bn_relu(width, width, kernel)
        self.projections = nn.ModuleDict()
        for v in range(1, size):
            if matrix[0][v]:
                self.projections[str(v)] = conv_bn_relu(c_in, self.channels[v], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = len(self.matrix)
        tensors = [x]
        for v in range(1, size - 1):
            width = self.channels[v]
            inputs = [tensors[s][:, :width] for s in range(1, v) if self.matrix[s][v]]
            if self.matrix[0][v]:
                inputs.append(self.projections[str(v)](x))
            tensors.append(self.vertex_ops[str(v)](sum(inputs)))
        feeders = [tensors[v] for v in range(1, size - 1) if self.matrix[v][size - 1]]
        if not feeders:
            return self.projections[str(size - 1)](x)
        output = torch.cat(feeders, dim=1)
        if self.matrix[0][size - 1]:
            output = output + self.projections[str(size - 1)](x)
        return output


class TorchNB101(nn.Module):
    def __init__(self, matrix: Matrix, ops: list[str], num_classes: int) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 128, 3)
        cells = []
        c_in = 128
        for stack in range(3):
            c_out = 128 * 2**stack
            for _ in range(3):
                cells.append(TorchCell(matrix, ops, c_in, c_out))
                c_in = c_out
        self.cells = nn.ModuleList(cells)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index, cell in enumerate(self.cells):
            if index in (3, 6):
                x = nn.functional.max_pool2d(x, 2, 2)
            x = cell(x)
        return self.classifier(x.mean(dim=(2, 3)))


def onnx_name(torch_key: str) -> str:
    """Translate a TorchNB101 state_dict key to the converter's initializer name."""
    parts = torch_key.split(".")
    if parts[0] == "classifier":
        return torch_key
    layer = "conv" if parts[-2] == "0" else "bn"
    if parts[0] == "stem":
        return f"stem.{layer}.{parts[-1]}"
    kind = "vertex" if parts[2] == "vertex_ops" else "proj"
    return f"cells.{parts[1]}.{kind}{parts[3]}.{layer}.{parts[-1]}"


def randomized_torch_network(matrix: Matrix, ops: list[str], seed: int) -> TorchNB101:
    """Build the torch network in eval mode with random weights and BN statistics."""
    torch.manual_seed(seed)
    network = TorchNB101(matrix, ops, CLASSES)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        network.classifier.bias.normal_(0.0, 0.5)
    return network.eval()


def assert_matches_torch(matrix: Matrix, ops: list[str], seed: int) -> None:
    pruned_matrix, pruned_ops = reference_prune(matrix, ops)
    network = randomized_torch_network(pruned_matrix, pruned_ops, seed)
    weights = {
        onnx_name(key): value.numpy()
        for key, value in network.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    model = nb101.build(matrix, ops, num_classes=CLASSES, weights=weights)
    images = np.random.default_rng(seed).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = network(torch.from_numpy(images)).numpy()
    actual = run_onnx(model, images)
    assert actual.shape == (2, CLASSES)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def run_onnx(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(["logits"], {"input": images})[0]


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def has_truncation(matrix: Matrix) -> bool:
    channels = reference_channels(128, 128, matrix)
    interior = range(1, len(matrix) - 1)
    return any(
        matrix[s][t] and channels[s] > channels[t] for s in interior for t in interior
    )


@pytest.fixture(scope="module")
def nb101_rows(data_dir: Path) -> list[Row]:
    with open(data_dir / "nb101" / "nb101_subset500.csv", newline="") as file:
        return list(csv.DictReader(file))


def raw_spec(row: Row) -> tuple[Matrix, list[str]]:
    return json.loads(row["raw_matrix_7x7"]), json.loads(row["raw_ops"])


# Cells that exercise each path of the cell builder, chosen by their pruned structure.
SPECIAL_CELLS: dict[str, Callable[[Matrix], bool]] = {
    "input_output_only": lambda m: len(m) == 2,
    "truncation": has_truncation,
    "three_output_feeders_and_input_edge": lambda m: (
        sum(m[v][-1] for v in range(1, len(m) - 1)) == 3 and m[0][-1] == 1
    ),
    "seven_vertices": lambda m: len(m) == 7,
}


@pytest.fixture(scope="module")
def parity_cells(nb101_rows: list[Row]) -> dict[str, Row]:
    cells = {}
    for name, predicate in SPECIAL_CELLS.items():
        pruned = (reference_prune(*raw_spec(row))[0] for row in nb101_rows)
        position = next(i for i, matrix in enumerate(pruned) if predicate(matrix))
        cells[name] = nb101_rows[position]
    sampled = random.Random(SAMPLE_SEED).sample(nb101_rows, NUM_SAMPLED_CELLS)
    for position, row in enumerate(sampled):
        cells[f"sampled_{position}"] = row
    return cells


# ----- pruning and encodings -----


def test_prune_encodings_example() -> None:
    matrix, ops = nb101.prune(EXAMPLE_MATRIX, EXAMPLE_OPS)
    assert matrix == EXAMPLE_PRUNED_MATRIX
    assert ops == EXAMPLE_PRUNED_OPS


def test_prune_accepts_numpy_matrix() -> None:
    matrix, _ = nb101.prune(np.array(EXAMPLE_MATRIX), EXAMPLE_OPS)
    assert matrix == EXAMPLE_PRUNED_MATRIX


def test_prune_matches_csv_pruned_columns(nb101_rows: list[Row]) -> None:
    assert len(nb101_rows) == 500
    for row in nb101_rows:
        key = row["naslib_tuple"]
        matrix, ops = nb101.prune(*raw_spec(row))
        assert matrix == json.loads(row["pruned_matrix"]), key
        assert ops == json.loads(row["pruned_ops"]), key
        assert len(matrix) == int(row["pruned_num_vertices"]), key
        assert sum(map(sum, matrix)) == int(row["pruned_num_edges"]), key


def test_spec_from_tuple_matches_raw_columns(nb101_rows: list[Row]) -> None:
    for row in nb101_rows:
        key = row["naslib_tuple"]
        assert nb101.spec_from_tuple(key) == raw_spec(row), key


def test_spec_from_tuple_rejects_bad_length() -> None:
    message = r"N\*N \+ N codes for N vertices, got 5 codes"
    with pytest.raises(ValueError, match=message):
        nb101.spec_from_tuple((0, 1, 0, 0, 0))


def chain(size: int) -> Matrix:
    """Return the matrix of a path 0 -> 1 -> ... -> size-1."""
    return [[1 if t == s + 1 else 0 for t in range(size)] for s in range(size)]


@pytest.mark.parametrize(
    ("matrix", "ops", "message"),
    [
        (
            [[0, 1], [1, 0]],
            ["input", "output"],
            "strictly upper-triangular, but it has an edge 1->0",
        ),
        ([[0, 1, 0]], ["input", "output"], "must be square with at least 2 vertices"),
        ([[0, 2], [0, 0]], ["input", "output"], "entries must be 0 or 1"),
        ([[0, 1], [0, 0]], ["input"], "ops must be a list of 2 op names"),
        (
            [[0, 1], [0, 0]],
            ["output", "input"],
            "ops must start with 'input' and end with 'output'",
        ),
        (
            [[0, 1, 0], [0, 0, 1], [0, 0, 0]],
            ["input", "conv5x5-bn-relu", "output"],
            "unknown op 'conv5x5-bn-relu' at vertex 1; valid ops are conv3x3-bn-relu",
        ),
        (
            [[0, 0, 0], [0, 0, 1], [0, 0, 0]],
            ["input", "maxpool3x3", "output"],
            "no path from the input",
        ),
        (
            chain(8),
            ["input"] + ["maxpool3x3"] * 6 + ["output"],
            "8 vertices; at most 7",
        ),
        (
            np.triu(np.ones((7, 7), dtype=int), 1).tolist(),
            ["input"] + ["maxpool3x3"] * 5 + ["output"],
            "21 edges; at most 9",
        ),
    ],
)
def test_prune_rejects_invalid(matrix: Matrix, ops: list[str], message: str) -> None:
    with pytest.raises(ValueError) as error:
        nb101.prune(matrix, ops)
    assert message in str(error.value)


def test_prune_counts_edges_after_pruning() -> None:
    # 12 edges before pruning, 3 of them into the dead vertex 5, which feeds nothing.
    matrix = [
        [0, 1, 0, 0, 0, 1, 1],
        [0, 0, 1, 0, 0, 1, 1],
        [0, 0, 0, 1, 0, 1, 1],
        [0, 0, 0, 0, 1, 0, 1],
        [0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ]
    pruned, ops = nb101.prune(matrix, ["input"] + ["conv1x1-bn-relu"] * 5 + ["output"])
    assert sum(map(sum, matrix)) == 12
    assert sum(map(sum, pruned)) == 9
    assert len(ops) == 6


@pytest.mark.parametrize(
    ("matrix", "c_in", "c_out", "expected"),
    [
        # Vertices 1, 2 and 3 feed the output: 43 + 43 + 42 = 128.
        (EXAMPLE_PRUNED_MATRIX, 128, 128, [128, 43, 43, 42, 128]),
        (EXAMPLE_PRUNED_MATRIX, 128, 256, [128, 86, 85, 85, 256]),
        # Only vertex 3 feeds the output, and vertices 1 and 2 take its width.
        (
            [
                [0, 1, 1, 0, 0],
                [0, 0, 0, 1, 0],
                [0, 0, 0, 1, 0],
                [0, 0, 0, 0, 1],
                [0, 0, 0, 0, 0],
            ],
            128,
            256,
            [128, 256, 256, 256, 256],
        ),
        # Vertices 1 and 3 feed the output, and vertex 2 takes the width of vertex 3.
        (
            [
                [0, 1, 0, 0, 0],
                [0, 0, 1, 0, 1],
                [0, 0, 0, 1, 0],
                [0, 0, 0, 0, 1],
                [0, 0, 0, 0, 0],
            ],
            128,
            128,
            [128, 64, 64, 64, 128],
        ),
        ([[0, 1], [0, 0]], 128, 256, [128, 256]),
    ],
)
def test_vertex_channels_cases(
    matrix: Matrix, c_in: int, c_out: int, expected: list[int]
) -> None:
    assert nb101.vertex_channels(matrix, c_in, c_out) == expected


def test_vertex_channels_matches_reference(nb101_rows: list[Row]) -> None:
    for row in nb101_rows:
        matrix = json.loads(row["pruned_matrix"])
        for c_in, c_out in ((128, 128), (128, 256), (256, 512)):
            expected = reference_channels(c_in, c_out, matrix)
            assert nb101.vertex_channels(matrix, c_in, c_out) == expected


# ----- parity with the torch network -----


PARITY_NAMES = [*SPECIAL_CELLS, *(f"sampled_{i}" for i in range(NUM_SAMPLED_CELLS))]


@pytest.mark.parametrize("name", PARITY_NAMES)
def test_build_matches_torch(parity_cells: dict[str, Row], name: str) -> None:
    matrix, ops = raw_spec(parity_cells[name])
    assert_matches_torch(matrix, ops, seed=len(name))


# ----- structure and metadata -----


@pytest.mark.parametrize("position", [0, 1, 2, 3, 4, 100, 499])
def test_build_parameter_count_matches_csv(
    nb101_rows: list[Row], position: int
) -> None:
    # The CSV's params (millions) counts convolutions, BN scale and shift and the dense
    # layer of the 10-class network, but not BN running statistics.
    row = nb101_rows[position]
    model = nb101.build(*raw_spec(row), num_classes=10)
    roles = json.loads(metadata(model)["onnxeps.roles"])
    trainable = {"weight", "bias", "norm_scale", "norm_shift"}
    count = sum(
        math.prod(tensor.dims)
        for tensor in model.graph.initializer
        if roles.get(tensor.name) in trainable
    )
    assert count == round(float(row["params"]) * 1e6)


def test_build_metadata_entries() -> None:
    model = nb101.build(EXAMPLE_MATRIX, EXAMPLE_OPS)
    entries = metadata(model)
    encoding = json.loads(entries["onnxeps.encoding"])
    assert encoding == {"matrix": EXAMPLE_MATRIX, "ops": EXAMPLE_OPS}
    assert entries["onnxeps.converter"] == "onnxeps.converters.nb101 1"


def test_build_roles_cover_float_initializers() -> None:
    model = nb101.build(EXAMPLE_MATRIX, EXAMPLE_OPS)
    roles = json.loads(metadata(model)["onnxeps.roles"])
    floats = {
        t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    }
    assert set(roles) == floats
    assert roles["cells.0.vertex1.conv.weight"] == "weight"
    assert roles["cells.0.proj2.bn.weight"] == "norm_scale"
    assert roles["cells.8.vertex3.bn.running_var"] == "norm_stat"
    assert roles["classifier.bias"] == "bias"


def test_build_batchnorm_inference_form() -> None:
    model = nb101.build(EXAMPLE_MATRIX, EXAMPLE_OPS)
    norms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    attributes = [
        {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for node in norms
    ]
    # stem, then per cell 2 conv vertices and 2 projections (into vertices 1 and 2)
    assert len(norms) == 1 + 9 * 4
    assert all(a["training_mode"] == 0 for a in attributes)
    assert all(a["epsilon"] == pytest.approx(1e-5) for a in attributes)


def test_build_symbolic_batch_axis() -> None:
    model = nb101.build([[0, 1], [0, 0]], ["input", "output"])
    images = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert run_onnx(model, images).shape == (3, 1)
    assert run_onnx(model, images[:1]).shape == (1, 1)


def test_build_rejects_unknown_weight_name() -> None:
    with pytest.raises(ValueError, match="not initializers of this network"):
        weights = {"cells.0.vertex1.conv.weight": np.zeros((128, 128, 3, 3))}
        nb101.build([[0, 1], [0, 0]], ["input", "output"], weights=weights)


# ----- files and the command line -----


def test_convert_writes_loadable_file(tmp_path: Path) -> None:
    path = nb101.convert(EXAMPLE_MATRIX, EXAMPLE_OPS, tmp_path / "cell.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.onnx"]


def test_cli_nb101_json_text(tmp_path: Path) -> None:
    output = tmp_path / "cell.onnx"
    matrix, ops = json.dumps(EXAMPLE_MATRIX), json.dumps(EXAMPLE_OPS)
    arguments = ["nb101", "--matrix", matrix, "--ops", ops, "-o", str(output)]
    result = CliRunner().invoke(convert_group, arguments)
    assert result.exit_code == 0
    model = onnx.load(output)
    onnx.checker.check_model(model, full_check=True)
    assert json.loads(metadata(model)["onnxeps.encoding"])["ops"] == EXAMPLE_OPS


def test_cli_nb101_json_files(tmp_path: Path) -> None:
    matrix_file = tmp_path / "matrix.json"
    ops_file = tmp_path / "ops.json"
    matrix_file.write_text(json.dumps(EXAMPLE_MATRIX))
    ops_file.write_text(json.dumps(EXAMPLE_OPS))
    output = tmp_path / "cell.onnx"
    arguments = ["nb101", "--matrix", str(matrix_file), "--ops", str(ops_file)]
    arguments += ["-o", str(output), "--num-classes", "10"]
    result = CliRunner().invoke(convert_group, arguments)
    logits = onnx.load(output).graph.output[0].type.tensor_type
    assert result.exit_code == 0
    assert logits.shape.dim[1].dim_value == 10


@pytest.mark.parametrize(
    ("matrix", "ops", "message"),
    [
        ("[[0, 1], [1, 0]]", '["input", "output"]', "strictly upper-triangular"),
        (
            "[[0, 1], [0, 0]]",
            '["input", "outpt"]',
            "ops must start with 'input' and end with 'output'",
        ),
        (
            "missing.json",
            '["input", "output"]',
            "'missing.json' is neither an existing file nor valid JSON",
        ),
    ],
)
def test_cli_nb101_bad_input_exits_1(
    tmp_path: Path, matrix: str, ops: str, message: str
) -> None:
    output = tmp_path / "cell.onnx"
    arguments = ["nb101", "--matrix", matrix, "--ops", ops, "-o", str(output)]
    result = CliRunner().invoke(convert_group, arguments)
    lines = result.output.splitlines()
    error_lines = [line for line in lines if line.startswith("Error:")]
    assert result.exit_code == 1
    assert len(error_lines) == 1
    assert message in error_lines[0]
    assert "Traceback" not in result.output
    assert not output.exists()
