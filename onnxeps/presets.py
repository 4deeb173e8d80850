"""Reference settings of the published epsilon experiments, by benchmark.

Source: the epsinas experiments (arXiv 2302.04406) for NAS-Bench-201, NAS-Bench-101 and
NAS-Bench-NLP. An option given explicitly overrides the preset's value.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Preset", "PRESETS", "CIFAR_MEAN", "CIFAR_STD"]

# CIFAR per-channel (RGB) statistics in [0, 1] units, as the reference loaders used.
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass(frozen=True)
class Preset:
    """Weights, scored output and input preparation of one benchmark's experiments."""

    name: str
    weights: tuple[float, float]
    output_name: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    recurrent_as_weight: bool = False


PRESETS: dict[str, Preset] = {
    "nb201": Preset("nb201", (1e-7, 1.0), mean=CIFAR_MEAN, std=CIFAR_STD),
    "nb101": Preset("nb101", (1e-4, 10.0), mean=CIFAR_MEAN, std=CIFAR_STD),
    # The NLP converter exposes the last layer's unit-0 hidden state over all steps.
    "nlp": Preset("nlp", (1e-5, 1e-3), output_name="hidden_unit0", recurrent_as_weight=True),
}
