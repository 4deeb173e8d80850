"""The ``onnxeps screen`` command: epsilon beside cost columns and the Pareto front.

Exit codes as ``score``: 0 every model yields a record, 1 a model could not be scored
(the others are still reported) or the plot could not be written, 2 a usage error.
Import this module through :mod:`onnxeps.cli`, which registers the command.
"""

from __future__ import annotations

import logging
import sys

import click

from onnxeps.cli_common import (
    check_input_choice,
    scoring_options,
    SCORE_COLUMNS,
    check_folder,
    configure_logging,
    output_options,
    report_error,
    resolve_format,
    verbosity_options,
    write_or_fail,
)
from onnxeps.errors import OnnxepsError
from onnxeps.pareto import pareto_plot
from onnxeps.report import render
from onnxeps.screen import (
    COST_COLUMNS,
    DEFAULT_LATENCY_RUNS,
    MACS_CONVENTION,
    SCREEN_COLUMNS,
    mark_pareto,
    screen_model,
)

__all__ = ["screen_command", "SCREEN_RECORD_COLUMNS"]

log = logging.getLogger("onnxeps")

SCREEN_RECORD_COLUMNS = [*SCORE_COLUMNS, *SCREEN_COLUMNS]
SCREEN_TABLE_COLUMNS = ["model", "epsilon", *SCREEN_COLUMNS]


def _screen_all(models, input_path, latency_runs, options) -> list[dict]:
    """Screen each model; log a model that fails and go on with the others."""
    records = []
    for index, model in enumerate(models, start=1):
        log.info("[%d/%d] screening %s", index, len(models), model)
        try:
            record = screen_model(model, input_path, latency_runs=latency_runs, **options)
        except Exception as error:  # one failing model must not stop the others
            report_error(model, error)
            continue
        for warning in record["warnings"]:
            log.warning("%s: %s", model, warning)
        records.append(record)
    return records


def _summarise(records: list[dict], total: int, cost_column: str, quiet: int) -> None:
    """Print the coverage line to stderr (a summary, not a warning), unless -q."""
    if quiet:
        return
    defined = sum(1 for r in records if r["epsilon"] is not None)
    front = sum(1 for r in records if r["pareto"])
    click.echo(
        f"coverage: {defined}/{total} models have a defined epsilon "
        f"({len(records) - defined} undefined, {total - len(records)} failed); {front} "
        f"on the Pareto front of epsilon against {cost_column}",
        err=True,
    )


@click.command("screen")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--latency-runs", type=click.IntRange(min=0), default=DEFAULT_LATENCY_RUNS, show_default=True, help="Timed ONNX Runtime runs per batch size, after 3 warm-up runs and within --timeout seconds; 0 skips the latency columns.")
@click.option("--cost-column", type=click.Choice(COST_COLUMNS), default="macs", show_default=True, help="Cost that the Pareto front minimises (while maximising epsilon).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG of epsilon against the cost column, Pareto front highlighted; needs onnxeps[plot].")
@scoring_options
@output_options
@verbosity_options
def screen_command(models, latency_runs, cost_column, plot_path, input_path, synthetic, fmt, output_path, verbose, quiet, **options) -> None:
    """Score each MODEL and report its size, MACs, activation memory and latency."""
    configure_logging(verbose, quiet)
    check_input_choice(input_path, synthetic)
    fmt = resolve_format(fmt, output_path, models)
    check_folder(plot_path)
    options["synthetic"] = synthetic
    records = _screen_all(models, input_path, latency_runs, options)
    mark_pareto(records, cost_column)
    text = render(records, fmt, SCREEN_RECORD_COLUMNS, SCREEN_TABLE_COLUMNS)
    if fmt == "table" and records:
        text += f"{MACS_CONVENTION}; pareto: max epsilon, min {cost_column}\n"
    write_or_fail(text, output_path)
    log.info("%s", MACS_CONVENTION)
    if len(models) > 1:
        _summarise(records, len(models), cost_column, quiet)
    if plot_path is not None:
        try:
            pareto_plot(records, cost_column, plot_path)
        except OnnxepsError as error:
            log.error("%s", error)
            sys.exit(1)
    if len(records) < len(models):
        sys.exit(1)
