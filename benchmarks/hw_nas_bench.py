"""Rank correlation of graph #params and MACs with measured edge-device latency.

Builds every NAS-Bench-201 cell (10 classes) with the onnxeps converter, counts its
parameters and MACs per sample from the ONNX graph, and prints Spearman's ρ of each
against every latency column of HW-NAS-Bench's CIFAR-10 table. The rows of both CSV
files are in NB201 index order.

Usage: python benchmarks/hw_nas_bench.py HW_CSV NB201_CSV [--jobs N] [--limit N]
"""

from __future__ import annotations

import argparse
import csv
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy import stats

from onnxeps.converters import nb201
from onnxeps.cost import model_costs
from onnxeps.plan import build_plan


def cell_costs(arch_str: str) -> tuple[int, int]:
    """Return (#params, MACs per sample) of the 10-class network of one cell."""
    model = nb201.build(arch_str, num_classes=10)
    costs = model_costs(model, build_plan(model), {"input": (1, 3, 32, 32)})
    return costs.params, costs.macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hw_csv")
    parser.add_argument("nb201_csv")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--limit", type=int, help="score only the first N cells")
    args = parser.parse_args()
    with open(args.nb201_csv, newline="") as stream:
        cells = [row["arch_str"] for row in csv.DictReader(stream)][: args.limit]
    with open(args.hw_csv, newline="") as stream:
        hardware = list(csv.DictReader(stream))[: len(cells)]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        costs = np.array(list(pool.map(cell_costs, cells, chunksize=64)), dtype=np.float64)
    elapsed = time.perf_counter() - started
    columns = [c for c in hardware[0] if c.endswith("_latency")]
    print(f"{len(cells)} cells, {elapsed:.0f} s with {args.jobs} processes\n")
    print("| device latency | Spearman ρ, #params | Spearman ρ, MACs |")
    print("|---|---|---|")
    for column in columns:
        latency = np.array([float(row[column]) for row in hardware])
        rho_params = stats.spearmanr(costs[:, 0], latency).statistic
        rho_macs = stats.spearmanr(costs[:, 1], latency).statistic
        print(f"| {column} | {rho_params:.3f} | {rho_macs:.3f} |")


if __name__ == "__main__":
    main()
