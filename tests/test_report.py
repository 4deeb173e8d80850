"""Tests of record rendering (table, JSON Lines, CSV) and atomic file output."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from onnxeps.report import (
    atomic_write_text,
    format_from_path,
    render,
    write_output,
)

_COLUMNS = ["model", "epsilon", "reason", "weights", "warnings", "split"]
_RECORDS = [
    {
        "model": "a.onnx",
        "epsilon": 0.123456789,
        "reason": None,
        "weights": [1e-07, 1.0],
        "warnings": [],
        "split": False,
    },
    {
        "model": "b.onnx",
        "epsilon": float("nan"),
        "reason": "run 1 output is constant (0.0)",
        "weights": [1e-07, 1.0],
        "warnings": ["one, with a comma", "two"],
        "split": True,
    },
]


def test_render_json_lines():
    text = render(_RECORDS, "json", _COLUMNS)
    lines = text.splitlines()
    assert len(lines) == 2
    assert text.endswith("\n")
    first = json.loads(lines[0])
    assert list(first) == _COLUMNS
    assert first["epsilon"] == 0.123456789
    assert first["weights"] == [1e-07, 1.0]


def test_render_json_nan_null():
    second = json.loads(render(_RECORDS, "json", _COLUMNS).splitlines()[1])
    assert second["epsilon"] is None
    assert second["reason"] == "run 1 output is constant (0.0)"


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_render_json_infinity_null(value):
    record = json.loads(render([{"epsilon": value}], "json", ["epsilon"]))
    assert record["epsilon"] is None


def test_render_json_empty():
    assert render([], "json", _COLUMNS) == ""


def test_render_csv_columns():
    text = render(_RECORDS, "csv", _COLUMNS)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == _COLUMNS
    assert len(rows) == 3
    assert rows[1] == ["a.onnx", "0.123456789", "", "[1e-07, 1.0]", "[]", "false"]


def test_render_csv_lists_as_json():
    rows = list(csv.reader(io.StringIO(render(_RECORDS, "csv", _COLUMNS))))
    assert json.loads(rows[2][4]) == ["one, with a comma", "two"]
    assert rows[2][5] == "true"


def test_render_csv_missing_column_empty():
    text = render([{"model": "a"}], "csv", ["model", "x"])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1] == ["a", ""]


def test_render_csv_header_without_records():
    assert render([], "csv", ["model", "epsilon"]) == "model,epsilon\n"


def test_render_table_subset():
    text = render(_RECORDS, "table", _COLUMNS, ["model", "epsilon", "reason"])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "epsilon", "reason"]
    assert lines[1].split() == ["a.onnx", "0.123457", "-"]
    assert lines[2].startswith("b.onnx")
    assert "nan" in lines[2]
    assert lines[2].endswith("run 1 output is constant (0.0)")


def test_render_table_aligned():
    text = render(_RECORDS, "table", _COLUMNS, ["model", "epsilon", "reason"])
    lines = text.splitlines()
    start = lines[0].index("epsilon")
    assert lines[1][start:].startswith("0.123457")
    assert lines[2][start:].startswith("nan")


def test_render_table_lists_joined():
    text = render(_RECORDS, "table", _COLUMNS, ["model", "weights", "warnings"])
    lines = text.splitlines()
    assert lines[1].split() == ["a.onnx", "1e-07,1", "-"]


def test_render_table_empty():
    assert render([], "table", _COLUMNS) == ""


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("out.json", "json"),
        ("out.JSONL", "json"),
        ("out.ndjson", "json"),
        ("out.csv", "csv"),
        ("out.txt", "table"),
        ("out.table", "table"),
        ("out.parquet", None),
        ("out", None),
    ],
)
def test_format_from_path(name, expected):
    assert format_from_path(name) == expected


def test_atomic_write_creates_file(tmp_path):
    target = tmp_path / "records.json"
    atomic_write_text(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["records.json"]


def test_atomic_write_replaces_file(tmp_path):
    target = tmp_path / "records.csv"
    target.write_text("old content that is longer than the new\n")
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["records.csv"]


def test_atomic_write_failure_keeps_old(tmp_path):
    target = tmp_path / "records.txt"
    target.write_text("old\n")
    # A lone surrogate cannot be encoded as UTF-8, so the write fails midway.
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "partial \ud800 text")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["records.txt"]


def test_atomic_write_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write_text("plain.txt", "text\n")
    assert (tmp_path / "plain.txt").read_text() == "text\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plain.txt"]


def test_atomic_write_keeps_newlines(tmp_path):
    target = tmp_path / "records.csv"
    atomic_write_text(target, "a\r\nb\n")
    assert target.read_bytes() == b"a\r\nb\n"


def test_write_output_stdout(capsys):
    write_output("line\n", None)
    captured = capsys.readouterr()
    assert captured.out == "line\n"
    assert captured.err == ""


def test_write_output_file(tmp_path, capsys):
    write_output("line\n", tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text() == "line\n"
    assert capsys.readouterr().out == ""


# A folder listing gives a file name that is not UTF-8 as surrogate escapes.
_UNDECODABLE_TABLE = render([{"model": os.fsdecode(b"m\xff.onnx")}], "table", ["model"])


def test_write_output_file_undecodable_path(tmp_path):
    write_output(_UNDECODABLE_TABLE, tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == b"model\nm\xff.onnx\n"


def test_write_output_stdout_undecodable_path(capsysbinary):
    write_output(_UNDECODABLE_TABLE, None)
    assert capsysbinary.readouterr().out == b"model\nm\xff.onnx\n"
