"""The onnxeps command line: score, plan and convert models.

Exit codes: 0 success, 1 error (invalid or missing input, runtime failure), 2 usage
error. ``score`` exits 1 when any model could not be scored; the others are still
reported. Records go to stdout (or -o FILE); logs, warnings and summaries to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import partial
from pathlib import Path

import click

from onnxeps.cli_gate import gate_command
from onnxeps.cli_screen import screen_command
from onnxeps.cli_common import (
    SCORE_COLUMNS,
    check_folder,
    check_input_choice,
    check_weights,
    configure_logging,
    output_options,
    progress_printer,
    protect_inputs,
    report_error,
    resolve_format,
    scoring_options,
    streamed_output_options,
    verbosity_options,
    write_or_fail,
)
from onnxeps.cli_score import (
    check_engine,
    engine_options,
    expand_models,
    open_records,
    score_into,
    summarise,
    warn_mixed_settings,
)
from onnxeps.converters.cli import convert
from onnxeps.engine import make_task
from onnxeps.errors import OnnxepsError
from onnxeps.inputs import SYNTHETIC_KINDS
from onnxeps.presets import PRESETS
from onnxeps.report import json_ready, render
from onnxeps.runtime import DEVICES
from onnxeps.score import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN

log = logging.getLogger("onnxeps")

SCORE_TABLE_COLUMNS = ["model", "epsilon", "reason", "batch_size", "input", "provider", "seconds"]
PLAN_COLUMNS = [
    "model", "tensor", "graph", "source", "shape", "dtype", "role", "action", "reason",
    "split",
]  # fmt: skip
PLAN_TABLE_COLUMNS = ["tensor", "shape", "dtype", "role", "action", "split", "reason"]
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxeps")
def main() -> None:
    """Score neural-network architectures from ONNX files with epsilon (epsinas)."""


@main.command("score")
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--list", "list_path", type=click.Path(exists=True, dir_okay=False), help="Also score the model paths in FILE, one a line; blank lines and lines starting with # are skipped.")
@scoring_options
@engine_options
@click.option("--resume", is_flag=True, help="Keep the records already in the -o FILE (json or csv), skip their models and append the others.")
@streamed_output_options
@verbosity_options
def score_command(models, list_path, input_path, synthetic, jobs, engine, address, use_cache, resume, fmt, output_path, verbose, quiet, **options) -> None:
    """Score each MODEL with epsilon: an .onnx file, a folder of them or a glob pattern."""
    configure_logging(verbose, quiet)
    paths = expand_models(models, list_path)
    protect_inputs(output_path, [input_path, list_path])
    fmt = resolve_format(fmt, output_path, paths)
    check_input_choice(input_path, synthetic)
    check_engine(engine, address)
    try:
        sink = open_records(fmt, output_path, resume, SCORE_COLUMNS, SCORE_TABLE_COLUMNS)
    except OnnxepsError as error:
        log.error("%s", error)
        sys.exit(1)
    # Paths match as written up to spelling (./a.onnx is a.onnx). A relative path is not
    # resolved, because the records may come from a run in another folder.
    recorded = {os.path.normpath(model): record for model, record in sink.previous.items()}
    todo = [path for path in paths if os.path.normpath(path) not in recorded]
    if len(todo) < len(paths):
        log.info("%s: %d of %d models already recorded", output_path, len(paths) - len(todo), len(paths))
    task = make_task(
        input_path, options | {"synthetic": synthetic}, cache=use_cache,
        setup=partial(configure_logging, verbose, quiet),
    )  # fmt: skip
    records = score_into(sink, todo, task, workers=jobs, engine=engine, address=address)
    warn_mixed_settings(output_path, sink.previous.values(), records)
    if len(paths) > 1:
        earlier = [
            recorded[os.path.normpath(path)]
            for path in paths
            if os.path.normpath(path) in recorded
        ]
        summarise(records + earlier, len(paths), quiet)
    if len(records) < len(todo):
        sys.exit(1)


main.add_command(convert)


@main.command("plan")
@click.argument("model", type=click.Path())
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Use a benchmark's roles (nlp: recurrent biases and states take w).")
@click.option("--strict", is_flag=True, help="Exit 1 when a float tensor cannot be classified.")
@output_options
@verbosity_options
def plan_command(model, preset, strict, fmt, output_path, verbose, quiet) -> None:
    """Print every float tensor of MODEL with its shape, role, action and reason."""
    from onnxeps import plan as build

    configure_logging(verbose, quiet)
    fmt = resolve_format(fmt, output_path, [model])
    recurrent = preset is not None and PRESETS[preset].recurrent_as_weight
    try:
        result = build(model, recurrent_as_weight=recurrent)
    except Exception as error:  # report_error turns any failure into one line
        report_error(model, error)
        sys.exit(1)
    records = [{"model": model, **entry.record()} for entry in result.entries]
    write_or_fail(render(records, fmt, PLAN_COLUMNS, PLAN_TABLE_COLUMNS), output_path)
    if not records:
        log.warning("%s: the model has no floating-point constants", model)
    for warning in result.warnings:
        log.warning("%s: %s", model, warning)
    if result.quantized:
        log.warning("%s: quantized weights (%s); score rejects this model", model, ", ".join(result.quantized[:3]))
    if strict and result.unclassified():
        log.error("%s: %d unclassified float tensors and --strict is set", model, len(result.unclassified()))
        sys.exit(1)


@main.command("bench")
@click.argument("space", type=click.Choice(["nb201", "nb101", "nlp"]))
@click.option("--truth", type=click.Path(exists=True, dir_okay=False), required=True, help="Ground-truth CSV of the space.")
@click.option("--sample", default="all", show_default=True, help="Number of architectures drawn uniformly, or 'all'.")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the architecture sample.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), help="Input batch (.npz images, or PTB text .zip for nlp).")
@click.option("--synthetic", type=click.Choice(SYNTHETIC_KINDS), help="Synthetic input kind.")
@click.option("--batch-size", type=click.IntRange(min=1), help=f"Samples in the batch. [default: {DEFAULT_BATCH_SIZE}]")
@click.option("--weights", nargs=2, type=float, callback=check_weights, help="The two constant weights. [default: the space's preset]")
@click.option("--metric-column", help="Ground-truth column. [default: test_acc_c10, val_accuracy, ptb_test_loss]")
@click.option("--seq-len", type=click.IntRange(min=1), help=f"nlp: time steps the models are unrolled over and scored. [default: {DEFAULT_SEQ_LEN}]")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Execution provider.")
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), help="Report format. [default: from -o, else md]")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), help="Write the report to FILE.")
@click.option("--records", "records_path", type=click.Path(dir_okay=False), help="Write per-model score records (JSON Lines) to FILE.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a scatter plot PNG (score against truth) to FILE; needs onnxeps[plot].")
@engine_options
@verbosity_options
def bench_command(space, truth, sample, sample_seed, input_path, synthetic, records_path, plot_path, fmt, output_path, jobs, engine, address, use_cache, verbose, quiet, **options) -> None:
    """Score architectures of SPACE and rank them against the ground truth."""
    import json as json_module

    from onnxeps.bench import render_markdown, run_bench

    configure_logging(verbose, quiet)
    check_input_choice(input_path, synthetic)
    check_engine(engine, address)
    size = _parse_sample(sample)
    for path in (output_path, records_path, plot_path):
        check_folder(path)
        protect_inputs(path, [truth, input_path])
    fmt = fmt or ("json" if output_path and output_path.endswith(".json") else "md")
    bar, update = progress_printer(f"scoring {space}")
    try:
        result = run_bench(
            space, Path(truth), sample=size, sample_seed=sample_seed,
            inputs=Path(input_path) if input_path else None, synthetic=synthetic,
            progress=update, jobs=jobs, cache=use_cache,
            engine=engine, address=address,
            worker_setup=partial(configure_logging, verbose, quiet), **options,
        )  # fmt: skip
    except OnnxepsError as error:
        log.error("%s", error)
        sys.exit(1)
    finally:
        if bar is not None:
            bar.render_finish()
    if records_path is not None:
        write_or_fail(render(result.records, "json", []), records_path)
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
    write_or_fail(text, output_path)
    if result.summary["failed"]:
        log.error("%d architectures could not be scored", result.summary["failed"])
        sys.exit(1)


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


main.add_command(gate_command)
main.add_command(screen_command)
