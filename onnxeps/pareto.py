"""The Pareto front of epsilon (higher is better) against a cost (lower is better).

A point dominates another when its epsilon is at least as high and its cost at most as
high, and one of the two strictly. A point with an undefined epsilon or cost is never
on the front.
"""

from __future__ import annotations

import math
import os

from onnxeps.report import atomic_write

__all__ = ["pareto_flags", "pareto_plot"]


def _defined(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def pareto_flags(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """Return, for each (epsilon, cost) point, whether no other point dominates it.

    Equal points are all on the front.
    """
    flags = [False] * len(points)
    candidates = [
        i for i, (eps, cost) in enumerate(points) if _defined(eps) and _defined(cost)
    ]
    candidates.sort(key=lambda i: points[i][1])
    best_cheaper = -math.inf  # the highest epsilon among strictly cheaper points
    start = 0
    while start < len(candidates):
        cost = points[candidates[start]][1]
        end = start
        while end < len(candidates) and points[candidates[end]][1] == cost:
            end += 1
        group = candidates[start:end]
        top = max(points[i][0] for i in group)
        if top > best_cheaper:
            for i in group:
                flags[i] = points[i][0] == top
        best_cheaper = max(best_cheaper, top)
        start = end
    return flags


def pareto_plot(records: list[dict], cost_column: str, path: str | os.PathLike) -> None:
    """Write a PNG (atomically) of epsilon against the cost column, front highlighted.

    Needs matplotlib, the ``plot`` extra.
    """
    from onnxeps.plot import _pyplot

    plt = _pyplot()
    shown = [r for r in records if _defined(r["epsilon"]) and _defined(r.get(cost_column))]
    front = sorted((r for r in shown if r["pareto"]), key=lambda r: r[cost_column])
    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    axes.scatter(
        [r[cost_column] for r in shown], [r["epsilon"] for r in shown],
        s=12, color="0.6", label="candidate",
    )  # fmt: skip
    axes.step(
        [r[cost_column] for r in front], [r["epsilon"] for r in front],
        where="post", color="tab:red", marker="o", label="Pareto front",
    )  # fmt: skip
    if shown and min(r[cost_column] for r in shown) > 0:
        axes.set_xscale("log")
    axes.set_xlabel(cost_column)
    axes.set_ylabel("epsilon")
    title = f"{len(front)} of {len(records)} models on the Pareto front"
    hidden = len(records) - len(shown)
    if hidden:
        title += f"; {hidden} with no epsilon or no {cost_column} not drawn"
    axes.set_title(title)
    axes.legend()
    try:
        atomic_write(
            path,
            lambda stream: figure.savefig(stream, format="png", bbox_inches="tight"),
        )
    finally:
        plt.close(figure)
