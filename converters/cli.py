"""The ``convert`` command group: write NAS-benchmark encodings and framework models
as ONNX files.

Invalid encodings and files that cannot be read or written exit with status 1 and a
one-line message. Usage errors (a missing option) exit with status 2. The ``torch``
and ``keras`` subcommands live in :mod:`.framework_cli`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import onnx

from . import nb101, nb201, nlp
from ._builder import save_model_atomic
from .framework_cli import OUTPUT_OPTION as _OUTPUT_OPTION
from .framework_cli import convert_keras, convert_torch

__all__ = ["convert"]

_CLASSES_OPTION = click.option(
    "--num-classes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Number of classifier outputs.",
)
_SEED_OPTION = click.option(
    "--init-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the initial weights.",
)


@click.group("convert")
def convert() -> None:
    """Convert a NAS-benchmark encoding, a PyTorch module or a Keras model to ONNX."""


convert.add_command(convert_torch)
convert.add_command(convert_keras)


@convert.command("nb201")
@click.argument("arch_str")
@_OUTPUT_OPTION
@_CLASSES_OPTION
@_SEED_OPTION
def convert_nb201(
    arch_str: str, output: Path, num_classes: int, init_seed: int
) -> None:
    """Write the NAS-Bench-201 network of ARCH_STR.

    ARCH_STR is an arch string such as '|nor_conv_3x3~0|+|...|+|...|' or a NASLib
    6-tuple such as '(2, 2, 0, 2, 3, 2)'.
    """
    try:
        if arch_str.strip().startswith("("):
            arch_str = nb201.arch_from_tuple(arch_str)
        model = nb201.build(arch_str, num_classes=num_classes, init_seed=init_seed)
    except ValueError as error:
        raise click.ClickException(f"invalid ARCH_STR: {error}") from None
    _write(model, output)


@convert.command("nb101")
@click.option(
    "--matrix",
    "matrix_text",
    required=True,
    help="Adjacency matrix as JSON text or the path of a JSON file.",
)
@click.option(
    "--ops",
    "ops_text",
    required=True,
    help="Op names (input, ..., output) as JSON text or the path of a JSON file.",
)
@_OUTPUT_OPTION
@_CLASSES_OPTION
@_SEED_OPTION
def convert_nb101(
    matrix_text: str, ops_text: str, output: Path, num_classes: int, init_seed: int
) -> None:
    """Write the NAS-Bench-101 network of one cell (pruned before conversion)."""
    matrix = _read_json(matrix_text, "--matrix")
    ops = _read_json(ops_text, "--ops")
    try:
        model = nb101.build(matrix, ops, num_classes=num_classes, init_seed=init_seed)
    except ValueError as error:
        raise click.ClickException(f"invalid cell: {error}") from None
    _write(model, output)


@convert.command("nlp")
@click.argument("recipe_text", metavar="RECIPE")
@_OUTPUT_OPTION
@click.option(
    "--vocab-size",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="Vocabulary size (10000 for Penn Treebank).",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    default=70,
    show_default=True,
    help="Number of time steps the graph is unrolled over.",
)
@_SEED_OPTION
def convert_nlp(
    recipe_text: str, output: Path, vocab_size: int, seq_len: int, init_seed: int
) -> None:
    """Write the NAS-Bench-NLP language model of RECIPE (JSON text or a JSON file)."""
    recipe = _read_json(recipe_text, "RECIPE")
    try:
        model = nlp.build(recipe, vocab_size, seq_len, init_seed)
    except ValueError as error:
        raise click.ClickException(f"invalid RECIPE: {error}") from None
    _write(model, output)


def _read_json(value: str, param_hint: str) -> Any:
    """Parse ``value`` as the path of a JSON file if that file exists, else as JSON."""
    path = Path(value)
    if not _is_file(path):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise click.ClickException(
                f"invalid {param_hint}: {value!r} is neither an existing file nor valid "
                f"JSON text ({error})"
            ) from None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise click.ClickException(
            f"invalid {param_hint}: failed to read file {value!r}: "
            f"{error.strerror or error}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise click.ClickException(
            f"invalid {param_hint}: file {value!r} does not contain valid JSON ({error})"
        ) from None


def _is_file(path: Path) -> bool:
    # JSON text longer than the file-name limit makes is_file raise ENAMETOOLONG.
    try:
        return path.is_file()
    except OSError:
        return False


def _write(model: onnx.ModelProto, output: Path) -> None:
    try:
        save_model_atomic(model, output)
    except OSError as error:
        raise click.ClickException(
            f"failed to write {str(output)!r}: {error.strerror or error}"
        ) from None
    click.echo(f"wrote {output}", err=True)
