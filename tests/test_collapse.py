"""Tests of the channel collapse: the narrow graph scores like the full graph.

The collapsed and full evaluations are compared through ``onnxeps.score`` on real
CIFAR-10 images, on 200+ NAS-Bench-201 and 50+ NAS-Bench-101 cells. The NAS-Bench-101
graphs are also evaluated in float64 by a small torch interpreter, which separates the
rewrite's exactness from float32 rounding.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxeps
from onnxeps.bench import nb201_parameter_free_path
from onnxeps.cli import main
from onnxeps.converters import nb101, nb201
from onnxeps.metric import EpsilonResult
from onnxeps.passes.base import run_passes
from onnxeps.passes.batchnorm import BatchNormToBatchStatistics
from onnxeps.passes.collapse import CollapseChannels
from onnxeps.passes.constants import ApplyConstants, fill_weights
from onnxeps.passes.dropout import RemoveDropout
from onnxeps.passes.graph_inputs import DetachInitializerInputs
from onnxeps.passes.output import ExposeOutput, PruneUnused
from onnxeps.plan import build_plan
from onnxeps.presets import CIFAR_MEAN, CIFAR_STD
from onnxeps.score import ScoreResult

BATCH = 8
NB201_SAMPLE = 200
NB201_SEED = 2024
NB101_SAMPLE = 50
NB101_SEED = 101
# Relative tolerance for exact rewrites of the same graph.
RTOL = 1e-5
# Absolute floor. The float32 full graph's epsilon is up to 1.0e-6 off its float64
# value on the NB201 sample (the narrow graph's up to 2.3e-7), more than 1e-5 relative
# for cells whose epsilon is below 0.1. Measured on 8 CIFAR-10 images, onnxruntime 1.32
# CPU.
ATOL = 1e-6
# Absolute floor against float64 for NB101 cells. Those whose exact epsilon is 0 score
# up to 1.6e-6 through the narrow graph and up to 2.7e-5 through the full float32
# graph, measured as above.
NB101_ATOL = 2e-6
# The float64 evaluations of both graphs differ only in summation order.
FLOAT64_RTOL = 1e-9
# Absolute floor of the float64 comparison: an epsilon that is 0 in exact arithmetic
# comes out as float64 rounding noise (measured up to 2e-14 on the NB101 sample).
FLOAT64_ATOL = 1e-12

ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
MIXED = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|"
    "+|skip_connect~0|nor_conv_1x1~1|none~2|"
)


# A pruned NB101 cell whose full float32 graph misses the exact epsilon by 4.5e-4
# relative (batch of 8 CIFAR-10 images, onnxruntime 1.32 CPU), while the collapsed
# float32 graph is within 8.6e-7 relative of the float64 value.
NB101_CELL = (
    [[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1],
     [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]],
    ["input", "maxpool3x3", "conv3x3-bn-relu", "conv1x1-bn-relu", "conv1x1-bn-relu",
     "output"],
)  # fmt: skip


def uniform_cell(op: str) -> str:
    return f"|{op}~0|+|{op}~0|{op}~1|+|{op}~0|{op}~1|{op}~2|"


NAMED_NB201 = [
    ALL_NONE,
    uniform_cell("skip_connect"),
    uniform_cell("nor_conv_3x3"),
    uniform_cell("avg_pool_3x3"),
]


def close(a: float, b: float, floor: float = ATOL) -> bool:
    return abs(a - b) <= RTOL * abs(b) + floor


@pytest.fixture(scope="module")
def images(data_dir) -> dict[str, np.ndarray]:
    with np.load(data_dir / "inputs" / "cifar10_256.npz") as archive:
        return {"input": archive["x"][:BATCH]}


@contextmanager
def recording_collapse() -> Iterator[list[bool]]:
    """Record whether each CollapseChannels run narrowed its model, in call order."""
    results: list[bool] = []
    original = CollapseChannels.__call__

    def record(self: CollapseChannels, model: onnx.ModelProto) -> bool:
        changed = original(self, model)
        results.append(changed)
        return changed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CollapseChannels, "__call__", record)
        yield results


@dataclass(frozen=True)
class ScoreSummary:
    """The fields of a ScoreResult that the comparisons read."""

    epsilon: float | None
    weights: tuple[float, float]

    @property
    def defined(self) -> bool:
        return self.epsilon is not None


def summarise(result: ScoreResult) -> ScoreSummary:
    # A ScoreResult can reference the model's nodes (through its plan), which keeps the
    # whole model in memory, so the fixtures keep only these fields.
    return ScoreSummary(result.epsilon, tuple(result.weights))


@dataclass
class ScorePair:
    """Scores of one model with and without the collapse."""

    collapsed: ScoreSummary
    full: ScoreSummary
    # Whether the collapsed score evaluated the narrow graph (not a fallback).
    narrowed: bool


def score_both(model: onnx.ModelProto, images, preset: str) -> ScorePair:
    with recording_collapse() as runs:
        collapsed = onnxeps.score(model, images, preset=preset)
    full = onnxeps.score(model, images, preset=preset, collapse=False)
    return ScorePair(summarise(collapsed), summarise(full), runs == [True])


# ----- NAS-Bench-201 -----


@pytest.fixture(scope="module")
def nb201_cells(data_dir) -> list[str]:
    with open(data_dir / "nb201" / "nb201_accuracy.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    rng = np.random.default_rng(NB201_SEED)
    picks = rng.choice(len(rows), NB201_SAMPLE, replace=False)
    chosen = [rows[i]["arch_str"] for i in picks]
    return NAMED_NB201 + [arch for arch in chosen if arch not in NAMED_NB201]


@pytest.fixture(scope="module")
def nb201_scores(nb201_cells, images) -> dict[str, ScorePair]:
    return {
        arch: score_both(nb201.build(arch), images, "nb201") for arch in nb201_cells
    }


def test_nb201_sample_size(nb201_cells, nb201_scores):
    assert len(nb201_cells) >= NB201_SAMPLE
    defined = [arch for arch, pair in nb201_scores.items() if pair.full.defined]
    # Both kinds must be present, or the comparisons below test nothing.
    assert 0 < len(defined) < len(nb201_cells)


def test_nb201_all_narrowed(nb201_scores):
    for arch, pair in nb201_scores.items():
        assert pair.narrowed, arch


def test_nb201_same_nan_set(nb201_scores):
    for arch, pair in nb201_scores.items():
        assert pair.collapsed.defined == pair.full.defined, arch


def test_nb201_values_equal(nb201_scores):
    for arch, pair in nb201_scores.items():
        if pair.collapsed.defined and pair.full.defined:
            a, b = pair.collapsed.epsilon, pair.full.epsilon
            assert close(a, b), f"{arch}: collapsed {a!r}, full {b!r}"


def test_nb201_nan_set_structural(nb201_scores):
    # At (1e-7, 1) a cell is undefined exactly when no skip/avg-pool path links the
    # cell input to its output: every other path underflows to a constant.
    for arch, pair in nb201_scores.items():
        expected = nb201_parameter_free_path(arch)
        assert pair.collapsed.defined == expected, f"collapsed {arch}"
        assert pair.full.defined == expected, f"full {arch}"


def test_nb201_weights_are_preset(nb201_scores):
    pair = next(iter(nb201_scores.values()))
    assert pair.collapsed.weights == (1e-7, 1.0)
    assert pair.full.weights == (1e-7, 1.0)


def test_nb201_ten_classes_equal(images):
    # With 10 classes the restoring Gather repeats one narrow logit to 10 columns.
    pair = score_both(nb201.build(MIXED, num_classes=10), images, "nb201")
    assert pair.narrowed
    assert pair.collapsed.defined
    assert close(pair.collapsed.epsilon, pair.full.epsilon)


def test_parameter_free_path_rule():
    assert nb201_parameter_free_path(uniform_cell("skip_connect"))
    assert nb201_parameter_free_path(uniform_cell("avg_pool_3x3"))
    assert not nb201_parameter_free_path(ALL_NONE)
    assert not nb201_parameter_free_path(uniform_cell("nor_conv_3x3"))
    # 0 -> 1 by pooling, then 1 -> 3 by skip: a path through node 1.
    assert nb201_parameter_free_path(
        "|avg_pool_3x3~0|+|none~0|none~1|+|none~0|skip_connect~1|none~2|"
    )
    # 0 -> 1 by skip, but node 1 reaches node 3 only through a convolution.
    assert not nb201_parameter_free_path(
        "|skip_connect~0|+|none~0|none~1|+|nor_conv_3x3~0|nor_conv_1x1~1|none~2|"
    )


def test_score_runs_collapse(images):
    model = nb201.build(MIXED)
    with recording_collapse() as runs:
        onnxeps.score(model, images, preset="nb201")
    assert runs == [True]
    with recording_collapse() as runs:
        onnxeps.score(model, images, preset="nb201", collapse=False)
    assert runs == []


# ----- float64 evaluation of both graphs -----


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind == "f":
        return torch.from_numpy(array.astype(np.float64))
    return torch.from_numpy(np.array(array, dtype=np.int64))


def _window(a: dict) -> dict:
    """Return torch's stride and padding for an ONNX Conv or pooling node."""
    pads = a.get("pads", [0, 0, 0, 0])
    assert pads[0] == pads[2], f"asymmetric pads {pads}"
    assert pads[1] == pads[3], f"asymmetric pads {pads}"
    assert not a.get("ceil_mode", 0)
    return {"stride": a.get("strides", [1, 1]), "padding": (pads[0], pads[1])}


def _optional(x: list, slot: int) -> torch.Tensor | None:
    return x[slot] if len(x) > slot else None


def _slice(a: dict, x: list) -> torch.Tensor:
    data, starts, ends = x[0], x[1].tolist(), x[2].tolist()
    axes, steps = _optional(x, 3), _optional(x, 4)
    axes = list(range(len(starts))) if axes is None else axes.tolist()
    steps = [1] * len(axes) if steps is None else steps.tolist()
    index = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = data.shape[axis]
        start, end = max(-size, min(start, size)), max(-size, min(end, size))
        index[axis] = slice(start, end, step)
    return data[tuple(index)]


def _conv(a: dict, x: list) -> torch.Tensor:
    bias = _optional(x, 2)
    return F.conv2d(x[0], x[1], bias, groups=a.get("group", 1), **_window(a))


def _batch_norm(a: dict, x: list) -> torch.Tensor:
    # The metric's batch statistics: mean and biased variance over all axes but axis 1,
    # whatever the node's training_mode. The running statistics x[3], x[4] are unused.
    epsilon = a.get("epsilon", 1e-5)
    return F.batch_norm(x[0], None, None, x[1], x[2], training=True, eps=epsilon)


def _average_pool(a: dict, x: list) -> torch.Tensor:
    include = bool(a.get("count_include_pad", 0))
    kernel = a["kernel_shape"]
    return F.avg_pool2d(x[0], kernel, count_include_pad=include, **_window(a))


def _gemm(a: dict, x: list) -> torch.Tensor:
    b = x[1].T if a.get("transB", 0) else x[1]
    y = a.get("alpha", 1.0) * (x[0] @ b)
    c = _optional(x, 2)
    if c is not None:
        y = y + a.get("beta", 1.0) * c
    return y


def _flatten(a: dict, x: list) -> torch.Tensor:
    axis = a.get("axis", 1)
    return x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)


# The operators of the NB101 graphs, narrow or full, before the BatchNorm rewrite.
FLOAT64_OPS = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Relu": lambda a, x: torch.relu(x[0]),
    "MaxPool": lambda a, x: F.max_pool2d(x[0], a["kernel_shape"], **_window(a)),
    "AveragePool": _average_pool,
    "GlobalAveragePool": lambda a, x: x[0].mean(dim=(2, 3), keepdim=True),
    "Add": lambda a, x: x[0] + x[1],
    "Mul": lambda a, x: x[0] * x[1],
    "Sum": lambda a, x: torch.stack(torch.broadcast_tensors(*x)).sum(dim=0),
    "Concat": lambda a, x: torch.cat(x, dim=a["axis"]),
    "Slice": _slice,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "Gather": lambda a, x: torch.index_select(x[0], a.get("axis", 0), x[1].reshape(-1)),
}


def _last_readers(graph: onnx.GraphProto) -> dict[str, int]:
    """Map each tensor name to the index of the last node that reads it."""
    last: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last[name] = index
    return last


def evaluate_float64(model: onnx.ModelProto, values: dict, output: str) -> np.ndarray:
    """Run the main graph on float64 torch tensors and return the named output.

    ``values`` maps every graph input and initializer to a tensor. Each intermediate
    tensor is dropped after its last reader, so only live tensors stay in memory.
    """
    values = dict(values)
    last_reader = _last_readers(model.graph)
    for index, node in enumerate(model.graph.node):
        if node.op_type not in FLOAT64_OPS:
            raise NotImplementedError(f"float64 evaluation of {node.op_type}")
        inputs = [values[name] if name else None for name in node.input]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        values[node.output[0]] = FLOAT64_OPS[node.op_type](attributes, inputs)
        for name in node.input:
            if last_reader[name] == index and name != output:
                values.pop(name, None)
    return values[output].numpy()


def prepared(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Copy the model and apply the passes that score() runs before the collapse."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    plan = build_plan(model)
    DetachInitializerInputs()(model)
    constants = ApplyConstants(plan, np.random.default_rng(0))
    run_passes(model, [constants, RemoveDropout()])
    return model, constants.weight_tensors


@dataclass
class Rewritten:
    """A model after score()'s rewrite, with the weights still placeholders."""

    model: onnx.ModelProto
    weights: list[str]
    # Narrow weight name -> array that the weight w multiplies (empty without collapse).
    multipliers: dict[str, np.ndarray]
    # Whether the collapse replaced the graph by its narrow equivalent.
    narrowed: bool

    @property
    def output(self) -> str:
        return self.model.graph.output[0].name


def rewritten(
    model: onnx.ModelProto,
    names: list[str],
    collapse: bool,
    rewrite_batchnorm: bool = True,
) -> Rewritten:
    """Copy a prepared model and apply the rest of score()'s rewrite passes.

    With ``rewrite_batchnorm`` False, BatchNormalization stays in the graph.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    output = copy.graph.output[0].name
    collapser = CollapseChannels(names, output)
    passes = [collapser] if collapse else []
    if rewrite_batchnorm:
        passes.append(BatchNormToBatchStatistics())
    passes += [ExposeOutput(output), PruneUnused()]
    changed = run_passes(copy, passes)
    # The collapse replaces the weight placeholders by narrow ones.
    narrowed = collapser.name in changed
    return Rewritten(copy, collapser.weights, collapser.multipliers, narrowed)


def float64_values(rewrite: Rewritten, weight: float, feeds: dict) -> dict:
    """Return the feeds and initializers as float64 tensors, the weights set to w.

    The weights are made in float64 directly, without the float32 rounding of
    :func:`fill_weights`.
    """
    placeholders = set(rewrite.weights)
    values = {name: _tensor(np.asarray(array)) for name, array in feeds.items()}
    for tensor in rewrite.model.graph.initializer:
        name = tensor.name
        if name in rewrite.multipliers:
            values[name] = torch.from_numpy(weight * rewrite.multipliers[name])
        elif name in placeholders:
            values[name] = torch.full(tuple(tensor.dims), weight, dtype=torch.float64)
        else:
            values[name] = _tensor(numpy_helper.to_array(tensor))
    return values


def float64_epsilon(rewrite: Rewritten, feeds: dict, weights) -> EpsilonResult:
    runs = []
    for weight in weights:
        values = float64_values(rewrite, weight, feeds)
        runs.append(evaluate_float64(rewrite.model, values, rewrite.output))
    return onnxeps.epsilon(runs[0], runs[1])


def normalised(images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scale and normalise uint8 NHWC images as the CIFAR presets do."""
    x = images["input"].transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    mean = np.asarray(CIFAR_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR_STD).reshape(1, 3, 1, 1)
    return {"input": ((x - mean) / std).astype(np.float32)}


# ----- NAS-Bench-101 -----


@pytest.fixture(scope="module")
def nb101_cells(data_dir) -> list[tuple[list, list]]:
    with open(data_dir / "nb101" / "nb101_subset500.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    unique = sorted({(row["pruned_matrix"], row["pruned_ops"]) for row in rows})
    rng = np.random.default_rng(NB101_SEED)
    chosen = [unique[i] for i in rng.choice(len(unique), NB101_SAMPLE, replace=False)]
    sampled = [(json.loads(matrix), json.loads(ops)) for matrix, ops in chosen]
    return [NB101_CELL] + [cell for cell in sampled if cell != NB101_CELL]


@dataclass
class Nb101Evidence:
    """One NB101 cell scored in float32 both ways, and both graphs in float64."""

    scores: ScorePair
    narrow_float64: EpsilonResult
    full_float64: EpsilonResult
    # Whether the graph evaluated as narrow_float64 was narrowed (not a fallback).
    narrowed_float64: bool


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block, then restore it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def nb101_evidence(cell: tuple[list, list], images, feeds) -> Nb101Evidence:
    model = nb101.build(*cell)
    scores = score_both(model, images, "nb101")
    base, names = prepared(model)
    # The interpreter applies the batch statistics itself, so the float64 values do not
    # depend on the BatchNorm rewrite.
    narrow = rewritten(base, names, collapse=True, rewrite_batchnorm=False)
    narrow_float64 = float64_epsilon(narrow, feeds, scores.collapsed.weights)
    full = rewritten(base, names, collapse=False, rewrite_batchnorm=False)
    full_float64 = float64_epsilon(full, feeds, scores.collapsed.weights)
    return Nb101Evidence(scores, narrow_float64, full_float64, narrow.narrowed)


@pytest.fixture(scope="module")
def nb101_results(nb101_cells, images) -> list[Nb101Evidence]:
    feeds = normalised(images)
    # One intra-op thread: with torch's default threads the narrow graphs took ~20x
    # longer and the whole fixture about twice the CPU time on a loaded 2-core machine.
    with torch_threads(1):
        return [nb101_evidence(cell, images, feeds) for cell in nb101_cells]


def test_nb101_sample_size(nb101_cells, nb101_results):
    assert len(nb101_results) >= NB101_SAMPLE
    defined = [result for result in nb101_results if result.scores.full.defined]
    # Both kinds must be present, or the comparisons below test nothing.
    assert 0 < len(defined) < len(nb101_cells)


def test_nb101_all_narrowed(nb101_cells, nb101_results):
    for cell, result in zip(nb101_cells, nb101_results):
        assert result.scores.narrowed, cell
        assert result.narrowed_float64, cell


def test_nb101_same_nan_set(nb101_cells, nb101_results):
    # Each precision has its own NaN set: at w1 = 1e-4 the output of some cells
    # underflows to 0 in float32, so their epsilon is defined in float64 only.
    for cell, result in zip(nb101_cells, nb101_results):
        assert result.scores.collapsed.defined == result.scores.full.defined, cell
        assert result.narrow_float64.defined == result.full_float64.defined, cell


def test_nb101_float64_graphs_equal(nb101_cells, nb101_results):
    # In float64 the rewrite is exact up to summation order.
    for cell, result in zip(nb101_cells, nb101_results):
        if result.full_float64.defined:
            narrow, full = result.narrow_float64.value, result.full_float64.value
            expected = pytest.approx(full, rel=FLOAT64_RTOL, abs=FLOAT64_ATOL)
            assert narrow == expected, cell


def test_nb101_values_equal(nb101_cells, nb101_results):
    # The reference is the float64 value of the full graph, not the float32 full score.
    # In float32 the full graph's rounding moves epsilon by up to 4.5e-4 relative on
    # these cells, beyond the 1e-5 exact-rewrite tolerance. The collapsed score stays
    # within 7.9e-6 relative of float64.
    for cell, result in zip(nb101_cells, nb101_results):
        if not result.scores.collapsed.defined:
            continue
        assert result.full_float64.defined, cell
        a, b = result.scores.collapsed.epsilon, result.full_float64.value
        assert close(a, b, NB101_ATOL), f"{cell}: collapsed {a!r}, full float64 {b!r}"


# ----- the narrow model -----


@pytest.mark.parametrize(
    "build",
    [lambda: nb201.build(MIXED), lambda: nb101.build(*NB101_CELL)],
    ids=["nb201", "nb101"],
)
def test_narrow_model_checks(build):
    narrow = rewritten(*prepared(build()), collapse=True)
    onnx.checker.check_model(narrow.model, full_check=True)
    filled = fill_weights(narrow.model, narrow.weights, 1.0, narrow.multipliers)
    onnx.checker.check_model(filled, full_check=True)


def conv_weight(model: onnx.ModelProto, prefix: str) -> str:
    """Return the weight input of the one Conv named under prefix."""
    found = [
        node.input[1]
        for node in model.graph.node
        if node.op_type == "Conv" and node.name.startswith(f"{prefix}/")
    ]
    assert len(found) == 1, (prefix, found)
    return found[0]


def test_narrow_nb201_one_channel():
    narrow = rewritten(*prepared(nb201.build(MIXED)), collapse=True)
    initializers = {t.name: t for t in narrow.model.graph.initializer}
    convs = [node for node in narrow.model.graph.node if node.op_type == "Conv"]
    assert convs
    for node in convs:
        weight = initializers[node.input[1]]
        assert weight.dims[0] == 1, node.name
        # Only the stem reads the three image channels, and every other conv reads one.
        assert weight.dims[1] in (1, 3), node.name
        assert node.input[1] in narrow.weights, node.name
    assert conv_weight(narrow.model, "stem") in narrow.multipliers


def test_narrow_multiplier_is_channel_count():
    # A 16 -> 16 conv collapses to 1 -> 1 with weight w * 16, a 64 -> 64 one to w * 64.
    narrow = rewritten(*prepared(nb201.build(uniform_cell("nor_conv_1x1"))), True)
    first = narrow.multipliers[conv_weight(narrow.model, "cells.0.edge_0_1")]
    last = narrow.multipliers[conv_weight(narrow.model, "cells.16.edge_0_1")]
    assert first.shape == (1, 1, 1, 1)
    assert np.all(first == 16.0)
    assert np.all(last == 64.0)


def test_narrow_3x3_conv_is_window_mean():
    # A 16 -> 16 3x3 conv collapses to the 3x3 window mean times w * 16 * 9.
    narrow = rewritten(*prepared(nb201.build(uniform_cell("nor_conv_3x3"))), True)
    edge = [n for n in narrow.model.graph.node if n.name.startswith("cells.0.edge_0_1/")]
    assert "Conv" not in {n.op_type for n in edge}
    (pool,) = [n for n in edge if n.op_type == "AveragePool"]
    (scale,) = [n for n in edge if n.op_type == "Mul" and n.input[0] == pool.output[0]]
    assert {a.name: helper.get_attribute_value(a) for a in pool.attribute} == {
        "kernel_shape": [3, 3], "count_include_pad": 1, "pads": [1, 1, 1, 1],
        "strides": [1, 1],
    }  # fmt: skip
    multiplier = narrow.multipliers[scale.input[1]]
    assert multiplier.shape == (1, 1, 1, 1)
    assert np.all(multiplier == 16.0 * 9)


def test_narrow_parallel_convolutions_merged():
    # Edges 0->1, 0->2 and 0->3 of a cell convolve the same tensor, so once narrow
    # they are one branch, and no two nodes of the graph compute the same thing.
    narrow = rewritten(*prepared(nb201.build(uniform_cell("nor_conv_3x3"))), True)
    nodes = narrow.model.graph.node
    keys = [
        (n.op_type, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute))
        for n in nodes
    ]
    assert len(keys) == len(set(keys))
    pools = [
        n for n in nodes if n.op_type == "AveragePool" and n.name.startswith("cells.0.edge_0_")
    ]
    assert len(pools) == 1


def conv_bn_model(kernel, data_type=TensorProto.FLOAT, **conv) -> onnx.ModelProto:
    """Conv (3 -> 4 channels, weights 1) -> BatchNormalization -> Tanh on 9x9 images."""
    dtype = helper.tensor_dtype_to_np_dtype(data_type)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], **conv),
        helper.make_node("BatchNormalization", ["conv", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Tanh", ["bn"], ["y"]),
    ]
    ones, zeros = np.ones(4, dtype), np.zeros(4, dtype)
    initializers = [
        numpy_helper.from_array(np.ones((4, 3, *kernel), dtype), "w"),
        *(numpy_helper.from_array(v, n) for n, v in zip("sbmv", (ones, zeros, zeros, ones))),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn", [helper.make_tensor_value_info("x", data_type, [8, 3, 9, 9])],
        [helper.make_tensor_value_info("y", data_type, None)], initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("kernel", "conv"),
    [
        ((3, 3), {"pads": [1, 1, 1, 1]}),
        ((3, 3), {"pads": [3, 3, 3, 3]}),
        ((1, 3), {"pads": [1, 1, 1, 1]}),
        ((2, 2), {"auto_pad": "SAME_UPPER", "strides": [3, 3]}),
        ((3, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ],
    ids=["pads-1", "pads-as-large-as-kernel", "pads-on-size-1-axis", "same-stride-3",
         "same-lower-stride-2"],
)  # fmt: skip
def test_uniform_conv_padding_scores_equal(kernel, conv):
    # ONNX Runtime's AveragePool rejects some paddings that Conv accepts, so those
    # convolutions keep the dense narrow rule.
    model = conv_bn_model(kernel, **conv)
    settings = {"synthetic": "normal", "batch_size": BATCH}
    collapsed = onnxeps.score(model, **settings)
    full = onnxeps.score(model, **settings, collapse=False)
    assert close(collapsed.epsilon, full.epsilon)


def test_uniform_conv_float16_keeps_dense_weights():
    # In float16, w * m * 9 overflows for m >= 7282 where w * m does not, so float16
    # convolutions never become window means.
    narrow = rewritten(*prepared(conv_bn_model((3, 3), TensorProto.FLOAT16, pads=[1] * 4)), True)
    assert narrow.narrowed
    assert "AveragePool" not in {node.op_type for node in narrow.model.graph.node}


# ----- fallback on uncovered models -----


def inline_model(nodes, channels: int, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "inline",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def weight(name: str, shape) -> onnx.TensorProto:
    values = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return numpy_helper.from_array(values, name)


def softmax_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Softmax", ["conv"], ["y"], axis=1),
    ]
    return inline_model(nodes, 3, [weight("w", (4, 3, 3, 3))])


def grouped_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=2)]
    return inline_model(nodes, 4, [weight("w", (4, 2, 3, 3))])


def subgraph_model() -> onnx.ModelProto:
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["conv"], [f"{name}_y"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
        )

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "If", ["cond"], ["y"], then_branch=branch("then", "Relu"),
            else_branch=branch("else", "Identity"),
        ),
    ]  # fmt: skip
    cond = numpy_helper.from_array(np.array(True), "cond")
    return inline_model(nodes, 3, [weight("w", (4, 3, 3, 3)), cond])


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (softmax_model, "operator Softmax is not covered"),
        (grouped_model, "grouped convolution (group 2)"),
        (subgraph_model, "control-flow subgraphs"),
    ],
    ids=["softmax", "grouped", "subgraph"],
)
def test_fallback_uncovered(build, reason):
    model, names = prepared(build())
    before = model.SerializeToString()
    collapser = CollapseChannels(names, "y")
    assert collapser(model) is False
    assert reason in collapser.reason
    assert model.SerializeToString() == before
    assert collapser.multipliers == {}


def test_fallback_score_unchanged():
    # When the pass falls back, both settings evaluate the same full graph.
    model = softmax_model()
    settings = {"synthetic": "normal", "batch_size": BATCH, "weights": (0.1, 1.0)}
    collapsed = onnxeps.score(model, **settings)
    full = onnxeps.score(model, **settings, collapse=False)
    assert collapsed.epsilon == full.epsilon
    assert collapsed.reason == full.reason


# ----- command line -----


def test_cli_no_collapse(tmp_path):
    path = tmp_path / "mixed.onnx"
    nb201.convert(MIXED, path)
    common = ["score", str(path), "--preset", "nb201", "--synthetic", "grey",
              "--batch-size", str(BATCH), "--format", "json"]  # fmt: skip
    runner = CliRunner()
    collapsed = runner.invoke(main, common)
    full = runner.invoke(main, [*common, "--no-collapse"])
    assert collapsed.exit_code == 0, collapsed.output
    assert full.exit_code == 0, full.output
    a = json.loads(collapsed.stdout)["epsilon"]
    b = json.loads(full.stdout)["epsilon"]
    assert a is not None
    assert close(a, b)
