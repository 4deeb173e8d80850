"""Tests of the NAS-Bench-201 converter against an independent PyTorch network."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnxeps.converters import nb201
from onnxeps.converters.cli import convert as convert_group

INDEX_0 = (
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|"
    "+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|"
)
INDEX_13714 = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|"
    "+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
)
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"


def uniform_cell(op: str) -> str:
    return f"|{op}~0|+|{op}~0|{op}~1|+|{op}~0|{op}~1|{op}~2|"


NAMED_CELLS = {
    "all_none": ALL_NONE,
    "all_skip": uniform_cell("skip_connect"),
    "all_conv3x3": uniform_cell("nor_conv_3x3"),
    "all_conv1x1": uniform_cell("nor_conv_1x1"),
    "all_avgpool": uniform_cell("avg_pool_3x3"),
    "index_0": INDEX_0,
    "index_13714": INDEX_13714,
    # Node 1 is all-none but node 3 reads node 0 directly.
    "node1_none": (
        "|none~0|+|nor_conv_3x3~0|none~1|+|skip_connect~0|none~1|nor_conv_1x1~2|"
    ),
}
NUM_SAMPLED_CELLS = 16
SAMPLE_SEED = 201
CLASSES = 10
RTOL = 1e-4
ATOL = 1e-5


# ----- an independent PyTorch NB201 network -----


def parse_edges(arch_str: str) -> dict[tuple[int, int], str]:
    """Map (source, target) to op, written separately from the converter's parser."""
    edges = {}
    for target, group in enumerate(arch_str.split("+"), start=1):
        for entry in group.strip("|").split("|"):
            op, source = entry.split("~")
            edges[(int(source), target)] = op
    return edges


class ReluConvBn(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-5),
        )


class TorchCell(nn.Module):
    def __init__(self, arch_str: str, channels: int) -> None:
        super().__init__()
        self.edges = parse_edges(arch_str)
        self.ops = nn.ModuleDict()
        for (source, target), op in self.edges.items():
            key = f"{source}_{target}"
            if op == "nor_conv_3x3":
                self.ops[key] = ReluConvBn(channels, channels, 3, 1)
            elif op == "nor_conv_1x1":
                self.ops[key] = ReluConvBn(channels, channels, 1, 1)
            elif op == "avg_pool_3x3":
                self.ops[key] = nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)
            elif op == "skip_connect":
                self.ops[key] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for target in (1, 2, 3):
            total = None
            for source in range(target):
                if self.edges[(source, target)] == "none":
                    value = nodes[source] * 0.0
                else:
                    value = self.ops[f"{source}_{target}"](nodes[source])
                total = value if total is None else total + value
            nodes.append(total)
        return nodes[3]


class TorchReduction(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReluConvBn(c_in, c_out, 3, 2)
        self.conv_b = ReluConvBn(c_out, c_out, 3, 1)
        self.pool = nn.AvgPool2d(2, 2)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(self.pool(x)) + self.conv_b(self.conv_a(x))


class TorchNB201(nn.Module):
    def __init__(self, arch_str: str, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        )
        blocks: list[nn.Module] = []
        for stage, channels in enumerate((16, 32, 64)):
            if stage > 0:
                blocks.append(TorchReduction(channels // 2, channels))
            blocks.extend(TorchCell(arch_str, channels) for _ in range(5))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))))


def onnx_name(torch_key: str) -> str:
    """Translate a TorchNB201 state_dict key to the converter's initializer name."""
    parts = torch_key.split(".")
    if parts[0] == "stem":
        layer = "conv" if parts[1] == "0" else "bn"
        return f"stem.{layer}.{parts[2]}"
    if parts[0] == "head":
        return f"head.bn.{parts[2]}"
    if parts[0] == "classifier":
        return torch_key
    block = parts[1]
    if parts[2] == "ops":
        layer = "conv" if parts[4] == "1" else "bn"
        return f"cells.{block}.edge_{parts[3]}.{layer}.{parts[5]}"
    if parts[2] == "shortcut":
        return f"cells.{block}.shortcut.conv.weight"
    layer = "conv" if parts[3] == "1" else "bn"
    return f"cells.{block}.{parts[2]}.{layer}.{parts[4]}"


def randomized_torch_network(arch_str: str, seed: int) -> TorchNB201:
    """Build the torch network in eval mode with random weights and BN statistics."""
    torch.manual_seed(seed)
    network = TorchNB201(arch_str, CLASSES)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        network.classifier.bias.normal_(0.0, 0.5)
    return network.eval()


def exported_weights(network: nn.Module) -> dict[str, np.ndarray]:
    return {
        onnx_name(key): value.detach().numpy()
        for key, value in network.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }


def run_onnx(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(["logits"], {"input": images})[0]


def random_images(batch: int, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).normal(size=(batch, 3, 32, 32))
    return images.astype(np.float32)


def assert_matches_torch(arch_str: str, seed: int) -> None:
    network = randomized_torch_network(arch_str, seed)
    weights = exported_weights(network)
    model = nb201.build(arch_str, num_classes=CLASSES, weights=weights)
    images = random_images(3, seed)
    with torch.no_grad():
        expected = network(torch.from_numpy(images)).numpy()
    actual = run_onnx(model, images)
    assert actual.shape == (3, CLASSES)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def node_attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def parameter_count(model: onnx.ModelProto) -> int:
    roles = json.loads(metadata(model)["onnxeps.roles"])
    trainable = {"weight", "bias", "norm_scale", "norm_shift"}
    return sum(
        math.prod(tensor.dims)
        for tensor in model.graph.initializer
        if roles.get(tensor.name) in trainable
    )


@pytest.fixture(scope="module")
def nb201_rows(data_dir: Path) -> list[dict[str, str]]:
    with open(data_dir / "nb201" / "nb201_accuracy.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def sampled_cells(nb201_rows: list[dict[str, str]]) -> list[str]:
    rows = random.Random(SAMPLE_SEED).sample(nb201_rows, NUM_SAMPLED_CELLS)
    return [row["arch_str"] for row in rows]


# ----- parsing -----


def test_parse_arch_index_13714() -> None:
    cell = nb201.parse_arch(INDEX_13714)
    assert cell[0] == (("nor_conv_3x3", 0),)
    assert cell[1] == (("nor_conv_3x3", 0), ("nor_conv_3x3", 1))
    assert cell[2] == (("skip_connect", 0), ("nor_conv_1x1", 1), ("nor_conv_3x3", 2))


def test_parse_arch_index_0() -> None:
    cell = nb201.parse_arch(INDEX_0)
    assert cell[0] == (("avg_pool_3x3", 0),)
    assert cell[1] == (("nor_conv_1x1", 0), ("skip_connect", 1))
    assert cell[2] == (("nor_conv_1x1", 0), ("skip_connect", 1), ("skip_connect", 2))


def test_arch_from_tuple_examples() -> None:
    assert nb201.arch_from_tuple((2, 2, 0, 2, 3, 2)) == INDEX_13714
    assert nb201.arch_from_tuple((4, 3, 3, 0, 0, 0)) == INDEX_0


def test_arch_from_tuple_text_form() -> None:
    assert nb201.arch_from_tuple("(2, 2, 0, 2, 3, 2)") == INDEX_13714


def test_arch_from_tuple_matches_every_csv_row(
    nb201_rows: list[dict[str, str]],
) -> None:
    mismatches = [
        row["nb201_index"]
        for row in nb201_rows
        if nb201.arch_from_tuple(row["naslib_tuple"]) != row["arch_str"]
    ]
    assert len(nb201_rows) == 15625
    assert mismatches == []


def test_parse_arch_accepts_every_csv_row(nb201_rows: list[dict[str, str]]) -> None:
    for row in nb201_rows:
        nb201.parse_arch(row["arch_str"])


@pytest.mark.parametrize(
    ("arch_str", "message"),
    [
        (
            "|nor_conv_3x3~0|+|nor_conv_3x3~0|conv_5x5~1|+|none~0|none~1|none~2|",
            "unknown op 'conv_5x5' on edge 1->2; valid ops are none, skip_connect",
        ),
        ("|none~0|+|none~0|none~1|", "expected 3 groups joined by '+'"),
        ("|none~0|+|none~0|+|none~0|none~1|none~2|", "has 1 entries, expected 2"),
        ("|none~0|+|none~1|none~0|+|none~0|none~1|none~2|", "has source 1, expected 0"),
        ("none~0+|none~0|none~1|+|none~0|none~1|none~2|", "expected '|op~src|...|'"),
        (
            "|none|+|none~0|none~1|+|none~0|none~1|none~2|",
            "invalid entry 'none' for edge 0->1",
        ),
        ("", "expected 3 groups"),
    ],
)
def test_parse_arch_rejects_invalid(arch_str: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        nb201.parse_arch(arch_str)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        ((2, 2, 0, 2, 3, 5), "invalid NASLib op code 5 at position 5 (edge 2->3)"),
        ((2, 2, 0, 2, 3), "has 5 codes, expected 6"),
        ("(2, x, 0, 2, 3, 2)", "expected six comma-separated integers"),
    ],
)
def test_arch_from_tuple_rejects_invalid(codes: object, message: str) -> None:
    with pytest.raises(ValueError) as error:
        nb201.arch_from_tuple(codes)  # type: ignore[arg-type]
    assert message in str(error.value)


def test_build_rejects_invalid_arch() -> None:
    with pytest.raises(ValueError, match="unknown op 'conv_5x5' on edge 0->1"):
        nb201.build("|conv_5x5~0|+|none~0|none~1|+|none~0|none~1|none~2|")


def test_build_rejects_zero_classes() -> None:
    with pytest.raises(ValueError, match="num_classes must be at least 1, got 0"):
        nb201.build(INDEX_0, num_classes=0)


# ----- parity with the torch network -----


@pytest.mark.parametrize("name", sorted(NAMED_CELLS))
def test_build_matches_torch_named_cell(name: str) -> None:
    assert_matches_torch(NAMED_CELLS[name], seed=len(name))


@pytest.mark.parametrize("position", range(NUM_SAMPLED_CELLS))
def test_build_matches_torch_sampled_cell(
    sampled_cells: list[str], position: int
) -> None:
    assert_matches_torch(sampled_cells[position], seed=position)


def test_build_all_none_propagates_nan() -> None:
    images = random_images(2)
    images[0, 0, 0, 0] = np.nan
    logits = run_onnx(nb201.build(ALL_NONE), images)
    assert np.isnan(logits[0]).all()
    assert np.isfinite(logits[1]).all()


# ----- structure and metadata -----


def test_build_metadata_entries() -> None:
    model = nb201.build(INDEX_13714)
    entries = metadata(model)
    assert entries["onnxeps.encoding"] == INDEX_13714
    assert entries["onnxeps.converter"] == "onnxeps.converters.nb201 1"


def test_build_roles_cover_float_initializers() -> None:
    model = nb201.build(ALL_NONE)
    roles = json.loads(metadata(model)["onnxeps.roles"])
    floats = {
        tensor.name
        for tensor in model.graph.initializer
        if tensor.data_type == onnx.TensorProto.FLOAT
    }
    assert set(roles) == floats
    assert roles["stem.conv.weight"] == "weight"
    assert roles["stem.bn.weight"] == "norm_scale"
    assert roles["stem.bn.bias"] == "norm_shift"
    assert roles["stem.bn.running_mean"] == "norm_stat"
    assert roles["stem.bn.running_var"] == "norm_stat"
    assert roles["cells.5.shortcut.conv.weight"] == "weight"
    assert roles["classifier.weight"] == "weight"
    assert roles["classifier.bias"] == "bias"
    assert roles["zero"] == "keep"


def test_build_batchnorm_inference_form() -> None:
    model = nb201.build(INDEX_13714)
    norms = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    attributes = [node_attributes(node) for node in norms]
    # stem, head, 2 per reduction block and 5 convolution edges in each of 15 cells
    assert len(norms) == 1 + 1 + 2 * 2 + 5 * 15
    assert all(a["training_mode"] == 0 for a in attributes)
    assert all(a["epsilon"] == pytest.approx(1e-5) for a in attributes)


def test_build_opset_and_ir_version() -> None:
    model = nb201.build(INDEX_0)
    assert model.opset_import[0].domain == ""
    assert model.opset_import[0].version == 17
    assert model.ir_version in (8, 9)


def test_build_symbolic_batch_axis() -> None:
    model = nb201.build(INDEX_13714)
    input_dims = model.graph.input[0].type.tensor_type.shape.dim
    output_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert input_dims[0].dim_param == "batch"
    assert [d.dim_value for d in input_dims[1:]] == [3, 32, 32]
    assert output_dims[0].dim_param == "batch"
    assert output_dims[1].dim_value == 1


def test_build_runs_at_two_batch_sizes() -> None:
    model = nb201.build(INDEX_13714)
    images = random_images(5)
    five = run_onnx(model, images)
    one = run_onnx(model, images[:1])
    assert five.shape == (5, 1)
    assert one.shape == (1, 1)
    np.testing.assert_allclose(one[0], five[0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("index", [0, 1, 1462, 1651, 13714])
def test_build_parameter_count_matches_params_m(
    nb201_rows: list[dict[str, str]], index: int
) -> None:
    # params_m counts convolution, BN scale and shift and classifier parameters of the
    # 10-class network, but not BN running statistics.
    row = nb201_rows[index]
    model = nb201.build(row["arch_str"], num_classes=10)
    assert parameter_count(model) == round(float(row["params_m"]) * 1e6)


def test_build_same_seed_same_weights() -> None:
    first = nb201.build(INDEX_0, init_seed=3)
    second = nb201.build(INDEX_0, init_seed=3)
    third = nb201.build(INDEX_0, init_seed=4)
    assert first.SerializeToString() == second.SerializeToString()
    assert first.graph.initializer[0].raw_data != third.graph.initializer[0].raw_data


def test_build_default_weights_he_normal() -> None:
    model = nb201.build(INDEX_13714)
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = tensors["cells.0.edge_0_1.conv.weight"]
    assert conv.std() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.05)
    assert (tensors["cells.0.edge_0_1.bn.weight"] == 1).all()
    assert (tensors["cells.0.edge_0_1.bn.bias"] == 0).all()
    assert (tensors["cells.0.edge_0_1.bn.running_mean"] == 0).all()
    assert (tensors["cells.0.edge_0_1.bn.running_var"] == 1).all()


def test_build_rejects_unknown_weight_name() -> None:
    message = r"not initializers of this network: \['stem.0.weight'\]"
    with pytest.raises(ValueError, match=message):
        nb201.build(INDEX_0, weights={"stem.0.weight": np.zeros((16, 3, 3, 3))})


def test_build_rejects_wrong_weight_shape() -> None:
    message = r"weights\['stem.conv.weight'\] has shape \(16, 3\)"
    with pytest.raises(ValueError, match=message):
        nb201.build(INDEX_0, weights={"stem.conv.weight": np.zeros((16, 3))})


# ----- files and the command line -----


def test_convert_writes_loadable_file(tmp_path: Path) -> None:
    path = nb201.convert(INDEX_0, tmp_path / "cell.onnx", num_classes=10)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.onnx"]


def test_convert_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        nb201.convert(INDEX_0, tmp_path / "missing" / "cell.onnx")


def test_cli_nb201_writes_model(tmp_path: Path) -> None:
    output = tmp_path / "cell.onnx"
    result = CliRunner().invoke(
        convert_group, ["nb201", INDEX_13714, "-o", str(output), "--num-classes", "10"]
    )
    assert result.exit_code == 0
    model = onnx.load(output)
    onnx.checker.check_model(model, full_check=True)
    assert metadata(model)["onnxeps.encoding"] == INDEX_13714
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10


def test_cli_nb201_accepts_naslib_tuple(tmp_path: Path) -> None:
    output = tmp_path / "cell.onnx"
    arguments = ["nb201", "(2, 2, 0, 2, 3, 2)", "-o", str(output)]
    result = CliRunner().invoke(convert_group, arguments)
    assert result.exit_code == 0
    assert metadata(onnx.load(output))["onnxeps.encoding"] == INDEX_13714


def test_cli_nb201_bad_arch_exits_1(tmp_path: Path) -> None:
    output = tmp_path / "cell.onnx"
    arch = "|conv_5x5~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    result = CliRunner().invoke(convert_group, ["nb201", arch, "-o", str(output)])
    lines = result.output.splitlines()
    error_lines = [line for line in lines if line.startswith("Error:")]
    assert result.exit_code == 1
    assert len(error_lines) == 1
    assert "unknown op 'conv_5x5' on edge 0->1" in error_lines[0]
    assert "Traceback" not in result.output
    assert not output.exists()


def test_cli_nb201_unwritable_path_exits_1(tmp_path: Path) -> None:
    output = tmp_path / "missing" / "cell.onnx"
    result = CliRunner().invoke(convert_group, ["nb201", INDEX_0, "-o", str(output)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: failed to write")
    assert len(result.output.splitlines()) == 1


def test_build_unseeded_scores_alike() -> None:
    """init_seed None gives zero parameters; scoring replaces them, so epsilon is equal."""
    import onnxeps

    arch = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|skip_connect~0|none~1|avg_pool_3x3~2|"
    bare = nb201.build(arch, init_seed=None)
    roles = json.loads({p.key: p.value for p in bare.metadata_props}["onnxeps.roles"])
    for tensor in bare.graph.initializer:
        if tensor.name in roles:
            assert not onnx.numpy_helper.to_array(tensor).any(), tensor.name
    seeded = onnxeps.score(nb201.build(arch), preset="nb201", batch_size=8)
    unseeded = onnxeps.score(bare, preset="nb201", batch_size=8)
    assert seeded.epsilon is not None
    assert unseeded.epsilon == seeded.epsilon
