"""The scoring options shared by ``onnxeps gate`` and ``onnxeps screen``.

They match the options of ``onnxeps score``, so a gate or screen run can be reproduced
with ``score``. Import this module through :mod:`onnxeps.cli`, which registers the
commands that use it.
"""

from __future__ import annotations

import click

from onnxeps.cli import _parse_floats
from onnxeps.inputs import SYNTHETIC_KINDS
from onnxeps.presets import PRESETS
from onnxeps.runtime import DEVICES
from onnxeps.score import DEFAULT_BATCH_SIZE, DEFAULT_SEED, DEFAULT_SEQ_LEN, DEFAULT_TIMEOUT

__all__ = ["scoring_options", "check_input_choice"]

# Applied bottom-up, so --help lists them in this order.
_OPTIONS = [
    click.option("--weights", nargs=2, type=float, help="The two constant weights w1 w2. [default: 1e-7 1, or the preset's]"),
    click.option("--input", "input_path", type=click.Path(), help="Input batch: .npy, .npz with one array per model input, or word-level text (.zip of train/valid/test .txt, or one .txt) for a token input."),
    click.option("--synthetic", type=click.Choice(SYNTHETIC_KINDS), help="Synthetic input kind for every input. [default: grey for float inputs, tokens for integer inputs]"),
    click.option("--batch-size", type=click.IntRange(min=1), help=f"Samples in the batch. [default: {DEFAULT_BATCH_SIZE}, or all samples of --input]"),
    click.option("--seq-len", type=click.IntRange(min=1), default=DEFAULT_SEQ_LEN, show_default=True, help="Length of symbolic sequence axes of synthetic inputs."),
    click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Seed of synthetic inputs and embedding tables."),
    click.option("--output-name", help="Tensor to score. [default: the first graph output, or the preset's]"),
    click.option("--mean", callback=_parse_floats, help="Per-channel mean in [0, 1] units for uint8 NHWC images, e.g. 0.49,0.48,0.45."),
    click.option("--std", callback=_parse_floats, help="Per-channel std in [0, 1] units for uint8 NHWC images."),
    click.option("--preset", type=click.Choice(list(PRESETS)), help="Reference settings of a benchmark's experiments; explicit options override them."),
    click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Execution provider."),
    click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT, show_default=True, help="Seconds allowed for scoring each model."),
    click.option("--strict", is_flag=True, help="Fail on float tensors the planner cannot classify."),
    click.option("--no-collapse", "collapse", flag_value=False, default=True, help="Always evaluate the full graph, never the equivalent narrow one."),
]  # fmt: skip


def scoring_options(function):
    """Add the options of ``onnxeps score`` that set how a model is scored."""
    for option in reversed(_OPTIONS):
        function = option(function)
    return function


def check_input_choice(input_path: str | None, synthetic: str | None) -> None:
    """Raise a usage error when both --input and --synthetic are given."""
    if input_path is not None and synthetic is not None:
        raise click.UsageError("give --input or --synthetic, not both.")
