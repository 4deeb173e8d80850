"""The epsilon metric (epsinas) computed from the outputs of the two constant-weight runs.

Source: E. Gracheva, "Neural Architecture Search: Two Constant Shared Weights
Initialisations", arXiv 2302.04406. For each run k the output is flattened to float64 and
min-max normalised to p_k; exact zeros of p_k become NaN (this drops each run's arg-min);
epsilon = nanmean |p_1 - p_2| / nanmean(p_1 and p_2 together).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EpsilonResult", "epsilon"]


@dataclass(frozen=True)
class EpsilonResult:
    """Epsilon, or NaN with the reason it is undefined."""

    value: float
    reason: str | None = None

    @property
    def defined(self) -> bool:
        return self.reason is None


def _normalise(output: np.ndarray, run: int) -> tuple[np.ndarray | None, str | None]:
    """Min-max normalise one run's flattened output, or give the reason it cannot be."""
    vector = np.asarray(output, dtype=np.float64).ravel()
    if vector.size == 0:
        return None, f"run {run} output is empty"
    if not np.all(np.isfinite(vector)):
        bad = int(np.count_nonzero(~np.isfinite(vector)))
        return None, f"run {run} output has {bad} non-finite values"
    low = vector.min()
    high = vector.max()
    if high == low:
        return None, f"run {run} output is constant ({float(low)!r})"
    # The span can overflow float64 when the output contains values near +-1.8e308.
    with np.errstate(over="ignore"):
        span = high - low
    if not np.isfinite(span):
        return None, f"run {run} output range overflows float64"
    normalised = (vector - low) / span
    normalised[normalised == 0.0] = np.nan
    return normalised, None


def epsilon(output_1: np.ndarray, output_2: np.ndarray) -> EpsilonResult:
    """Compute epsilon from the outputs of the runs with weights w1 and w2.

    Both outputs are flattened; they must hold the same number of elements. The result is
    NaN with a reason when either output is empty, constant or non-finite, or when no index
    has a defined value in both normalised runs.
    """
    size_1 = np.size(output_1)
    size_2 = np.size(output_2)
    if size_1 != size_2:
        raise ValueError(
            f"the two outputs differ in size ({size_1} and {size_2} elements); "
            "both runs must use the same batch"
        )
    p_1, reason = _normalise(output_1, 1)
    if reason is not None:
        return EpsilonResult(float("nan"), reason)
    p_2, reason = _normalise(output_2, 2)
    if reason is not None:
        return EpsilonResult(float("nan"), reason)
    both = ~np.isnan(p_1) & ~np.isnan(p_2)
    if not both.any():
        return EpsilonResult(
            float("nan"), "no output element is defined in both normalised runs"
        )
    mae = np.mean(np.abs(p_1[both] - p_2[both]))
    mean = np.nanmean(np.concatenate([p_1, p_2]))
    return EpsilonResult(float(mae / mean))
