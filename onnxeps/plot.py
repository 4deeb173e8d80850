"""Scatter plot of a benchmark: score against ground truth, coloured by #params.

Needs matplotlib, the optional ``plot`` extra.
"""

from __future__ import annotations

import os

import numpy as np

from onnxeps.errors import OnnxepsError
from onnxeps.report import atomic_write

__all__ = ["scatter_plot"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise OnnxepsError(
            "plotting needs matplotlib, which is not installed.",
            "Install the plot extra: pip install 'onnxeps[plot]'.",
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_plot(records: list[dict], summary: dict, path: str | os.PathLike) -> None:
    """Draw defined epsilon against the ground truth and write a PNG atomically."""
    plt = _pyplot()
    defined = [r for r in records if r["epsilon"] is not None]
    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    points = axes.scatter(
        [r["truth"] for r in defined],
        [r["epsilon"] for r in defined],
        c=np.log10([max(r["params"], 1) for r in defined]),
        s=6,
        cmap="viridis",
    )
    figure.colorbar(points, ax=axes, label="log10 #params")
    axes.set_yscale("log")
    axes.set_xlabel(summary["metric_column"])
    axes.set_ylabel("epsilon")
    rho = summary["statistics"]["epsilon (omit)"].get("spearman", float("nan"))
    axes.set_title(
        f"{summary['space']}: {len(defined)}/{len(records)} defined, Spearman {rho:.3f}"
    )
    try:
        atomic_write(path, lambda stream: figure.savefig(stream, format="png", bbox_inches="tight"))
    finally:
        plt.close(figure)
