"""The ``convert torch`` and ``convert keras`` commands, which export framework models.

A missing framework, a module or file that cannot be loaded and a failed export exit
with status 1 and one line. Malformed options exit with status 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import click
import onnx

from onnxeps.plan import NORMALISATION_KEY

from . import keras_export, torch_export
from ._builder import save_model_atomic
from ._extras import MissingExtraError, import_extra

__all__ = ["convert_torch", "convert_keras"]

OUTPUT_OPTION = click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Path of the .onnx file to write.",
)
_OPSET_OPTION = click.option(
    "--opset",
    type=click.IntRange(min=7, max=onnx.defs.onnx_opset_version()),
    default=17,
    show_default=True,
    help="ONNX opset version of the exported model.",
)
_TORCH_DTYPES = ("float32", "float64", "int64", "int32")


def _parse_shape(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of integers, e.g. 1,3,32,32"
        ) from None
    if any(size < 1 for size in shape):
        raise click.BadParameter(f"{value!r} has a size below 1")
    return shape


def _parse_axes(ctx, param, value: str) -> dict[int, str]:
    axes: dict[int, str] = {}
    for pair in value.split(","):
        axis, separator, name = pair.partition("=")
        valid = axis.strip().isdigit() and name.strip().isidentifier()
        if not separator or not valid:
            raise click.BadParameter(
                f"{pair!r} is not AXIS=NAME with a non-negative integer axis and an "
                "identifier name, e.g. 0=batch,1=seq"
            )
        axes[int(axis)] = name.strip()
    return axes


def _one_line(error: BaseException) -> str:
    """Return the error's type and the first line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else "no message"
    return f"{type(error).__name__}: {first}"


@click.command("torch")
@click.argument("target", metavar="MODULE:CALLABLE")
@click.option(
    "--input-shape",
    required=True,
    callback=_parse_shape,
    help="Shape of the example input, e.g. 1,3,32,32. Only its shape and dtype are "
    "used; the axes named by --dynamic-axes stay symbolic.",
)
@click.option(
    "--input-dtype",
    type=click.Choice(_TORCH_DTYPES),
    default="float32",
    show_default=True,
    help="Element type of the example input (int64 for token ids).",
)
@click.option(
    "--dynamic-axes",
    default="0=batch",
    show_default=True,
    callback=_parse_axes,
    help="Comma-separated AXIS=NAME pairs made symbolic in every input and output.",
)
@_OPSET_OPTION
@click.option(
    "--exporter",
    type=click.Choice(torch_export.EXPORTERS),
    default="auto",
    show_default=True,
    help="torch.onnx exporter; auto tries TorchScript, then dynamo.",
)
@OUTPUT_OPTION
def convert_torch(
    target: str,
    input_shape: tuple[int, ...],
    input_dtype: str,
    dynamic_axes: dict[int, str],
    opset: int,
    exporter: str,
    output: Path,
) -> None:
    """Export the torch.nn.Module that CALLABLE in MODULE returns.

    MODULE is imported from the current directory or PYTHONPATH, and CALLABLE (a
    function or class) is called without arguments. The export keeps BatchNorm as
    BatchNormalization operators, runs on an eval-mode copy and records its settings
    in the model metadata.
    """
    module_name, attribute = _split_target(target)
    torch = _require(lambda: import_extra("torch", "PyTorch", "torch"))
    module = _build_module(module_name, attribute, torch)
    example = torch.zeros(input_shape, dtype=getattr(torch, input_dtype))
    try:
        model = torch_export.export(
            module, example, opset=opset, dynamic_axes=dynamic_axes, exporter=exporter
        )
    except MissingExtraError as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # exporters raise many types, reported as one line
        raise click.ClickException(
            f"export of {target} failed: {_one_line(error)}"
        ) from None
    _write(model, output)


def _split_target(target: str) -> tuple[str, str]:
    module_name, separator, attribute = target.partition(":")
    valid = separator and all(
        part.isidentifier() for part in [*module_name.split("."), *attribute.split(".")]
    )
    if not valid:
        raise click.BadParameter(
            f"{target!r} is not MODULE:CALLABLE, e.g. mypackage.models:build_net",
            param_hint="MODULE:CALLABLE",
        )
    return module_name, attribute


def _require(importer):
    try:
        return importer()
    except MissingExtraError as error:
        raise click.ClickException(str(error)) from None


def _build_module(module_name: str, attribute: str, torch) -> Any:
    """Import MODULE, call CALLABLE and check that it returns an nn.Module."""
    python_module = _import_user_module(module_name)
    factory: Any = python_module
    for part in attribute.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise click.ClickException(
                f"module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(factory):
        raise click.ClickException(f"{module_name}:{attribute} is not callable")
    try:
        result = factory()
    except Exception as error:  # user code may raise anything
        raise click.ClickException(
            f"calling {module_name}:{attribute}() failed: {_one_line(error)}"
        ) from None
    if not isinstance(result, torch.nn.Module):
        raise click.ClickException(
            f"{module_name}:{attribute}() returned {type(result).__name__}, expected a "
            "torch.nn.Module"
        )
    return result


def _import_user_module(module_name: str):
    # Console scripts do not put the current directory on sys.path, but users expect
    # `onnxeps convert torch mymodels:build` to find ./mymodels.py.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise click.ClickException(
                f"module {module_name!r} not found in the current directory or on "
                "PYTHONPATH"
            ) from None
        raise click.ClickException(
            f"importing module {module_name!r} failed: {_one_line(error)}"
        ) from None
    except Exception as error:  # a module may raise anything at import
        raise click.ClickException(
            f"importing module {module_name!r} failed: {_one_line(error)}"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)


@click.command("keras")
@click.argument(
    "source", metavar="MODEL.keras|SAVED_MODEL_DIR", type=click.Path(path_type=Path)
)
@click.option(
    "--input-shape",
    callback=_parse_shape,
    help="Shape of the only input, e.g. 1,32,32,3; axis 0 becomes the symbolic batch "
    "axis. [default: the model's input shapes]",
)
@_OPSET_OPTION
@OUTPUT_OPTION
def convert_keras(
    source: Path, input_shape: tuple[int, ...] | None, opset: int, output: Path
) -> None:
    """Convert a Keras model file (.keras, .h5) or a TensorFlow SavedModel folder.

    BatchNormalization layers of a Keras file stay BatchNormalization operators. A
    SavedModel is converted as saved. When its normalisation was written with stored
    statistics, the model metadata records it as folded and a warning is printed.
    """
    if not source.exists():
        raise click.ClickException(f"Keras model {str(source)!r} not found")
    try:
        model = keras_export.convert_file(source, opset=opset, input_shape=input_shape)
    except MissingExtraError as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # loaders and tf2onnx raise many types
        raise click.ClickException(
            f"conversion of {str(source)!r} failed: {_one_line(error)}"
        ) from None
    _write(model, output)


def _write(model: onnx.ModelProto, output: Path) -> None:
    try:
        save_model_atomic(model, output)
    except OSError as error:
        raise click.ClickException(
            f"failed to write {str(output)!r}: {error.strerror or error}"
        ) from None
    click.echo(f"wrote {output}", err=True)
    state = next(
        (p.value for p in model.metadata_props if p.key == NORMALISATION_KEY), None
    )
    if state == "folded":
        click.echo(
            f"warning: {output}: normalisation was folded at export, so its score "
            "differs from the reference semantics (batch statistics)",
            err=True,
        )
