"""Smoke tests of the scripts in benchmarks/, each loaded from its file path."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import onnxeps  # noqa: E402
from onnxeps.converters import nb201  # noqa: E402
from onnxeps.cost import model_costs  # noqa: E402
from onnxeps.plan import build_plan  # noqa: E402

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
BATCH_SIZE = 8
PARITY_TOLERANCE = 1e-4
# (arch string, epsilon defined). The first cell uses every edge op and has a
# skip_connect path from cell input to output. The second has no parameter-free path,
# so its w1 = 1e-7 output underflows to a constant.
CELLS = [
    (
        "|nor_conv_3x3~0|+|none~0|skip_connect~1|"
        "+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|",
        True,
    ),
    (
        "|nor_conv_3x3~0|+|nor_conv_1x1~0|none~1|"
        "+|none~0|nor_conv_3x3~1|nor_conv_1x1~2|",
        False,
    ),
]


def load_script(name: str):
    """Import benchmarks/NAME.py under the module name NAME."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def torch_eager():
    return load_script("torch_eager_nb201")


@pytest.fixture(scope="module")
def cifar_file(data_dir: Path) -> Path:
    return data_dir / "inputs" / "cifar10_256.npz"


@pytest.mark.parametrize(("arch_str", "defined"), CELLS)
def test_torch_network_matches_onnxeps(torch_eager, cifar_file, arch_str, defined):
    batch = torch_eager.load_batch(cifar_file, BATCH_SIZE)
    torch_result = torch_eager.torch_epsilon(arch_str, batch)
    onnxeps_result = onnxeps.score(
        nb201.build(arch_str), cifar_file, preset="nb201", batch_size=BATCH_SIZE
    )
    assert (onnxeps_result.epsilon is not None) == defined, onnxeps_result.reason
    assert torch_result.defined == defined, torch_result.reason
    if defined:
        assert torch_result.value == pytest.approx(
            onnxeps_result.epsilon, rel=PARITY_TOLERANCE
        )


@pytest.mark.parametrize("arch_str", [arch_str for arch_str, _ in CELLS])
def test_torch_network_parameter_count(torch_eager, arch_str):
    network = torch_eager.NB201Network(arch_str)
    model = nb201.build(arch_str)
    costs = model_costs(model, build_plan(model), {"input": (1, 3, 32, 32)})
    assert sum(parameter.numel() for parameter in network.parameters()) == costs.params


def test_batch_normalised_nchw(torch_eager, cifar_file):
    batch = torch_eager.load_batch(cifar_file, BATCH_SIZE)
    assert tuple(batch.shape) == (BATCH_SIZE, 3, 32, 32)
    assert str(batch.dtype) == "torch.float32"
    with np.load(cifar_file) as arrays:
        pixel = arrays["x"][BATCH_SIZE - 1, 5, 7].astype(np.float64)
    mean = np.array([125.3, 123.0, 113.9])
    std = np.array([63.0, 62.1, 66.7])
    expected = (pixel - mean) / std
    actual = batch[BATCH_SIZE - 1, :, 5, 7].numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_run_onnxeps_records_every_cell(torch_eager, cifar_file, data_dir):
    arch_strs = {arch_str for arch_str, _ in CELLS}
    truth = data_dir / "nb201" / "nb201_accuracy.csv"
    with open(truth, newline="", encoding="utf-8") as stream:
        rows = [row for row in csv.DictReader(stream) if row["arch_str"] in arch_strs]
    assert len(rows) == len(CELLS)
    seconds, records = torch_eager.run_onnxeps(rows, cifar_file, BATCH_SIZE, [])
    assert seconds > 0
    assert set(records) == arch_strs
    for arch_str, defined in CELLS:
        assert records[arch_str]["batch_size"] == BATCH_SIZE
        assert (records[arch_str]["epsilon"] is not None) == defined


@pytest.mark.parametrize(
    ("torch_value", "onnxeps_value", "expected"),
    [
        (0.5, 0.5, "relative difference 0.0e+00"),
        (0.51, 0.5, "relative difference 2.0e-02"),
        (0.0, 0.0, "relative difference 0.0e+00"),
        (0.1, 0.0, "relative difference inf"),
        (None, None, "both undefined"),
        (0.5, None, "only PyTorch defined"),
        (None, 0.5, "only onnxeps defined"),
    ],
)
def test_comparison_describe(torch_eager, torch_value, onnxeps_value, expected):
    comparison = torch_eager.Comparison(torch_value, onnxeps_value)
    assert comparison.describe() == expected
    one_side = (torch_value is None) != (onnxeps_value is None)
    assert comparison.definedness_differs == one_side


def test_summary_table_uses_slower_run(torch_eager):
    table = torch_eager.summary_table(10, 100.0, (2.0, 4.0))
    assert table[-1] == "| 10 | 100.0 | 10.00 | 2.0, 4.0 | 0.400 | 25.0× |"


def test_repeat_line_names_differing_cell(torch_eager):
    records = {"a": {"epsilon": 0.5}, "b": {"epsilon": None}}
    same = {"a": {"epsilon": 0.5}, "b": {"epsilon": None}}
    changed = {"a": {"epsilon": 0.5}, "b": {"epsilon": 0.1}}
    assert "same epsilon for every cell" in torch_eager.repeat_line(records, same)
    assert "for 1 of 2 cells, e.g. b" in torch_eager.repeat_line(records, changed)
