"""Command-line pieces shared by every onnxeps command: logging, the output and
scoring options, input protection and error reporting.

Exit codes: 0 success, 1 error (invalid or missing input, runtime failure), 2 usage
error (commands with their own convention, such as ``gate``, say so).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from onnxeps.engine import error_line
from onnxeps.errors import OnnxepsError
from onnxeps.inputs import SYNTHETIC_KINDS
from onnxeps.limits import AUTO, MemoryLimitParam
from onnxeps.presets import PRESETS
from onnxeps.report import FORMATS, format_from_path, write_output
from onnxeps.runtime import DEVICES
from onnxeps.score import (
    RECORD_KEYS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    DEFAULT_TIMEOUT,
    validate_weights,
)

log = logging.getLogger("onnxeps")

SCORE_COLUMNS = list(RECORD_KEYS)
_LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname_lower = record.levelname.lower()
        return super().format(record)


def configure_logging(verbose: int, quiet: int) -> None:
    level = _LEVELS[max(-1, min(2, verbose - quiet))]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(levelname_lower)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def parse_floats(ctx, param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers (e.g. 0.49,0.48,0.45)."
        ) from None
    return numbers


def check_weights(ctx, param, value):
    if value is None:
        return None
    try:
        return validate_weights(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def check_timeout(ctx, param, value: float) -> float:
    if value != value:  # NaN passes FloatRange's comparisons
        raise click.BadParameter("must be a number of seconds, not nan.")
    return value


def verbosity_options(function):
    function = click.option(
        "-q", "--quiet", count=True, help="Log less (errors only)."
    )(function)
    return click.option(
        "-v", "--verbose", count=True, help="Log more: -v for progress, -vv for debug."
    )(function)


def _output_options(function, output_help: str):
    function = click.option(
        "-o",
        "--output",
        "output_path",
        type=click.Path(dir_okay=False, writable=True),
        help=output_help,
    )(function)
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        help="Record format; default: from the -o extension, else table.",
    )(function)


def output_options(function):
    """Add --format and -o for records written at the end."""
    return _output_options(function, "Write records to FILE (atomically) instead of stdout.")


def streamed_output_options(function):
    """Add --format and -o for records written as each model finishes."""
    return _output_options(
        function,
        "Write records to FILE instead of stdout. JSON Lines and CSV get each record as "
        "its model finishes; a table is written atomically at the end.",
    )


def _resolved(path) -> Path:
    """Return the path with symlinks resolved, or made absolute when they loop."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def check_folder(path: str | None) -> None:
    """Fail before any work when an output file's folder does not exist."""
    if path is not None and not _resolved(path).parent.is_dir():
        raise click.UsageError(f"{path}: folder {str(Path(path).parent)!r} does not exist.")


def protect_inputs(output_path: str | None, inputs) -> None:
    """Fail when an output file would replace an input (a model, its data, a batch)."""
    if output_path is None:
        return
    target = _file_identity(output_path)
    for path in inputs:
        if path is not None and target is not None and _file_identity(path) == target:
            raise click.UsageError(f"{output_path} would overwrite the input file {path}.")


def _file_identity(path) -> tuple | None:
    """Return what makes a path the same file: device and inode when it exists (hard
    links and symlinks included), else the resolved path; None when it cannot resolve."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError):  # a symlink loop, a name too long, a NUL byte
        return None
    else:
        return ("inode", found.st_dev, found.st_ino)
    try:
        return ("path", str(Path(path).resolve()))
    except (OSError, RuntimeError):
        return None


def model_files(models, output_path: str) -> list[Path]:
    """Return the model files and those of their external-data files that could be
    ``output_path``.

    Loading rejects external data outside the model's folder, so only the models in a
    folder above the output, or in its own, are parsed for their external data.
    """
    from onnxeps.load import referenced_files

    folder = _resolved(output_path).parent
    above = {folder, *folder.parents}
    files = []
    for model in models:
        path = Path(model)
        try:
            near = path.is_file() and path.resolve().parent in above
        except (OSError, RuntimeError):  # a symlink loop or a name too long: scoring reports it
            near = False
        files += referenced_files(path) if near else [path]
    return files


def resolve_format(fmt: str | None, output_path: str | None, models) -> str:
    if output_path is not None:
        protect_inputs(output_path, model_files(models, output_path))
    check_folder(output_path)
    if fmt is not None:
        return fmt
    if output_path is None:
        return "table"
    found = format_from_path(output_path)
    if found is None:
        raise click.UsageError(
            f"cannot tell the format of {output_path!r} from its extension; pass "
            f"--format ({', '.join(FORMATS)})."
        )
    return found


def write_or_fail(text: str, path: str | None, exit_code: int = 1) -> None:
    """Write records, turning a failed write (file or stdout) into one error line and
    an exit."""
    try:
        write_output(text, path)
    except OSError as error:
        target = "stdout" if path is None else path
        log.error("cannot write %s: %s", target, error.strerror or error)
        sys.exit(exit_code)


def report_error(model: str, error: Exception) -> None:
    log.error("%s", error_line(model, error))
    if not isinstance(error, OnnxepsError):
        log.debug("traceback", exc_info=error)


def progress_printer(label: str):
    """Return a progress callback: a bar on a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return None, None
    bar = click.progressbar(length=1, label=label, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.length = total
        bar.update(done - bar.pos)

    return bar, update


# Applied bottom-up, so --help lists them in this order.
_OPTIONS = [
    click.option("--weights", nargs=2, type=float, callback=check_weights, help="The two constant weights w1 w2. [default: 1e-7 1, or the preset's]"),
    click.option("--input", "input_path", type=click.Path(), help="Input batch: .npy, .npz with one array per model input, or word-level text (.zip of train/valid/test .txt, or one .txt) for a token input."),
    click.option("--synthetic", type=click.Choice(SYNTHETIC_KINDS), help="Synthetic input kind for every input. [default: grey for float inputs, tokens for integer inputs]"),
    click.option("--batch-size", type=click.IntRange(min=1), help=f"Samples in the batch. [default: {DEFAULT_BATCH_SIZE}, or all samples of --input]"),
    click.option("--seq-len", type=click.IntRange(min=1), default=DEFAULT_SEQ_LEN, show_default=True, help="Length of symbolic sequence axes of synthetic inputs."),
    click.option("--seed", type=click.IntRange(min=0), default=DEFAULT_SEED, show_default=True, help="Seed of synthetic inputs and embedding tables."),
    click.option("--output-name", help="Tensor to score. [default: the first graph output, or the preset's]"),
    click.option("--mean", callback=parse_floats, help="Per-channel mean in [0, 1] units for uint8 NHWC images, e.g. 0.49,0.48,0.45."),
    click.option("--std", callback=parse_floats, help="Per-channel std in [0, 1] units for uint8 NHWC images."),
    click.option("--preset", type=click.Choice(list(PRESETS)), help="Reference settings of a benchmark's experiments; explicit options override them."),
    click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Execution provider."),
    click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT, show_default=True, callback=check_timeout, help="Seconds allowed for scoring each model (inf: no limit)."),
    click.option("--strict", is_flag=True, help="Fail on float tensors the planner cannot classify."),
    click.option("--no-collapse", "collapse", flag_value=False, default=True, help="Always evaluate the full graph, never the equivalent narrow one."),
    click.option("--memory-limit", type=MemoryLimitParam(), default=AUTO, show_default=True, help="Memory that scoring may take for the weights, estimated from their sizes before any is read: a size such as 3GB or 512MiB, none, or auto (the memory available)."),
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
