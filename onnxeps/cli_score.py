"""Pieces of ``onnxeps score`` over many models.

This module expands the model arguments (directories, glob patterns, ``--list``). Records
go to a sink: either one that renders them at the end, or a JSON Lines or CSV file that
gets one line per model as soon as the model is done. ``--resume`` continues such a file.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import click

from onnxeps.cli_common import progress_printer, write_or_fail
from onnxeps.engine import ENGINES, Job, Outcome, Task, default_jobs, run_jobs
from onnxeps.errors import OnnxepsError
from onnxeps.report import render

__all__ = [
    "CollectedRecords",
    "StreamedRecords",
    "check_engine",
    "consume",
    "engine_options",
    "expand_models",
    "open_records",
    "score_into",
    "summarise",
]

log = logging.getLogger("onnxeps")

_GLOB_CHARACTERS = frozenset("*?[")


# ----- model arguments -----


def _read_list(path: str) -> list[str]:
    """Return the paths of a --list file: one a line, blank and # lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise click.UsageError(f"cannot read the model list {path}: {error}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _onnx_files_below(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, name) for name in names if name.endswith(".onnx")]
    return sorted(found)


def _expand(argument: str) -> list[str]:
    """Return the model paths one argument names; a missing plain path stays as is."""
    if os.path.isdir(argument):
        found = _onnx_files_below(argument)
        if not found:
            raise click.UsageError(f"{argument}: no .onnx file in this folder or below.")
        return found
    if os.path.exists(argument) or not _GLOB_CHARACTERS & set(argument):
        return [argument]
    matches = sorted(glob.glob(argument, recursive=True))
    if not matches:
        raise click.UsageError(f"{argument}: no file matches this pattern.")
    return [path for match in matches for path in _expand(match)]


def expand_models(arguments: Sequence[str], list_path: str | None) -> list[str]:
    """Return the model paths named by the arguments and the --list file, each once.

    A directory names every ``*.onnx`` file below it, sorted; a glob pattern (``**``
    included) names its sorted matches. A path is kept as written; two spellings of
    one file count as one, the first kept. Raises click.UsageError for a directory or
    pattern that names no file.
    """
    names = [*arguments, *(_read_list(list_path) if list_path is not None else [])]
    if not names:
        raise click.UsageError("missing argument MODELS... (or --list FILE).")
    models, seen = [], set()
    for name in names:
        for path in _expand(name):
            identity = os.path.realpath(path)
            if identity not in seen:
                seen.add(identity)
                models.append(path)
    return models


# ----- engine options -----


def engine_options(function):
    """Add -j/--jobs, --engine, --address and --no-cache."""
    options = [
        click.option("-j", "--jobs", type=click.IntRange(min=1), help=f"Worker processes, each scoring one model at a time; 1 scores in this process. [default: one per CPU core, here {default_jobs()}]"),
        click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True, help="Where the workers run: local processes, or a Ray cluster (needs ray)."),
        click.option("--address", help="Address of the Ray cluster for --engine ray. [default: a local Ray instance]"),
        click.option("--no-cache", "use_cache", flag_value=False, default=True, help="Neither read nor write the result cache ($ONNXEPS_CACHE_DIR, else $XDG_CACHE_HOME/onnxeps, else ~/.cache/onnxeps)."),
    ]  # fmt: skip
    for option in reversed(options):
        function = option(function)
    return function


def check_engine(engine: str, address: str | None) -> None:
    """Raise a usage error when --address is given without --engine ray."""
    if address is not None and engine != "ray":
        raise click.UsageError("--address needs --engine ray.")


# ----- record sinks -----


class CollectedRecords:
    """Records kept in memory and rendered at the end, in input order."""

    def __init__(self, fmt: str, path: str | None, columns, table_columns) -> None:
        self.fmt, self.path = fmt, path
        self.columns, self.table_columns = columns, table_columns
        self.previous: dict[str, dict] = {}
        self._records: dict[int, dict] = {}

    def add(self, record: dict, index: int) -> None:
        self._records[index] = record

    def close(self) -> None:
        records = [self._records[index] for index in sorted(self._records)]
        write_or_fail(render(records, self.fmt, self.columns, self.table_columns), self.path)


def _drop_partial_line(path: Path) -> None:
    """Truncate the file after its last newline: an interrupted write leaves a part."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.info("%s: dropping an incomplete last line (%d bytes)", path, len(data) - end)
        with open(path, "r+b") as stream:
            stream.truncate(end)


def _read_json_lines(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            try:
                record = json.loads(line)
            except ValueError as error:
                raise OnnxepsError(
                    f"{path}: line {number} is not a JSON record ({error}).",
                    "Delete the line, or rerun without --resume to replace the file.",
                ) from None
            if not isinstance(record, dict) or "model" not in record:
                raise OnnxepsError(
                    f"{path}: line {number} is not a score record (no 'model' key).",
                    "Delete the line, or rerun without --resume to replace the file.",
                )
            records.append(record)
    return records


def _read_csv_rows(path: Path, columns: Sequence[str]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
        header = reader.fieldnames
    if header is not None and list(header) != list(columns):
        raise OnnxepsError(
            f"{path}: the CSV header is not the score record's columns, so the file was "
            "not written by onnxeps score.",
            "Pass another -o FILE, or rerun without --resume to replace the file.",
        )
    return [row | {"epsilon": row["epsilon"] or None} for row in rows]


def _csv_line(record: dict, columns: Sequence[str]) -> str:
    return render([record], "csv", columns).split("\n", 1)[1]


class StreamedRecords:
    """A JSON Lines or CSV file that gets each record in one unbuffered write.

    With ``resume`` the records already in the file are read into ``previous`` (by
    model) and new records are appended. Otherwise the file is replaced.
    """

    def __init__(self, fmt: str, path: str, columns, resume: bool) -> None:
        self.fmt, self.path, self.columns = fmt, Path(path), columns
        self.previous = {r["model"]: r for r in self._read()} if resume else {}
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if resume else os.O_TRUNC)
        self._fd = os.open(self.path, flags, 0o666)
        if fmt == "csv" and os.fstat(self._fd).st_size == 0:
            self._write(render([], "csv", columns))

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        _drop_partial_line(self.path)
        if self.fmt == "csv":
            return _read_csv_rows(self.path, self.columns)
        return _read_json_lines(self.path)

    def _write(self, text: str) -> None:
        data = text.encode("utf-8")
        while data:
            data = data[os.write(self._fd, data):]

    def add(self, record: dict, index: int) -> None:
        if self.fmt == "csv":
            self._write(_csv_line(record, self.columns))
        else:
            self._write(render([record], "json", self.columns))

    def close(self) -> None:
        os.close(self._fd)


def open_records(fmt: str, path: str | None, resume: bool, columns, table_columns):
    """Return the sink of a run: streamed for a JSON Lines or CSV file, else collected."""
    if resume and (path is None or fmt not in ("json", "csv")):
        raise click.UsageError("--resume needs -o FILE with format json or csv.")
    if path is None or fmt == "table":
        return CollectedRecords(fmt, path, columns, table_columns)
    try:
        return StreamedRecords(fmt, path, columns, resume)
    except OSError as error:
        log.error("cannot open %s: %s", path, error.strerror or error)
        raise SystemExit(1) from None


# ----- the run -----


def _log_outcome(outcome: Outcome, done: int, total: int) -> None:
    if outcome.error is not None:
        log.error("%s", outcome.error)
        if outcome.traceback is not None:
            log.debug("%s", outcome.traceback)
        return
    source = " (from the cache)" if outcome.cached else ""
    log.info("[%d/%d] scored %s%s", done, total, outcome.label, source)
    for warning in outcome.record["warnings"]:
        log.warning("%s: %s", outcome.label, warning)


def consume(outcomes: Iterable[Outcome], sink, total: int, progress) -> list[dict]:
    """Log each outcome, pass its record to the sink and return the records."""
    records = []
    for done, outcome in enumerate(outcomes, start=1):
        _log_outcome(outcome, done, total)
        if outcome.record is not None:
            sink.add(outcome.record, outcome.index)
            records.append(outcome.record)
        if progress is not None:
            progress(done, total)
    return records


def summarise(records: list[dict], total: int, quiet: int) -> None:
    """Print the coverage line to stderr (a summary, not a warning), unless -q."""
    if quiet:
        return
    defined = sum(1 for record in records if record["epsilon"] is not None)
    failed = total - len(records)
    click.echo(
        f"coverage: {defined}/{total} models have a defined epsilon "
        f"({len(records) - defined} undefined, {failed} failed); undefined scores are "
        "null in the records",
        err=True,
    )


def score_into(sink, paths: list[str], task: Task, *, workers: int, engine: str, address) -> list[dict]:
    """Score the paths through the engine into the sink and return the new records.

    An engine that fails to start exits with status 1. Ctrl-C stops the workers,
    closes the sink (a streamed file keeps every whole record) and exits with status
    130.
    """
    bar, update = progress_printer("scoring")
    jobs = [Job.file(path) for path in paths]
    try:
        outcomes = run_jobs(jobs, task, workers=workers, engine=engine, address=address)
        records = consume(outcomes, sink, len(jobs), update)
    except OnnxepsError as error:  # the engine could not start, e.g. ray is missing
        log.error("%s", error)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if isinstance(sink, StreamedRecords):
            sink.close()
            log.error("interrupted: the finished records are in %s, and --resume scores the rest", sink.path)
        else:
            log.error("interrupted")
        raise SystemExit(130) from None
    finally:
        if bar is not None:
            bar.render_finish()
    sink.close()
    return records
