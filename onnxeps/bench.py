"""Benchmark epsilon against trained accuracy on a NAS-benchmark search space.

Reads the ground-truth table, samples architectures, converts each encoding to ONNX,
scores it with the space's preset, and reports rank statistics of epsilon and of two
baselines computed from the same graphs (#params and MACs per sample).
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import os
import platform
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxeps.cost import count_macs
from onnxeps.engine import Job, Task, make_task, run_jobs
from onnxeps.errors import InputError
from onnxeps.score import DEFAULT_SEQ_LEN
from onnxeps.stats import NAN_POLICIES, rank_statistics

__all__ = [
    "SPACES",
    "Candidate",
    "BenchResult",
    "build_encoded",
    "macs_per_sample",
    "read_candidates",
    "run_bench",
    "render_markdown",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One architecture: its label, its encoding and its ground-truth value."""

    label: str
    encoding: object
    truth: float


@dataclass(frozen=True)
class Space:
    """How to read, build and judge one search space."""

    name: str
    preset: str
    metric_column: str
    higher_is_better: bool
    read: Callable[[list[dict], str], list[Candidate]]
    build: Callable[[object, dict], onnx.ModelProto]


def _float(row: dict, column: str, line: int) -> float | None:
    """Return the row's finite value in the column, None when empty.

    ``line`` is the row's line number in the file, for messages.
    """
    text = (row.get(column) or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"line {line}, column {column!r}: {text!r} is not a number") from None
    if not np.isfinite(value):
        raise ValueError(f"line {line}, column {column!r}: {text!r} is not finite")
    return value


def _read_nb201(rows: list[dict], column: str) -> list[Candidate]:
    found = []
    for line, row in enumerate(rows, start=2):
        value = _float(row, column, line)
        if value is not None:
            found.append(Candidate(row["arch_str"], row["arch_str"], value))
    return found


def _read_nb101(rows: list[dict], column: str) -> list[Candidate]:
    """Aggregate records of the same pruned cell: mean of the metric."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for line, row in enumerate(rows, start=2):
        value = _float(row, column, line)
        if value is not None:
            key = (row["pruned_matrix"], row["pruned_ops"])
            groups[key].append(value)
    return [
        Candidate(
            json.dumps({"matrix": json.loads(m), "ops": json.loads(o)}),
            (json.loads(m), json.loads(o)),
            float(np.mean(values)),
        )
        for (m, o), values in groups.items()
    ]


def _read_nlp(rows: list[dict], column: str) -> list[Candidate]:
    found = []
    for line, row in enumerate(rows, start=2):
        value = _float(row, column, line)
        if value is not None:
            found.append(Candidate(f"recipe {row['recipe_id']}", row["recipe"], value))
    return found


def _build_nb201(encoding, options: dict) -> onnx.ModelProto:
    from onnxeps.converters import nb201

    return nb201.build(encoding, init_seed=None)


def _build_nb101(encoding, options: dict) -> onnx.ModelProto:
    from onnxeps.converters import nb101

    matrix, ops = encoding
    return nb101.build(matrix, ops, init_seed=None)


def _build_nlp(encoding, options: dict) -> onnx.ModelProto:
    """Unroll over --seq-len steps (default 70, as the benchmark's bptt)."""
    from onnxeps.converters import nlp

    return nlp.build(encoding, seq_len=options.get("seq_len") or DEFAULT_SEQ_LEN, init_seed=None)


SPACES: dict[str, Space] = {
    "nb201": Space("nb201", "nb201", "test_acc_c10", True, _read_nb201, _build_nb201),
    "nb101": Space("nb101", "nb101", "val_accuracy", True, _read_nb101, _build_nb101),
    "nlp": Space("nlp", "nlp", "ptb_test_loss", False, _read_nlp, _build_nlp),
}


def read_candidates(space: Space, truth: Path, column: str) -> list[Candidate]:
    """Read the ground-truth table (a UTF-8 CSV, byte-order mark allowed)."""
    try:
        with open(truth, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{truth}: cannot read the ground-truth table ({error}).") from error
    if rows and column not in rows[0]:
        raise InputError(
            f"{truth}: no column {column!r}; columns are {', '.join(rows[0])}.",
            f"Check that the table is a {space.name} ground-truth table, or pass "
            "--metric-column with one of its columns.",
        )
    try:
        candidates = space.read(rows, column)
    except (KeyError, ValueError) as error:
        raise InputError(
            f"{truth}: not a {space.name} ground-truth table ({type(error).__name__}: "
            f"{error})."
        ) from error
    if not candidates:
        raise InputError(
            f"{truth}: no row has a value in column {column!r}.",
            "Pass --metric-column with a column that has values.",
        )
    return candidates


@dataclass
class BenchResult:
    """Per-model records and the summary report."""

    records: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _sample(candidates: list[Candidate], size: int | None, seed: int) -> list[Candidate]:
    if size is None or size >= len(candidates):
        return candidates
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(candidates), size=size, replace=False))
    return [candidates[i] for i in chosen]


def build_encoded(space_name: str, encoding, options: dict) -> onnx.ModelProto:
    """Build the ONNX model of an encoding of a space; ``options`` as for scoring."""
    space = SPACES[space_name]
    try:
        return space.build(encoding, options)
    except ValueError as error:
        raise InputError(f"invalid {space.name} encoding: {error}.") from error


def macs_per_sample(model: onnx.ModelProto) -> int | None:
    """Return the multiply-accumulates of one sample: symbolic axes of the inputs count 1."""
    batch_one = {
        value.name: tuple(d.dim_value or 1 for d in value.type.tensor_type.shape.dim)
        for value in model.graph.input
    }
    macs, _ = count_macs(model, batch_one)
    return macs


def _bench_record(record: dict, candidate: Candidate) -> dict:
    """Put the ground truth between the score columns and the cost columns."""
    score_columns = {k: v for k, v in record.items() if k not in ("params", "macs")}
    costs = {"params": record["params"], "macs": record["macs"]}
    return score_columns | {"truth": candidate.truth} | costs


_PARAMETER_FREE_OPS = ("skip_connect", "avg_pool_3x3")


def nb201_parameter_free_path(arch_str: str) -> bool:
    """Return whether skip/avg-pool edges alone link an NB201 cell's input to its output.

    Epsilon at w1 = 1e-7 is undefined exactly for the cells without such a path: every
    other path passes a convolution, and the signal underflows to a constant.
    """
    from onnxeps.converters import nb201

    reached = {0}
    for target, edges in enumerate(nb201.parse_arch(arch_str), start=1):
        if any(op in _PARAMETER_FREE_OPS and source in reached for op, source in edges):
            reached.add(target)
    return 3 in reached


def _structural_nan_check(records: list[dict]) -> dict:
    """Compare the undefined NB201 scores with the parameter-free-path rule."""
    mismatches = []
    for record in records:
        arch = record["model"].split(":", 1)[1]
        expected_defined = nb201_parameter_free_path(arch)
        if expected_defined != (record["epsilon"] is not None):
            mismatches.append(arch)
    return {
        "rule": "undefined exactly when no skip/avg-pool path links cell input to output",
        "cells_without_path": sum(
            not nb201_parameter_free_path(r["model"].split(":", 1)[1]) for r in records
        ),
        "undefined": sum(r["epsilon"] is None for r in records),
        "mismatches": mismatches,
    }


def _statistics(records: list[dict], total: int, space: Space) -> dict:
    truth = np.array([r["truth"] for r in records], dtype=np.float64)
    eps = np.array([np.nan if r["epsilon"] is None else r["epsilon"] for r in records])
    table = {
        f"epsilon ({policy})": rank_statistics(eps, truth, space.higher_is_better, policy)
        for policy in NAN_POLICIES
    }
    for column in ("params", "macs"):
        values = np.array([r[column] for r in records], dtype=np.float64)
        table[column] = rank_statistics(values, truth, space.higher_is_better, "omit")
    summary = {"statistics": table, "scored": len(records), "failed": total - len(records)}
    if space.name == "nb201":
        summary["structural_nan"] = _structural_nan_check(records)
    return summary


def _score_candidates(
    space: Space, candidates: list[Candidate], task: Task, run: dict, progress
) -> list[dict]:
    """Score the candidates through the engine; return their records in table order."""
    jobs = [
        Job.encoded(f"{space.name}:{candidate.label}", space.name, candidate.encoding)
        for candidate in candidates
    ]
    records: dict[int, dict] = {}
    for done, outcome in enumerate(run_jobs(jobs, task, **run), start=1):
        if outcome.error is not None:
            log.error("%s", outcome.error)
            if outcome.traceback is not None:
                log.debug("%s", outcome.traceback)
        else:
            log.info("[%d/%d] scored %s", done, len(jobs), outcome.label)
            records[outcome.index] = _bench_record(outcome.record, candidates[outcome.index])
        if progress is not None:
            progress(done, len(jobs))
    return [records[index] for index in sorted(records)]


def _import_statistics_early() -> None:
    """Import scipy's statistics in the background while workers score, because the
    import takes about 0.5 s and the summary needs it only at the end."""
    threading.Thread(
        target=importlib.import_module, args=("scipy.stats",), daemon=True
    ).start()


def run_bench(
    space_name: str,
    truth: Path,
    *,
    sample: int | None,
    sample_seed: int = 0,
    inputs: Path | None = None,
    metric_column: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    jobs: int | None = 1,
    cache: bool = False,
    engine: str = "local",
    address: str | None = None,
    worker_setup: Callable[[], None] | None = None,
    **options,
) -> BenchResult:
    """Score a sample of a search space and compute the summary statistics.

    ``sample`` None scores every architecture in the table. ``options`` go to
    :func:`onnxeps.score` (synthetic, batch_size, weights, seed, device, ...). ``jobs``
    worker processes build and score the models (one: in this process; None: one per
    CPU core, or per CPU of the Ray cluster), on the ``engine`` "local" or "ray" (at
    ``address``); ``cache`` uses the result cache, and
    ``worker_setup`` runs once in each worker.
    """
    space = SPACES[space_name]
    column = metric_column or space.metric_column
    candidates = _sample(read_candidates(space, truth, column), sample, sample_seed)
    task = make_task(
        inputs, options | {"preset": space.preset}, cache=cache, setup=worker_setup
    )
    run = {"workers": jobs, "engine": engine, "address": address}
    if engine != "local" or jobs is None or jobs > 1:
        _import_statistics_early()
    started = time.perf_counter()
    result = BenchResult()
    result.records = _score_candidates(space, candidates, task, run, progress)
    elapsed = time.perf_counter() - started
    result.summary = {
        "space": space.name,
        "truth": str(truth),
        "metric_column": column,
        "higher_is_better": space.higher_is_better,
        "sample": len(candidates),
        "sample_seed": sample_seed,
        "input": result.records[0]["input"] if result.records else None,
        "weights": result.records[0]["weights"] if result.records else None,
        "batch_size": result.records[0]["batch_size"] if result.records else None,
        "seconds": round(elapsed, 1),
        "models_per_second": round(len(candidates) / elapsed, 3) if elapsed else None,
        "machine": f"{platform.machine()}, {_cpu_count()} CPUs, Python {platform.python_version()}",
    } | _statistics(result.records, len(candidates), space)
    return result


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.3f}"
    return str(value)


_COLUMNS = [
    ("n", "n"),
    ("coverage", None),
    ("spearman", "Spearman ρ"),
    ("kendall", "Kendall τ"),
    ("top10_spearman", "top-10 % ρ"),
    ("top10_kendall", "top-10 % τ"),
    ("top10_share", "top-10 % share"),
    ("top64_in_top5", "top-64 in top-5 %"),
]


def render_markdown(summary: dict) -> str:
    """Render the summary report as Markdown."""
    lines = [
        f"# onnxeps bench {summary['space']}",
        "",
        f"- ground truth: `{summary['truth']}`, column `{summary['metric_column']}` "
        f"({'higher' if summary['higher_is_better'] else 'lower'} is better)",
        f"- sample: {summary['sample']} architectures (seed {summary['sample_seed']}); "
        f"scored {summary['scored']}, failed {summary['failed']}",
        f"- input: {summary['input']}; weights {summary['weights']}; "
        f"batch {summary['batch_size']}",
        f"- time: {summary['seconds']} s ({summary['models_per_second']} models/s) "
        f"on {summary['machine']}",
        "- MACs: multiply-accumulates per sample of Conv, ConvTranspose, Gemm, MatMul "
        "and recurrent gate matrices",
        "",
        "| proxy | " + " | ".join(title or "coverage" for _, title in _COLUMNS) + " |",
        "|---|" + "---|" * len(_COLUMNS),
    ]
    for proxy, row in summary["statistics"].items():
        cells = []
        for key, _ in _COLUMNS:
            if key == "coverage":
                cells.append(f"{row['defined']}/{row['total']}")
            else:
                cells.append(_cell(row.get(key)))
        lines.append(f"| {proxy} | " + " | ".join(cells) + " |")
    check = summary.get("structural_nan")
    if check is not None:
        lines += [
            "",
            f"Undefined scores: {check['undefined']}; cells without a skip/avg-pool path "
            f"from cell input to output: {check['cells_without_path']}; cells where the "
            f"two disagree: {len(check['mismatches'])}.",
        ]
        lines += [f"- `{arch}`" for arch in check["mismatches"][:20]]
    return "\n".join(lines) + "\n"
