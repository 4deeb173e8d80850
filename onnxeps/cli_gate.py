"""The ``onnxeps gate`` command: pass or fail a model on its epsilon, for CI.

Exit codes: 0 every check passed, 1 a check failed, 2 a usage error or a model or input
that cannot be evaluated, 3 an epsilon is undefined (the reason is logged). Import this
module through :mod:`onnxeps.cli`, which registers the command.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

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
)
from onnxeps.gate import CHECK_COLUMNS, GateResult, run_gate, write_junit
from onnxeps.report import render, write_output

__all__ = ["gate_command", "GATE_COLUMNS", "GATE_TABLE_COLUMNS"]

log = logging.getLogger("onnxeps")

# CSV carries score and check records in one table: each row fills the columns of its kind.
GATE_COLUMNS = ["kind", *SCORE_COLUMNS]
GATE_COLUMNS += [column for column in CHECK_COLUMNS if column not in SCORE_COLUMNS]
GATE_TABLE_COLUMNS = [
    "check", "model", "epsilon", "baseline_epsilon", "drop_pct", "threshold", "status",
    "message",
]  # fmt: skip
# A failed write must not exit 1, which means "a check failed".
_WRITE_FAILED_EXIT = 2


def _validate_checks(min_epsilon, baseline, max_drop) -> None:
    if baseline is not None and max_drop is None:
        raise click.UsageError("--baseline needs --max-drop PCT.")
    if max_drop is not None and baseline is None:
        raise click.UsageError("--max-drop needs --baseline OLD.onnx.")
    if min_epsilon is None and baseline is None:
        raise click.UsageError(
            "nothing to check: give --min-epsilon X, --baseline OLD.onnx --max-drop PCT, "
            "or both."
        )


def _check_junit_path(junit_path: str | None, output_path: str | None, models: list[str]) -> None:
    if junit_path is None:
        return
    if any(Path(junit_path).resolve() == Path(m).resolve() for m in models):
        raise click.UsageError(f"--junit {junit_path} would overwrite an input model.")
    same_as_output = output_path is not None and (
        Path(junit_path).resolve() == Path(output_path).resolve()
    )
    if same_as_output:
        raise click.UsageError("--junit and -o name the same file; give two paths.")
    check_folder(junit_path)


def _log_outcome(gate: GateResult) -> None:
    """Log each error, undefined reason and failure as one line, then a summary."""
    for name, error in gate.errors:
        report_error(name, error)
    reasons = []
    for check in gate.checks:
        if check.status == "undefined" and check.message not in reasons:
            reasons.append(check.message)
            log.error("%s", check.message)
        elif check.status == "failed":
            log.error("%s failed: %s", check.check, check.message)
        elif check.status == "passed":
            log.info("%s passed: %s", check.check, check.message)
    for result in gate.scores:
        for warning in result.warnings:
            log.warning("%s: %s", result.model, warning)
    passed = sum(check.passed for check in gate.checks)
    log.info(
        "gate: %d of %d checks passed (exit %d)", passed, len(gate.checks), gate.exit_code
    )


def _write(write, path: str) -> None:
    try:
        write()
    except OSError as error:
        log.error("cannot write %s: %s", path, error.strerror or error)
        sys.exit(_WRITE_FAILED_EXIT)


@click.command("gate")
@click.argument("model", type=click.Path())
@click.option("--min-epsilon", type=click.FloatRange(min=0), help="Fail unless epsilon is at least X.")
@click.option("--baseline", "baseline_path", type=click.Path(), help="Baseline model (OLD.onnx), scored with the same batch and settings.")
@click.option("--max-drop", type=click.FloatRange(min=0), help="Largest allowed drop of epsilon below the baseline's, in percent of the baseline's.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Also write a JUnit XML report to FILE (atomically): one testcase per check.")
@scoring_options
@output_options
@verbosity_options
def gate_command(model, min_epsilon, baseline_path, max_drop, junit_path, input_path, synthetic, fmt, output_path, verbose, quiet, **options) -> None:
    """Check MODEL's epsilon against a minimum and/or a baseline model.

    Exit codes: 0 every check passed, 1 a check failed, 2 usage error or a model or
    input that cannot be evaluated, 3 epsilon undefined.
    """
    configure_logging(verbose, quiet)
    models = [model] if baseline_path is None else [model, baseline_path]
    _validate_checks(min_epsilon, baseline_path, max_drop)
    check_input_choice(input_path, synthetic)
    fmt = resolve_format(fmt, output_path, models)
    _check_junit_path(junit_path, output_path, models)
    gate = run_gate(
        model, input_path, min_epsilon=min_epsilon, baseline=baseline_path,
        max_drop_pct=max_drop, synthetic=synthetic, **options,
    )  # fmt: skip
    _log_outcome(gate)
    if fmt == "table":
        records = [check.record() for check in gate.checks]
    else:
        records = gate.records()
    text = render(records, fmt, GATE_COLUMNS, GATE_TABLE_COLUMNS)
    _write(lambda: write_output(text, output_path), output_path)
    if junit_path is not None:
        _write(lambda: write_junit(gate, junit_path), junit_path)
    sys.exit(gate.exit_code)
