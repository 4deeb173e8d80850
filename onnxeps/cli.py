"""The onnxeps command line: score, plan and convert models.

Exit codes: 0 success, 1 error (invalid or missing input, runtime failure), 2 usage
error. ``score`` exits 1 when any model could not be scored; the others are still
reported. Records go to stdout (or -o FILE); logs, warnings and summaries to stderr.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from onnxeps.converters.cli import convert
from onnxeps.errors import OnnxepsError
from onnxeps.inputs import SYNTHETIC_KINDS
from onnxeps.presets import PRESETS
from onnxeps.report import FORMATS, format_from_path, json_ready, render, write_output
from onnxeps.runtime import DEVICES
from onnxeps.score import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    DEFAULT_TIMEOUT,
    ScoreResult,
    score,
    validate_weights,
)

log = logging.getLogger("onnxeps")

SCORE_COLUMNS = [
    "model", "sha256", "epsilon", "reason", "weights", "batch_size", "input", "output",
    "preset", "provider", "warnings", "seconds",
]  # fmt: skip
SCORE_TABLE_COLUMNS = ["model", "epsilon", "reason", "batch_size", "input", "provider", "seconds"]
PLAN_COLUMNS = [
    "model", "tensor", "graph", "source", "shape", "dtype", "role", "action", "reason",
    "split",
]  # fmt: skip
PLAN_TABLE_COLUMNS = ["tensor", "shape", "dtype", "role", "action", "split", "reason"]
_LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname_lower = record.levelname.lower()
        return super().format(record)


def _configure_logging(verbose: int, quiet: int) -> None:
    level = _LEVELS[max(-1, min(2, verbose - quiet))]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(levelname_lower)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _parse_floats(ctx, param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers (e.g. 0.49,0.48,0.45)."
        ) from None
    return numbers


def _check_weights(ctx, param, value):
    if value is None:
        return None
    try:
        return validate_weights(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _verbosity(function):
    function = click.option(
        "-q", "--quiet", count=True, help="Log less (errors only)."
    )(function)
    return click.option(
        "-v", "--verbose", count=True, help="Log more: -v for progress, -vv for debug."
    )(function)


def _output_options(function):
    function = click.option(
        "-o",
        "--output",
        "output_path",
        type=click.Path(dir_okay=False, writable=True),
        help="Write records to FILE (atomically) instead of stdout.",
    )(function)
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        help="Record format; default: from the -o extension, else table.",
    )(function)


def _check_folder(path: str | None) -> None:
    """Fail before any work when an output file's folder does not exist."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise click.UsageError(f"{path}: folder {str(Path(path).parent)!r} does not exist.")


def _resolve_format(fmt: str | None, output_path: str | None, models) -> str:
    if output_path is not None and any(
        Path(output_path).resolve() == Path(m).resolve() for m in models
    ):
        raise click.UsageError(f"-o {output_path} would overwrite an input model.")
    _check_folder(output_path)
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxeps")
def main() -> None:
    """Score neural-network architectures from ONNX files with epsilon (epsinas)."""


def _write_or_fail(text: str, path: str | None) -> None:
    """Write records, turning a failed file write into one error line and exit 1."""
    try:
        write_output(text, path)
    except OSError as error:
        log.error("cannot write %s: %s", path, error.strerror or error)
        sys.exit(1)


def _report_error(model: str, error: Exception) -> None:
    text = str(error)
    if isinstance(error, OnnxepsError):
        message = text if text.startswith(model) else f"{model}: {text}"
        log.error("%s", message)
    else:
        log.error(
            "%s: internal error (%s: %s); rerun with -vv for the traceback",
            model, type(error).__name__, text,
        )  # fmt: skip
        log.debug("traceback", exc_info=error)


def _summarise(results: list[ScoreResult], total: int, quiet: int) -> None:
    """Print the coverage line to stderr (a summary, not a warning), unless -q."""
    if quiet:
        return
    defined = sum(1 for r in results if r.defined)
    failed = total - len(results)
    click.echo(
        f"coverage: {defined}/{total} models have a defined epsilon "
        f"({len(results) - defined} undefined, {failed} failed); undefined scores are "
        "null in the records",
        err=True,
    )


@main.command("score")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--weights", nargs=2, type=float, callback=_check_weights, help="The two constant weights w1 w2. [default: 1e-7 1, or the preset's]")
@click.option("--input", "input_path", type=click.Path(), help="Input batch: .npy, .npz with one array per model input, or word-level text (.zip of train/valid/test .txt, or one .txt) for a token input.")
@click.option("--synthetic", type=click.Choice(SYNTHETIC_KINDS), help="Synthetic input kind for every input. [default: grey for float inputs, tokens for integer inputs]")
@click.option("--batch-size", type=click.IntRange(min=1), help=f"Samples in the batch. [default: {DEFAULT_BATCH_SIZE}, or all samples of --input]")
@click.option("--seq-len", type=click.IntRange(min=1), default=DEFAULT_SEQ_LEN, show_default=True, help="Length of symbolic sequence axes of synthetic inputs.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Seed of synthetic inputs and embedding tables.")
@click.option("--output-name", help="Tensor to score. [default: the first graph output, or the preset's]")
@click.option("--mean", callback=_parse_floats, help="Per-channel mean in [0, 1] units for uint8 NHWC images, e.g. 0.49,0.48,0.45.")
@click.option("--std", callback=_parse_floats, help="Per-channel std in [0, 1] units for uint8 NHWC images.")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Reference settings of a benchmark's experiments; explicit options override them.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Execution provider.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT, show_default=True, help="Seconds allowed per model.")
@click.option("--strict", is_flag=True, help="Fail on float tensors the planner cannot classify.")
@click.option("--no-collapse", "collapse", flag_value=False, default=True, help="Always evaluate the full graph, never the equivalent narrow one.")
@_output_options
@_verbosity
def score_command(models, input_path, synthetic, fmt, output_path, verbose, quiet, **options) -> None:
    """Score each MODEL (.onnx) with epsilon."""
    _configure_logging(verbose, quiet)
    fmt = _resolve_format(fmt, output_path, models)
    if input_path is not None and synthetic is not None:
        raise click.UsageError("give --input or --synthetic, not both.")
    results: list[ScoreResult] = []
    for index, model in enumerate(models, start=1):
        log.info("[%d/%d] scoring %s", index, len(models), model)
        try:
            result = score(model, input_path, synthetic=synthetic, **options)
        except Exception as error:  # one failing model must not stop the others
            _report_error(model, error)
            continue
        for warning in result.warnings:
            log.warning("%s: %s", model, warning)
        results.append(result)
    records = [result.record() for result in results]
    _write_or_fail(render(records, fmt, SCORE_COLUMNS, SCORE_TABLE_COLUMNS), output_path)
    if len(models) > 1:
        _summarise(results, len(models), quiet)
    if len(results) < len(models):
        sys.exit(1)


main.add_command(convert)


@main.command("plan")
@click.argument("model", type=click.Path())
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Use a benchmark's roles (nlp: recurrent biases and states take w).")
@click.option("--strict", is_flag=True, help="Exit 1 when a float tensor cannot be classified.")
@_output_options
@_verbosity
def plan_command(model, preset, strict, fmt, output_path, verbose, quiet) -> None:
    """Print every float tensor of MODEL with its shape, role, action and reason."""
    from onnxeps import plan as build

    _configure_logging(verbose, quiet)
    fmt = _resolve_format(fmt, output_path, [model])
    recurrent = preset is not None and PRESETS[preset].recurrent_as_weight
    try:
        result = build(model, recurrent_as_weight=recurrent)
    except OnnxepsError as error:
        _report_error(model, error)
        sys.exit(1)
    records = [{"model": model, **entry.record()} for entry in result.entries]
    _write_or_fail(render(records, fmt, PLAN_COLUMNS, PLAN_TABLE_COLUMNS), output_path)
    for warning in result.warnings:
        log.warning("%s: %s", model, warning)
    if result.quantized:
        log.warning("%s: quantized weights (%s); score rejects this model", model, ", ".join(result.quantized[:3]))
    if strict and result.unclassified():
        log.error("%s: %d unclassified float tensors and --strict is set", model, len(result.unclassified()))
        sys.exit(1)


def _progress_printer(label: str):
    """Return a progress callback: a bar on a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return None, None
    bar = click.progressbar(length=1, label=label, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.length = total
        bar.update(done - bar.pos)

    return bar, update


@main.command("bench")
@click.argument("space", type=click.Choice(["nb201", "nb101", "nlp"]))
@click.option("--truth", type=click.Path(exists=True, dir_okay=False), required=True, help="Ground-truth CSV of the space.")
@click.option("--sample", default="all", show_default=True, help="Number of architectures drawn uniformly, or 'all'.")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the architecture sample.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), help="Input batch (.npz images, or PTB text .zip for nlp).")
@click.option("--synthetic", type=click.Choice(SYNTHETIC_KINDS), help="Synthetic input kind.")
@click.option("--batch-size", type=click.IntRange(min=1), help=f"Samples in the batch. [default: {DEFAULT_BATCH_SIZE}]")
@click.option("--weights", nargs=2, type=float, callback=_check_weights, help="The two constant weights. [default: the space's preset]")
@click.option("--metric-column", help="Ground-truth column. [default: test_acc_c10, val_accuracy, ptb_test_loss]")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Execution provider.")
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), help="Report format. [default: from -o, else md]")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), help="Write the report to FILE.")
@click.option("--records", "records_path", type=click.Path(dir_okay=False), help="Write per-model score records (JSON Lines) to FILE.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a scatter plot PNG (score against truth) to FILE; needs onnxeps[plot].")
@_verbosity
def bench_command(space, truth, sample, sample_seed, input_path, synthetic, records_path, plot_path, fmt, output_path, verbose, quiet, **options) -> None:
    """Score architectures of SPACE and rank them against the ground truth."""
    import json as json_module

    from onnxeps.bench import render_markdown, run_bench

    _configure_logging(verbose, quiet)
    if input_path is not None and synthetic is not None:
        raise click.UsageError("give --input or --synthetic, not both.")
    size = _parse_sample(sample)
    for path in (output_path, records_path, plot_path):
        _check_folder(path)
    fmt = fmt or ("json" if output_path and output_path.endswith(".json") else "md")
    bar, update = _progress_printer(f"scoring {space}")
    try:
        result = run_bench(
            space, Path(truth), sample=size, sample_seed=sample_seed,
            inputs=Path(input_path) if input_path else None, synthetic=synthetic,
            progress=update, **options,
        )  # fmt: skip
    except OnnxepsError as error:
        log.error("%s", error)
        sys.exit(1)
    finally:
        if bar is not None:
            bar.render_finish()
    if records_path is not None:
        _write_or_fail(render(result.records, "json", []), records_path)
    if plot_path is not None:
        from onnxeps.plot import scatter_plot

        try:
            scatter_plot(result.records, result.summary, plot_path)
        except OnnxepsError as error:
            log.error("%s", error)
            sys.exit(1)
    text = (
        json_module.dumps(json_ready(result.summary), indent=2, allow_nan=False) + "\n"
        if fmt == "json"
        else render_markdown(result.summary)
    )
    _write_or_fail(text, output_path)


def _parse_sample(value: str) -> int | None:
    if value == "all":
        return None
    try:
        size = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'all'.", param_hint="--sample") from None
    if size < 1:
        raise click.BadParameter("must be at least 1.", param_hint="--sample")
    return size


# These modules import the helpers above, so they are imported last.
from onnxeps.cli_gate import gate_command  # noqa: E402
from onnxeps.cli_screen import screen_command  # noqa: E402

main.add_command(gate_command)
main.add_command(screen_command)
