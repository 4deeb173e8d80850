"""Write per-model records as a table, JSON Lines or CSV, to stdout or atomically to a file."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "FORMATS",
    "format_from_path",
    "render",
    "write_output",
    "atomic_write",
    "atomic_write_text",
    "encode_text",
    "json_ready",
]

FORMATS = ("table", "json", "csv")
_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".txt": "table",
    ".table": "table",
}


def format_from_path(path: str | os.PathLike) -> str | None:
    """Return the format an output file's extension names, or None."""
    return _EXTENSIONS.get(Path(path).suffix.lower())


def json_ready(value):
    """Return the value with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _render_json(records: Sequence[dict]) -> str:
    lines = [
        json.dumps(json_ready(record), allow_nan=False)
        for record in records
    ]
    return "".join(line + "\n" for line in lines)


def _render_csv(records: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_csv_value(record.get(column)) for column in columns])
    return buffer.getvalue()


def _table_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return ",".join(_table_cell(v) for v in value) or "-"
    return str(value)


def _render_table(records: Sequence[dict], columns: Sequence[str]) -> str:
    if not records:
        return ""
    rows = [[_table_cell(record.get(column)) for column in columns] for record in records]
    widths = [
        max([len(column), *(len(row[i]) for row in rows)])
        for i, column in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines) + "\n"


def render(
    records: Sequence[dict],
    fmt: str,
    columns: Sequence[str],
    table_columns: Sequence[str] | None = None,
) -> str:
    """Render records; CSV and JSON carry every column, the table a readable subset."""
    if fmt == "json":
        return _render_json(records)
    if fmt == "csv":
        return _render_csv(records, columns)
    return _render_table(records, table_columns or columns)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def encode_text(text: str) -> bytes:
    """Encode text as UTF-8, writing the surrogate escapes of undecodable path bytes
    back as the original bytes."""
    return text.encode("utf-8", errors="surrogateescape")


def _write_in_place(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    with open(path, "wb") as stream:
        write(stream)


def _replace_atomically(target: Path, write: Callable[[IO[bytes]], None]) -> None:
    folder = target.parent if str(target.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that readers see the old content or the new, never a part.

    ``write`` fills a temporary file in the target's folder, which then replaces the
    target; the file gets the usual permissions (0666 less the umask). A symlink is
    followed, so the file it points to is replaced and the link kept. A target that
    exists but is not a regular file (a FIFO, a device) is written in place, not
    atomically, because replacing it would put a regular file where it was.
    """
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        _write_in_place(target, write)
    else:
        _replace_atomically(target, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically (see :func:`atomic_write` and :func:`encode_text`)."""
    atomic_write(path, lambda stream: stream.write(encode_text(text)))


def _write_stdout(text: str) -> None:
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream, e.g. one a test put in place
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    buffer.write(encode_text(text))
    buffer.flush()


def write_output(text: str, path: str | os.PathLike | None) -> None:
    """Write rendered records to the file, or to stdout when path is None.

    Both get UTF-8 bytes; see :func:`encode_text` for paths that are not UTF-8.
    """
    if path is None:
        _write_stdout(text)
    else:
        atomic_write_text(path, text)
