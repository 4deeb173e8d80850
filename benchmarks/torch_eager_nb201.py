"""Time onnxeps against a PyTorch eager epsilon implementation on NAS-Bench-201 cells.

Both sides score the same randomly drawn cells with weights (1e-7, 1) on the same batch
of real CIFAR-10 images. The PyTorch side builds each cell's network as an
``nn.Module``. For each w it sets every convolution and linear weight and BatchNorm
scale to w and every bias and BatchNorm shift to 0. It then runs the network under
``torch.no_grad()`` in float32, with BatchNorm in training mode (batch statistics).
Its time per cell covers building the module, setting the constants and both
forward passes, with torch's default thread count. The onnxeps side is one
``onnxeps bench nb201`` subprocess on the same cells, timed by wall clock, so
interpreter start-up and imports are included. It runs once before and once after the
PyTorch side, and the ratio uses the slower of the two runs, so that a load that
changes during the benchmark does not favour onnxeps.

The script prints the speed ratio (PyTorch time / onnxeps time), the agreement of the
two epsilons per cell, and the machine. Tables go to stdout, progress to stderr.

Usage: python benchmarks/torch_eager_nb201.py [--cells N] [--seed S] [--data DIR]
       [--batch-size N] [--jobs N]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from onnxeps.converters import nb201
from onnxeps.metric import EpsilonResult, epsilon

logger = logging.getLogger("torch_eager_nb201")

WEIGHTS = (1e-7, 1.0)
# Cross-framework tolerance of onnxeps: equal epsilons differ by at most this, relative.
PARITY_TOLERANCE = 1e-4
# CIFAR-10 per-channel (RGB) statistics in [0, 1] units, as the reference loaders used.
CIFAR_MEAN = np.array([125.3, 123.0, 113.9], dtype=np.float32) / 255
CIFAR_STD = np.array([63.0, 62.1, 66.7], dtype=np.float32) / 255
STAGE_CHANNELS = (16, 32, 64)
CELLS_PER_STAGE = 5
TRUTH_FILE = Path("nb201") / "nb201_accuracy.csv"
INPUT_FILE = Path("inputs") / "cifar10_256.npz"


class ReLUConvBN(nn.Sequential):
    """ReLU, bias-free square convolution with "same" padding, and BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(
                in_channels, out_channels, kernel, stride, kernel // 2, bias=False
            ),
            nn.BatchNorm2d(out_channels),
        )


class Zero(nn.Module):
    """The ``none`` edge: the input times 0, so NaN and inf still propagate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


# Constructor of each cell edge op's module, given the channel count of the cell.
EDGE_OPS = {
    "none": lambda channels: Zero(),
    "skip_connect": lambda channels: nn.Identity(),
    "nor_conv_1x1": lambda channels: ReLUConvBN(channels, channels, 1, 1),
    "nor_conv_3x3": lambda channels: ReLUConvBN(channels, channels, 3, 1),
    "avg_pool_3x3": lambda channels: nn.AvgPool2d(3, 1, 1, count_include_pad=False),
}


class Cell(nn.Module):
    """One cell: node j sums its edges from nodes 0..j-1, and node 3 is the output."""

    def __init__(self, cell: nb201.Cell, channels: int):
        super().__init__()
        self.nodes = nn.ModuleList(
            nn.ModuleList(EDGE_OPS[op](channels) for op, _ in edges) for edges in cell
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for edges in self.nodes:
            terms = [edge(values[source]) for source, edge in enumerate(edges)]
            values.append(sum(terms))
        return values[-1]


class ResidualReduction(nn.Module):
    """Residual block between stages: halves the resolution and widens the channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv_a = ReLUConvBN(in_channels, out_channels, 3, 2)
        self.conv_b = ReLUConvBN(out_channels, out_channels, 3, 1)
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(2, 2), nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class NB201Network(nn.Module):
    """The NAS-Bench-201 network of one cell with a 1-unit classifier."""

    def __init__(self, arch_str: str):
        super().__init__()
        cell = nb201.parse_arch(arch_str)
        first = STAGE_CHANNELS[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, first, 3, padding=1, bias=False), nn.BatchNorm2d(first)
        )
        blocks: list[nn.Module] = []
        for stage, channels in enumerate(STAGE_CHANNELS):
            if stage > 0:
                blocks.append(ResidualReduction(STAGE_CHANNELS[stage - 1], channels))
            blocks += [Cell(cell, channels) for _ in range(CELLS_PER_STAGE)]
        self.cells = nn.Sequential(*blocks)
        last = STAGE_CHANNELS[-1]
        self.head = nn.Sequential(
            nn.BatchNorm2d(last), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classifier = nn.Linear(last, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.cells(self.stem(x))))


def set_constant_weights(network: nn.Module, weight: float) -> None:
    """Set every weight and BatchNorm scale to ``weight``, every bias and shift to 0."""
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            nn.init.constant_(module.weight, weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def torch_epsilon(arch_str: str, batch: torch.Tensor) -> EpsilonResult:
    """Build the network of ``arch_str`` and compute epsilon from its two runs."""
    network = NB201Network(arch_str)
    # Training mode makes BatchNorm normalise with the batch's statistics. The running
    # statistics it updates are never read in this mode.
    network.train()
    outputs = []
    with torch.no_grad():
        for weight in WEIGHTS:
            set_constant_weights(network, weight)
            outputs.append(network(batch).numpy())
    return epsilon(*outputs)


def load_batch(path: Path, batch_size: int) -> torch.Tensor:
    """Read the first ``batch_size`` uint8 NHWC images, normalised, as float32 NCHW."""
    if not path.is_file():
        sys.exit(f"error: input {path} not found; pass --data or set ONNXEPS_DATA")
    with np.load(path) as arrays:
        images = arrays["x"][:batch_size]
    if len(images) < batch_size:
        sys.exit(
            f"error: {path} has {len(images)} images, fewer than --batch-size "
            f"{batch_size}; pass a smaller --batch-size"
        )
    scaled = images.astype(np.float32) / 255
    normalised = (scaled - CIFAR_MEAN) / CIFAR_STD
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 3, 1, 2)))


def time_torch(
    arch_strs: list[str], batch: torch.Tensor
) -> list[tuple[float, EpsilonResult]]:
    """Score each cell in PyTorch and return (seconds, epsilon) per cell."""
    results = []
    for number, arch_str in enumerate(arch_strs, start=1):
        started = time.perf_counter()
        result = torch_epsilon(arch_str, batch)
        seconds = time.perf_counter() - started
        logger.info(
            "PyTorch cell %d/%d: %.2f s, epsilon %s",
            number, len(arch_strs), seconds, result.value,
        )  # fmt: skip
        results.append((seconds, result))
    return results


def onnxeps_command() -> list[str]:
    """Return the command that starts the onnxeps CLI of this Python environment."""
    script = Path(sys.executable).with_name("onnxeps")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from onnxeps.cli import main; main()"]


def optional_bench_options(jobs: int) -> list[str]:
    """Return ``--no-cache`` and ``--jobs N`` where ``onnxeps bench --help`` lists them.

    Without ``--no-cache`` a result cache could return scores from an earlier run, and
    the timing would measure a lookup instead of scoring.
    """
    done = subprocess.run(
        [*onnxeps_command(), "bench", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(
            f"error: onnxeps bench --help failed with exit code {done.returncode}; "
            "install onnxeps in this Python environment (pip install -e .)"
        )
    help_text = done.stdout
    options = []
    if "--no-cache" in help_text:
        options.append("--no-cache")
    if "--jobs" in help_text:
        options += ["--jobs", str(jobs)]
    return options


def write_truth(rows: list[dict[str, str]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_records(path: Path, rows: list[dict[str, str]]) -> dict[str, dict]:
    """Read the bench records keyed by arch string and check that every cell has one."""
    with open(path, encoding="utf-8") as stream:
        records = [json.loads(line) for line in stream if line.strip()]
    by_arch = {record["model"].split(":", 1)[1]: record for record in records}
    missing = [row["arch_str"] for row in rows if row["arch_str"] not in by_arch]
    if missing:
        sys.exit(
            f"error: onnxeps bench wrote no record for {len(missing)} cells, "
            f"e.g. {missing[0]}; rerun it without -q to see why"
        )
    return by_arch


def run_onnxeps(
    rows: list[dict[str, str]], input_file: Path, batch_size: int, options: list[str]
) -> tuple[float, dict[str, dict]]:
    """Run ``onnxeps bench nb201`` on ``rows`` and return (wall seconds, records)."""
    with tempfile.TemporaryDirectory(prefix="onnxeps-torch-bench-") as folder:
        truth = Path(folder) / "truth.csv"
        records_file = Path(folder) / "records.jsonl"
        write_truth(rows, truth)
        command = [
            *onnxeps_command(), "bench", "nb201", "--truth", str(truth),
            "--sample", "all", "--input", str(input_file),
            "--batch-size", str(batch_size), "--records", str(records_file), "-q",
            *options,
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            last_line = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            sys.exit(
                f"error: onnxeps bench failed with exit code {done.returncode}: "
                f"{last_line}"
            )
        return seconds, read_records(records_file, rows)


@dataclass(frozen=True)
class Comparison:
    """The PyTorch and onnxeps epsilon of one cell, each None when undefined."""

    torch_value: float | None
    onnxeps_value: float | None

    @property
    def definedness_differs(self) -> bool:
        return (self.torch_value is None) != (self.onnxeps_value is None)

    @property
    def relative_difference(self) -> float | None:
        """|PyTorch - onnxeps| / |onnxeps| when both are defined, else None.

        Two equal values differ by 0, even when both are 0.
        """
        if self.torch_value is None or self.onnxeps_value is None:
            return None
        difference = abs(self.torch_value - self.onnxeps_value)
        if difference == 0:
            return 0.0
        if self.onnxeps_value == 0:
            return math.inf
        return difference / abs(self.onnxeps_value)

    def describe(self) -> str:
        if self.relative_difference is not None:
            return f"relative difference {self.relative_difference:.1e}"
        if self.torch_value is None and self.onnxeps_value is None:
            return "both undefined"
        if self.onnxeps_value is None:
            return "only PyTorch defined"
        return "only onnxeps defined"


def compare(result: EpsilonResult, record: dict) -> Comparison:
    torch_value = result.value if result.defined else None
    return Comparison(torch_value, record["epsilon"])


def format_epsilon(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.6f}"


def machine_line(start_load: float) -> str:
    """Describe the CPUs, the load average at start and now, and the versions."""
    end_load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} CPUs ({platform.machine()}), 1-minute load average "
        f"{start_load:.2f} at start and {end_load:.2f} at end, "
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}"
    )


def summary_table(
    cells: int, torch_seconds: float, onnxeps_runs: tuple[float, float]
) -> list[str]:
    """Return the timing table; the ratio uses the slower onnxeps run."""
    slower = max(onnxeps_runs)
    before, after = onnxeps_runs
    return [
        "| cells | PyTorch eager total s | PyTorch s/cell | onnxeps total s (before, "
        "after PyTorch) | onnxeps s/cell (slower run) | ratio PyTorch / onnxeps |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {cells} | {torch_seconds:.1f} | {torch_seconds / cells:.2f} | "
        f"{before:.1f}, {after:.1f} | {slower / cells:.3f} | "
        f"{torch_seconds / slower:.1f}× |",
    ]


def repeat_line(records: dict[str, dict], repeat: dict[str, dict]) -> str:
    """Return a line reporting whether both onnxeps runs gave the same epsilons."""
    differing = [
        arch for arch, record in records.items()
        if record["epsilon"] != repeat[arch]["epsilon"]
    ]  # fmt: skip
    if not differing:
        return "The two onnxeps runs gave the same epsilon for every cell."
    return (
        f"The two onnxeps runs gave different epsilons for {len(differing)} of "
        f"{len(records)} cells, "
        f"e.g. {differing[0]}."
    )


def record_seconds_line(torch_seconds: float, records: dict[str, dict]) -> str:
    """Compare PyTorch with the per-model seconds that onnxeps records.

    A record's seconds cover loading the batch, planning, rewriting and both runs of
    one model. Start-up, ONNX conversion and bench's cost columns are not included.
    """
    record_seconds = sum(record["seconds"] for record in records.values())
    return (
        f"onnxeps record seconds summed over the cells: {record_seconds:.1f} s "
        f"(start-up, ONNX conversion and cost columns excluded), "
        f"ratio PyTorch / that {torch_seconds / record_seconds:.1f}×."
    )


def agreement_line(comparisons: list[Comparison]) -> str:
    differences = [
        c.relative_difference for c in comparisons if c.relative_difference is not None
    ]
    within = sum(difference <= PARITY_TOLERANCE for difference in differences)
    both_undefined = sum(
        c.torch_value is None and c.onnxeps_value is None for c in comparisons
    )
    largest = f"{max(differences):.1e}" if differences else "-"
    one_side = sum(c.definedness_differs for c in comparisons)
    return (
        f"Agreement: defined on both sides {len(differences)} (max relative "
        f"difference {largest}, within {PARITY_TOLERANCE:g} {within}), "
        f"undefined on both sides {both_undefined}, "
        f"defined on one side only {one_side}."
    )


def cell_table(rows, torch_results, records: dict[str, dict], comparisons) -> list[str]:
    """Return one Markdown row per cell, named by NB201 index and NASLib tuple.

    Arch strings contain ``|``, which would split a Markdown table cell.
    """
    lines = [
        "| NB201 index | NASLib tuple | PyTorch s | onnxeps record s | "
        "PyTorch epsilon | onnxeps epsilon | agreement |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for row, (seconds, _), comparison in zip(rows, torch_results, comparisons):
        record = records[row["arch_str"]]
        lines.append(
            f"| {row['nb201_index']} | {row['naslib_tuple']} | {seconds:.2f} | "
            f"{record['seconds']:.2f} | {format_epsilon(comparison.torch_value)} | "
            f"{format_epsilon(comparison.onnxeps_value)} | {comparison.describe()} |"
        )
    return lines


def report_lines(
    rows, torch_results, onnxeps_runs, records, repeat, start_load, options
) -> list[str]:
    """Return the report: summary table, record seconds, agreement, machine, onnxeps
    options and the per-cell table."""
    torch_seconds = sum(seconds for seconds, _ in torch_results)
    comparisons = [
        compare(result, records[row["arch_str"]])
        for row, (_, result) in zip(rows, torch_results)
    ]
    passed = " ".join(options) or "none"
    return [
        *summary_table(len(rows), torch_seconds, onnxeps_runs),
        "",
        repeat_line(records, repeat),
        "",
        record_seconds_line(torch_seconds, records),
        "",
        agreement_line(comparisons),
        "",
        f"Machine: {machine_line(start_load)}.",
        "",
        f"Options passed to onnxeps bench besides the fixed ones: {passed}.",
        "",
        *cell_table(rows, torch_results, records, comparisons),
    ]


def default_data_dir() -> Path:
    configured = os.environ.get("ONNXEPS_DATA")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cells", type=positive_int, default=20,
        help="Number of cells drawn. [default: 20]",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the cell sample. [default: 0]"
    )
    parser.add_argument(
        "--data", type=Path, default=default_data_dir(),
        help="Reference data folder. [default: $ONNXEPS_DATA, else ../shared/data "
        "beside the repository]",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=positive_int, default=256,
        help="Images in the batch. [default: 256]",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=positive_int, default=os.cpu_count(),
        help="Processes for onnxeps bench, passed only when bench has --jobs. "
        "[default: CPU count]",
    )  # fmt: skip
    return parser.parse_args()


def sample_rows(truth: Path, cells: int, seed: int) -> list[dict[str, str]]:
    """Draw ``cells`` rows of the NB201 table uniformly without replacement."""
    if not truth.is_file():
        sys.exit(f"error: {truth} not found; pass --data or set ONNXEPS_DATA")
    with open(truth, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if cells > len(rows):
        sys.exit(f"error: --cells {cells} is more than the {len(rows)} rows of {truth}")
    chosen = np.random.default_rng(seed).choice(len(rows), size=cells, replace=False)
    return [rows[index] for index in chosen]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_arguments()
    rows = sample_rows(args.data / TRUTH_FILE, args.cells, args.seed)
    input_file = args.data / INPUT_FILE
    batch = load_batch(input_file, args.batch_size)
    start_load = os.getloadavg()[0]
    options = optional_bench_options(args.jobs)
    logger.info("onnxeps bench nb201 on %d cells", len(rows))
    before, records = run_onnxeps(rows, input_file, args.batch_size, options)
    logger.info("onnxeps bench: %.1f s", before)
    torch_results = time_torch([row["arch_str"] for row in rows], batch)
    logger.info("onnxeps bench nb201 on %d cells again", len(rows))
    after, repeat = run_onnxeps(rows, input_file, args.batch_size, options)
    logger.info("onnxeps bench: %.1f s", after)
    lines = report_lines(
        rows, torch_results, (before, after), records, repeat, start_load, options
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
