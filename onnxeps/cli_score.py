"""Pieces of ``onnxeps score`` over many models.

This module expands the model arguments (directories, glob patterns, ``--list``). Records
go to a sink: either one that renders them at the end, or a JSON Lines or CSV file that
gets one line per model as soon as the model is done. ``--resume`` continues such a file.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path

import click

from onnxeps.cli_common import progress_printer, write_or_fail
from onnxeps.engine import ENGINES, Job, Outcome, Task, default_jobs, run_jobs
from onnxeps.errors import OnnxepsError
from onnxeps.report import encode_text, render
from onnxeps.score import RECORD_KEYS

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
    "warn_mixed_settings",
]

log = logging.getLogger("onnxeps")

_GLOB_CHARACTERS = frozenset("*?[")


# ----- model arguments -----


def _read_list(path: str) -> list[str]:
    """Return the paths of a --list file: one a line, blank and # lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise click.UsageError(f"cannot read the model list {path}: {error}") from None
    paths = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if "\0" in line:
            raise click.UsageError(
                f"model list {path}: line {number} contains a NUL byte, which no file "
                "path can contain; remove it."
            )
        if line and not line.startswith("#"):
            paths.append(line)
    return paths


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
    # A matched folder (even one named like a model) adds the models below it, if any.
    found = [
        path
        for match in matches
        for path in (_onnx_files_below(match) if os.path.isdir(match) else [match])
    ]
    if not found:
        raise click.UsageError(f"{argument}: no file matches this pattern.")
    return found


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
        click.option("-j", "--jobs", type=click.IntRange(min=1), help=f"Worker processes, each scoring one model at a time; 1 scores in this process. [default: one per CPU core, here {default_jobs()}, or with --engine ray one per CPU of the cluster]"),
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


_NOT_RECORDS_HINT = "Pass another -o FILE, or rerun without --resume to replace the file."


class RecordWriteError(OnnxepsError):
    """A record could not be written to the streamed -o file."""


def _split_complete_lines(data: bytes) -> tuple[bytes, bytes]:
    """Split the file content after its last newline: an interrupted write leaves a
    part of a line after it."""
    end = data.rfind(b"\n") + 1
    return data[:end], data[end:]


def _decode(data: bytes) -> str:
    # surrogateescape keeps the bytes of model paths that are not UTF-8, which the
    # CSV sink writes as they are (JSON Lines escapes them).
    return data.decode("utf-8", errors="surrogateescape")


def _check_score_record(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise OnnxepsError(
            f"{path}: line {number} is not a JSON record ({error}).",
            "Delete the line, or rerun without --resume to replace the file.",
        ) from None
    missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
    if missing or not isinstance(record["model"], str):
        problem = f"no {missing[0]!r} key" if missing else "'model' is not a string"
        raise OnnxepsError(
            f"{path}: line {number} is not an onnxeps score record ({problem}).",
            _NOT_RECORDS_HINT,
        )
    return record


def _parse_json_lines(path: Path, text: str) -> list[dict]:
    lines = text.split("\n")[:-1]  # the text ends with a newline, or is empty
    return [_check_score_record(path, number, line) for number, line in enumerate(lines, start=1)]


def _check_json_tail(path: Path, number: int, tail: str) -> None:
    """Reject a last line that cannot be the start of a score record."""
    start = '{"model": '
    if not (tail.startswith(start) or start.startswith(tail)):
        raise OnnxepsError(
            f"{path}: line {number} is not a JSON score record and does not end with "
            "a newline.",
            _NOT_RECORDS_HINT,
        )


def _parse_csv(path: Path, text: str, tail: str, columns: Sequence[str]) -> list[dict]:
    rows = list(csv.reader(io.StringIO(text)))
    header_line = render([], "csv", columns)
    header_matches = rows[0] == list(columns) if rows else header_line.startswith(tail)
    if not header_matches:
        raise OnnxepsError(
            f"{path}: line 1, the CSV header, is not the score record's columns, so the "
            "file was not written by onnxeps score.",
            _NOT_RECORDS_HINT,
        )
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns):
            raise OnnxepsError(
                f"{path}: CSV row {number} has {len(row)} fields, not the score record's "
                f"{len(columns)}.",
                _NOT_RECORDS_HINT,
            )
    records = [dict(zip(columns, row)) for row in rows[1:]]
    return [record | {"epsilon": record["epsilon"] or None} for record in records]


def _read_records(path: Path, fmt: str, columns: Sequence[str]) -> list[dict]:
    """Return the records of a file written by ``onnxeps score``, dropping an
    incomplete last line only once every complete line checked out.

    Raises OnnxepsError, leaving the file unchanged, when it is not such a file.
    """
    complete, partial = _split_complete_lines(path.read_bytes())
    text, tail = _decode(complete), _decode(partial)
    if fmt == "csv":
        records = _parse_csv(path, text, tail, columns)
    else:
        records = _parse_json_lines(path, text)
        if tail:
            _check_json_tail(path, len(records) + 1, tail)
    if partial:
        log.info("%s: dropping an incomplete last line (%d bytes)", path, len(partial))
        with open(path, "r+b") as stream:
            stream.truncate(len(complete))
    return records


def _csv_line(record: dict, columns: Sequence[str]) -> str:
    return render([record], "csv", columns).split("\n", 1)[1]


# Record fields that describe how a model was scored, which a resumed run should share.
_SETTING_KEYS = ("weights", "batch_size", "preset")


def _cell(value) -> str:
    """Return a value as the text of its CSV cell, so that records read back from a
    CSV file (all text) compare equal to the records they were written from."""
    return _csv_line({"value": value}, ["value"]).strip().strip('"')


def _either(cells: list[str]) -> str:
    return " or ".join(cell or "none" for cell in cells)


def _cells(records, key: str) -> list[str]:
    """Return the distinct CSV cells of one field, rendering each distinct value once."""
    distinct = {repr(record.get(key)): record.get(key) for record in records}
    return sorted({_cell(value) for value in distinct.values()})


def warn_mixed_settings(path: str, kept_records, new_records) -> None:
    """Warn when the records that --resume kept were scored with other weights, batch
    size or preset than the records of this run."""
    changed = []
    for key in _SETTING_KEYS:
        before = _cells(kept_records, key)
        now = _cells(new_records, key)
        if before and now and before != now:
            changed.append(f"{key} {_either(before)} before, {_either(now)} now")
    if changed:
        log.warning(
            "%s now mixes settings: %s. Rerun without --resume to score every model "
            "the same way.", path, "; ".join(changed),
        )  # fmt: skip


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
            try:
                self._write(render([], "csv", columns))
            except RecordWriteError:
                self.close()
                raise

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return _read_records(self.path, self.fmt, self.columns)

    def _write(self, text: str) -> None:
        data = encode_text(text)
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as error:
            raise RecordWriteError(f"cannot write {self.path}: {error.strerror or error}") from None

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


def score_into(sink, paths: list[str], task: Task, *, workers: int | None, engine: str, address) -> list[dict]:
    """Score the paths through the engine into the sink and return the new records.

    An engine that fails to start, or a failed write to a streamed file, exits with
    status 1; the write failure stops the workers first. Ctrl-C stops the workers,
    closes the sink (a streamed file keeps every whole record) and exits with status
    130.
    """
    bar, update = progress_printer("scoring")
    jobs = [Job.file(path) for path in paths]
    outcomes = run_jobs(jobs, task, workers=workers, engine=engine, address=address)
    try:
        with closing(outcomes):  # closing stops the workers when the loop ends early
            records = consume(outcomes, sink, len(jobs), update)
    except RecordWriteError as error:
        sink.close()
        log.error("%s", error)
        raise SystemExit(1) from None
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
