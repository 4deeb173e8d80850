"""Tests of the `onnxeps score` and `onnxeps plan` commands on tiny models.

Records go to stdout, or to the -o FILE. Errors are one line on stderr, never a
traceback. The exit code is 1 for bad input and 2 for bad usage.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxeps.cli import main
from onnxeps.cli_common import write_or_fail
from onnxeps.cli_score import StreamedRecords
from onnxeps.converters import nb201
from records import assert_same_record
from inline_models import CONSTANT as _CONSTANT
from inline_models import HEADER as _HEADER
from inline_models import SQUARE as _SQUARE

_RELU_ONLY = """
relu (float[N,3] x) => (float[N,3] y) { y = Relu (x) }
"""
_SCORE_KEYS = [
    "model", "sha256", "epsilon", "reason", "weights", "batch_size", "input",
    "output", "preset", "provider", "warnings", "seconds",
]  # fmt: skip
_PLAN_KEYS = [
    "model", "tensor", "graph", "source", "shape", "dtype", "role", "action", "reason",
    "split",
]  # fmt: skip


def write_model(folder, name: str, text: str, with_weight: bool = True) -> str:
    model = onnx.parser.parse_model(_HEADER + text)
    if with_weight:
        weight = np.array([[0.5], [-1.0], [2.0]], np.float32)
        model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    onnx.checker.check_model(model, full_check=True)
    path = folder / name
    onnx.save_model(model, path)
    return str(path)


def sha256_of(path) -> str:
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_error_line(result, *fragments: str) -> None:
    """Check the run failed with exit code 1 and one stderr line naming the problem."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert isinstance(result.exception, SystemExit)


@pytest.fixture(autouse=True)
def restore_root_logger():
    """Undo the CLI's logging setup, whose handler writes to the runner's stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def square(tmp_path) -> str:
    return write_model(tmp_path, "square.onnx", _SQUARE)


# score: records


def test_score_json_lines(square):
    result = invoke("score", square, "--format", "json", "--batch-size", "16")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert list(record) == _SCORE_KEYS
    assert record["model"] == square
    assert record["sha256"] == sha256_of(square)
    assert record["epsilon"] > 0
    assert record["reason"] is None
    assert record["weights"] == [1e-07, 1.0]
    assert record["batch_size"] == 16
    assert record["input"] == "synthetic:x=grey"
    assert record["output"] == "y"
    assert record["preset"] is None
    assert record["provider"] == "CPUExecutionProvider"
    assert record["warnings"] == []
    assert record["seconds"] >= 0


def test_score_model_path_as_given(tmp_path, monkeypatch, square):
    monkeypatch.chdir(tmp_path)
    result = invoke("score", "./square.onnx", "--format", "json", "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "./square.onnx"


def test_score_several_models_one_line_each(tmp_path, square):
    other = write_model(tmp_path, "other.onnx", _SQUARE)
    result = invoke("score", square, other, "--format", "json", "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["model"] for record in records] == [square, other]
    assert "coverage: 2/2 models have a defined epsilon" in result.stderr


def test_score_weights_option(square):
    result = invoke(
        "score", square, "--format", "json", "--weights", "0.5", "2",
        "--batch-size", "8",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["weights"] == [0.5, 2.0]


def test_score_csv_columns(square):
    result = invoke("score", square, "--format", "csv", "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == _SCORE_KEYS
    assert len(rows) == 2
    row = dict(zip(rows[0], rows[1]))
    assert row["model"] == square
    assert float(row["epsilon"]) > 0
    assert row["reason"] == ""
    assert json.loads(row["weights"]) == [1e-07, 1.0]
    assert json.loads(row["warnings"]) == []


def test_score_table_default(square):
    result = invoke("score", square, "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "epsilon", "reason"]
    assert lines[1].startswith(square)


def test_score_undefined_exits_zero(tmp_path):
    path = write_model(tmp_path, "constant.onnx", _CONSTANT)
    result = invoke("score", path, "--format", "json", "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["epsilon"] is None
    assert record["reason"] == "run 1 output is constant (0.0)"


def test_score_input_file(tmp_path, square):
    batch = tmp_path / "batch.npy"
    np.save(batch, np.arange(30, dtype=np.float32).reshape(10, 3))
    result = invoke("score", square, "--input", str(batch), "--format", "json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["input"] == f"file:{batch}"
    assert record["batch_size"] == 10


def test_score_model_unchanged(square):
    before = sha256_of(square)
    result = invoke("score", square, "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    assert sha256_of(square) == before


def test_score_external_data_model(tmp_path):
    model = onnx.parser.parse_model(_HEADER + _SQUARE)
    weight = np.array([[0.5], [-1.0], [2.0]], np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    path = tmp_path / "external.onnx"
    onnx.save_model(
        model, path, save_as_external_data=True, location="w.bin", size_threshold=0
    )
    result = invoke("score", str(path), "--format", "json", "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    expected = hashlib.sha256(path.read_bytes() + (tmp_path / "w.bin").read_bytes())
    assert record["sha256"] == expected.hexdigest()
    assert record["epsilon"] > 0


def test_score_stdout_only_records(tmp_path, square):
    # A real process: anything the runtime or a worker prints to file descriptor 1
    # would show.
    other = write_model(tmp_path, "other.onnx", _SQUARE)
    command = [
        sys.executable, "-c", "from onnxeps.cli import main; main()",
        "score", square, other, "--format", "json", "--batch-size", "8", "-j", "2",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert list(json.loads(line)) == _SCORE_KEYS


# score: -o FILE


def test_score_output_file_json(tmp_path, square):
    target = tmp_path / "records.jsonl"
    result = invoke("score", square, "-o", str(target), "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    lines = target.read_text().splitlines()
    assert len(lines) == 1
    assert list(json.loads(lines[0])) == _SCORE_KEYS


def test_score_output_file_csv(tmp_path, square):
    target = tmp_path / "records.csv"
    result = invoke("score", square, "-o", str(target), "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(target.read_text())))
    assert rows[0] == _SCORE_KEYS


def test_score_output_file_atomic(tmp_path, square):
    target = tmp_path / "records.json"
    target.write_text("old records that must be replaced whole\n" * 50)
    result = invoke("score", square, "-o", str(target), "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    assert len(target.read_text().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.json", "square.onnx"]


def test_score_output_format_overrides_extension(tmp_path, square):
    target = tmp_path / "records.txt"
    result = invoke(
        "score", square, "-o", str(target), "--format", "json", "--batch-size", "8"
    )
    assert result.exit_code == 0, result.stderr
    assert list(json.loads(target.read_text())) == _SCORE_KEYS


def test_score_output_unknown_extension_usage_error(tmp_path, square):
    result = invoke("score", square, "-o", str(tmp_path / "records.parquet"))
    assert result.exit_code == 2
    assert "cannot tell the format of" in result.stderr
    assert not (tmp_path / "records.parquet").exists()


def test_score_output_onto_model_usage_error(square):
    before = sha256_of(square)
    result = invoke("score", square, "-o", square, "--format", "json")
    assert result.exit_code == 2
    assert "would overwrite the input file" in result.stderr
    assert sha256_of(square) == before


@pytest.mark.parametrize("folder", [".", "sub"], ids=["beside", "below"])
def test_score_output_onto_external_data_usage_error(tmp_path, folder):
    model = onnx.parser.parse_model(_HEADER + _SQUARE)
    weight = np.array([[0.5], [-1.0], [2.0]], np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    (tmp_path / "sub").mkdir()
    location = f"{folder}/w.json"
    path = tmp_path / "external.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location=location, size_threshold=0)
    data = tmp_path / location
    before = data.read_bytes()
    result = invoke("score", str(path), "-o", str(data), "--batch-size", "8")
    assert result.exit_code == 2
    assert "would overwrite the input file" in result.stderr
    assert data.read_bytes() == before


# score: errors


def test_score_missing_file(tmp_path):
    path = str(tmp_path / "missing.onnx")
    result = invoke("score", path)
    assert_one_error_line(result, f"{path}: file not found.")


def test_score_missing_file_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("score", "./missing.onnx")
    assert_one_error_line(result)
    assert result.stderr == "error: ./missing.onnx: file not found.\n"


def test_score_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("These are notes, not a model.\n")
    result = invoke("score", str(path))
    assert_one_error_line(result, str(path), "not a valid ONNX model")


def test_score_truncated(tmp_path, square):
    data = open(square, "rb").read()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    result = invoke("score", str(path))
    assert_one_error_line(result, str(path), "not a valid ONNX model")


def test_score_unknown_output_name(square):
    result = invoke("score", square, "--output-name", "hh", "--batch-size", "8")
    assert_one_error_line(
        result, "output 'hh' not found in the model", "graph outputs are 'y'",
        "Did you mean 'h'",
    )  # fmt: skip


def test_score_wrong_input_shape(tmp_path, square):
    batch = tmp_path / "batch.npy"
    np.save(batch, np.zeros((4, 5), np.float32))
    result = invoke("score", square, "--input", str(batch))
    assert_one_error_line(
        result, "model input 'x' has shape (N, 3)", "the array has shape (4, 5)"
    )


def test_score_wrong_input_dtype(tmp_path, square):
    batch = tmp_path / "batch.npy"
    np.save(batch, np.zeros((4, 3), np.int64))
    result = invoke("score", square, "--input", str(batch))
    assert_one_error_line(result, "model input 'x' is float32, but the array is int64")


def test_score_missing_input_file(tmp_path, square):
    result = invoke("score", square, "--input", str(tmp_path / "none.npy"))
    assert_one_error_line(result, "none.npy: input file not found")


def test_score_nothing_to_rewrite(tmp_path):
    path = write_model(tmp_path, "relu.onnx", _RELU_ONLY, with_weight=False)
    result = invoke("score", path, "--batch-size", "8")
    assert_one_error_line(result, path, "the model has no constant weights to set to w")


def test_score_timeout_one_line(square):
    result = invoke("score", square, "--timeout", "1e-9", "--batch-size", "8")
    assert_one_error_line(result, square, "scoring timed out after 1e-09 s")


def _assert_clean_write_failure(result, name: str) -> None:
    """Check a failed -o write is reported in one line, as an error or usage error."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (1, 2)
    assert "Traceback" not in result.stderr
    assert name in result.stderr


def test_score_output_missing_folder(tmp_path, square):
    target = tmp_path / "absent" / "records.json"
    result = invoke("score", square, "-o", str(target), "--batch-size", "8")
    _assert_clean_write_failure(result, "records.json")


def test_plan_output_missing_folder(tmp_path, square):
    target = tmp_path / "absent" / "plan.json"
    result = invoke("plan", square, "-o", str(target))
    _assert_clean_write_failure(result, "plan.json")


def test_score_one_bad_of_several(tmp_path, square):
    missing = str(tmp_path / "missing.onnx")
    result = invoke("score", square, missing, "--format", "json", "--batch-size", "8")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["model"] for record in records] == [square]
    assert f"error: {missing}: file not found." in result.stderr.splitlines()
    assert "coverage: 1/2 models have a defined epsilon (0 undefined, 1 failed)" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_score_input_and_synthetic_usage_error(tmp_path, square):
    batch = tmp_path / "batch.npy"
    np.save(batch, np.zeros((4, 3), np.float32))
    result = invoke("score", square, "--input", str(batch), "--synthetic", "normal")
    assert result.exit_code == 2
    assert "give --input or --synthetic, not both" in result.stderr
    assert result.stdout == ""


def test_score_unknown_format_usage_error(square):
    result = invoke("score", square, "--format", "xml")
    assert result.exit_code == 2
    assert "Invalid value for '--format'" in result.stderr


def test_score_no_models_usage_error():
    result = invoke("score")
    assert result.exit_code == 2
    assert "missing argument MODELS... (or --list FILE)" in result.stderr


def test_score_bad_mean_usage_error(square):
    result = invoke("score", square, "--mean", "0.5,abc")
    assert result.exit_code == 2
    assert "is not a comma-separated list of numbers" in result.stderr



# score: many models

NB201_CELLS = 10


@pytest.fixture(scope="module")
def cell_dir(tmp_path_factory, data_dir):
    """A folder of the first NB201 cells of the table as .onnx files."""
    folder = tmp_path_factory.mktemp("cells")
    with open(data_dir / "nb201" / "nb201_accuracy.csv", newline="") as stream:
        rows = [row for _, row in zip(range(NB201_CELLS), csv.DictReader(stream))]
    for index, row in enumerate(rows):
        onnx.save_model(nb201.build(row["arch_str"]), folder / f"cell{index:02d}.onnx")
    return folder


def cell_paths(cell_dir) -> list[str]:
    return sorted(str(path) for path in cell_dir.glob("*.onnx"))


def json_records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def assert_same_records(actual: list[dict], expected: list[dict]) -> None:
    """Check records model by model: epsilon within relative 1e-5, other keys but
    ``seconds`` equal. Workers run ONNX Runtime with fewer threads, which may sum in
    another order."""
    by_model = {record["model"]: record for record in actual}
    assert sorted(by_model) == sorted(record["model"] for record in expected)
    for record in expected:
        assert_same_record(record, by_model[record["model"]])


def scored_models(log_text: str) -> list[str]:
    """Return the models that a -v log reports as scored in this run."""
    lines = [line for line in log_text.splitlines() if "] scored " in line]
    return [line.split("] scored ", 1)[1].removesuffix(" (from the cache)") for line in lines]


def test_score_directory_sorted_recursive(tmp_path):
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    paths = [
        write_model(folder, "z.onnx", _SQUARE),
        write_model(folder / "sub", "b.onnx", _SQUARE),
        write_model(folder, "a.onnx", _SQUARE),
    ]
    (folder / "notes.txt").write_text("not a model")
    result = invoke("score", str(folder), "--format", "json", "--batch-size", "8", "-j", "1")
    assert result.exit_code == 0, result.stderr
    assert [r["model"] for r in json_records(result.stdout)] == sorted(paths)


def test_score_glob_patterns(tmp_path):
    (tmp_path / "sub").mkdir()
    top = write_model(tmp_path, "top.onnx", _SQUARE)
    below = write_model(tmp_path / "sub", "below.onnx", _SQUARE)
    flat = invoke("score", str(tmp_path / "*.onnx"), "--format", "json", "--batch-size", "8")
    assert flat.exit_code == 0, flat.stderr
    assert [r["model"] for r in json_records(flat.stdout)] == [top]
    deep = invoke("score", str(tmp_path / "**" / "*.onnx"), "--format", "json", "--batch-size", "8")
    assert deep.exit_code == 0, deep.stderr
    assert [r["model"] for r in json_records(deep.stdout)] == sorted([top, below])


def test_score_list_file(tmp_path, square):
    other = write_model(tmp_path, "other.onnx", _SQUARE)
    listing = tmp_path / "models.txt"
    listing.write_text(f"# models to score\n\n{other}\n   \n  {square}  \n#{square}\n")
    result = invoke("score", "--list", str(listing), "--format", "json", "--batch-size", "8", "-j", "1")
    assert result.exit_code == 0, result.stderr
    assert [r["model"] for r in json_records(result.stdout)] == [other, square]


def test_score_list_file_byte_order_mark(tmp_path, square):
    listing = tmp_path / "models.txt"
    listing.write_text(f"{square}\n", encoding="utf-8-sig")
    result = invoke("score", "--list", str(listing), "--format", "json", "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    assert [r["model"] for r in json_records(result.stdout)] == [square]


def test_score_list_file_nul_usage_error(tmp_path, square):
    listing = tmp_path / "models.txt"
    listing.write_text(f"{square}\nbad\0name.onnx\n")
    result = invoke("score", "--list", str(listing), "--batch-size", "8")
    assert result.exit_code == 2
    assert f"model list {listing}: line 2 contains a NUL byte" in result.stderr
    assert "Traceback" not in result.stderr


def test_score_duplicates_scored_once(tmp_path, monkeypatch, square):
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / "models.txt"
    listing.write_text("square.onnx\n")
    result = invoke(
        "score", "./square.onnx", square, str(tmp_path), "--list", str(listing),
        "--format", "json", "--batch-size", "8", "-v",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert [r["model"] for r in json_records(result.stdout)] == ["./square.onnx"]
    assert "coverage" not in result.stderr


def test_score_empty_folder_usage_error(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no models")
    result = invoke("score", str(folder))
    assert result.exit_code == 2
    assert f"{folder}: no .onnx file in this folder or below" in result.stderr


def test_score_unmatched_pattern_usage_error(tmp_path, square):
    pattern = str(tmp_path / "*.tflite")
    result = invoke("score", square, pattern)
    assert result.exit_code == 2
    assert f"{pattern}: no file matches this pattern" in result.stderr


def test_score_jobs_two_same_records(cell_dir):
    paths = cell_paths(cell_dir)
    one = invoke("score", str(cell_dir), "--format", "json", "--batch-size", "8", "-j", "1", "--no-cache")
    two = invoke("score", str(cell_dir), "--format", "json", "--batch-size", "8", "-j", "2", "--no-cache")
    assert one.exit_code == 0, one.stderr
    assert two.exit_code == 0, two.stderr
    assert [r["model"] for r in json_records(one.stdout)] == paths
    assert_same_records(json_records(two.stdout), json_records(one.stdout))
    assert len(paths) == NB201_CELLS


def test_score_jobs_two_failing_model(cell_dir, tmp_path):
    paths = cell_paths(cell_dir)[:4]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    missing = str(tmp_path / "missing.onnx")
    result = invoke(
        "score", *paths[:2], str(broken), missing, *paths[2:], "--format", "json",
        "--batch-size", "8", "-j", "2",
    )  # fmt: skip
    assert result.exit_code == 1
    assert sorted(r["model"] for r in json_records(result.stdout)) == paths
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert f"error: {missing}: file not found." in errors
    assert any(line.startswith(f"error: {broken}: ") for line in errors)
    assert "Traceback" not in result.stderr
    assert "coverage: " in result.stderr
    assert "/6 models have a defined epsilon" in result.stderr
    assert ", 2 failed)" in result.stderr


def test_score_streams_line_per_model(cell_dir, tmp_path, monkeypatch):
    import onnxeps.engine

    target = tmp_path / "records.jsonl"
    lines_before_each: list[int] = []
    real_score = onnxeps.engine.score

    def counting_score(*args, **kwargs):
        lines_before_each.append(len(target.read_text().splitlines()))
        return real_score(*args, **kwargs)

    monkeypatch.setattr(onnxeps.engine, "score", counting_score)
    paths = cell_paths(cell_dir)[:4]
    result = invoke("score", *paths, "-o", str(target), "--batch-size", "8", "-j", "1")
    assert result.exit_code == 0, result.stderr
    assert lines_before_each == [0, 1, 2, 3]
    assert [r["model"] for r in json_records(target.read_text())] == paths


def test_score_streams_csv_header_once(cell_dir, tmp_path):
    target = tmp_path / "records.csv"
    paths = cell_paths(cell_dir)[:3]
    result = invoke("score", *paths, "-o", str(target), "--batch-size", "8", "-j", "1")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(target.read_text())))
    assert rows[0] == _SCORE_KEYS
    assert [row[0] for row in rows[1:]] == paths


def _start_score(arguments: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-c", "from onnxeps.cli import main; main()", *arguments]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_record(path, process, deadline: float = 60.0) -> None:
    import time

    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= 1:
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    raise AssertionError(f"no record in {path} after {deadline} s")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_score_resume_after_interrupt(cell_dir, tmp_path, stop):
    target = tmp_path / "records.jsonl"
    options = ["--batch-size", "64", "-o", str(target), "--no-cache"]
    jobs = ["-j", "2"] if stop == signal.SIGINT else ["-j", "1"]
    process = _start_score(["score", str(cell_dir), *options, *jobs])
    _wait_for_first_record(target, process)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    if stop == signal.SIGINT:
        assert process.returncode == 130, stderr
        assert "--resume scores the rest" in stderr
        assert "Traceback" not in stderr
        json_records(target.read_text())  # every line is a whole record
    else:
        assert process.returncode == -signal.SIGKILL
    written = target.read_bytes()
    complete = written[: written.rfind(b"\n") + 1].decode().splitlines()
    done = [json.loads(line)["model"] for line in complete]
    assert 1 <= len(done) < NB201_CELLS

    resumed = invoke("score", str(cell_dir), *options, "--resume", "-j", "1", "-v")
    assert resumed.exit_code == 0, resumed.stderr
    paths = cell_paths(cell_dir)
    assert sorted(scored_models(resumed.stderr)) == sorted(set(paths) - set(done))
    records = json_records(target.read_text())
    assert sorted(r["model"] for r in records) == paths
    assert [r["model"] for r in records[: len(done)]] == done


def test_score_resume_drops_partial_line(cell_dir, tmp_path):
    target = tmp_path / "records.jsonl"
    paths = cell_paths(cell_dir)[:3]
    first = invoke("score", *paths[:2], "-o", str(target), "--batch-size", "8", "-j", "1")
    assert first.exit_code == 0, first.stderr
    lines = target.read_text().splitlines(keepends=True)
    target.write_text(lines[0] + lines[1][:25])
    resumed = invoke("score", *paths, "-o", str(target), "--batch-size", "8", "--resume", "-v")
    assert resumed.exit_code == 0, resumed.stderr
    assert sorted(scored_models(resumed.stderr)) == paths[1:]
    assert "dropping an incomplete last line" in resumed.stderr
    records = json_records(target.read_text())
    assert sorted(r["model"] for r in records) == paths
    assert "/3 models have a defined epsilon" in resumed.stderr
    assert " 0 failed)" in resumed.stderr


def test_score_resume_csv(cell_dir, tmp_path):
    target = tmp_path / "records.csv"
    paths = cell_paths(cell_dir)[:3]
    first = invoke("score", paths[0], "-o", str(target), "--batch-size", "8")
    assert first.exit_code == 0, first.stderr
    resumed = invoke("score", *paths, "-o", str(target), "--batch-size", "8", "--resume", "-v", "-j", "1")
    assert resumed.exit_code == 0, resumed.stderr
    assert scored_models(resumed.stderr) == paths[1:]
    rows = list(csv.reader(io.StringIO(target.read_text())))
    assert rows[0] == _SCORE_KEYS
    assert [row[0] for row in rows[1:]] == paths


def test_score_resume_everything_done(tmp_path, square):
    target = tmp_path / "records.jsonl"
    assert invoke("score", square, "-o", str(target), "--batch-size", "8").exit_code == 0
    before = target.read_text()
    resumed = invoke("score", square, "-o", str(target), "--batch-size", "8", "--resume", "-v")
    assert resumed.exit_code == 0, resumed.stderr
    assert scored_models(resumed.stderr) == []
    assert target.read_text() == before


def test_score_resume_matches_path_spelling(tmp_path, monkeypatch, square):
    monkeypatch.chdir(Path(square).parent)
    name = Path(square).name
    target = tmp_path / "records.jsonl"
    assert invoke("score", f"./{name}", "-o", str(target), "--batch-size", "8").exit_code == 0
    resumed = invoke("score", name, "-o", str(target), "--batch-size", "8", "--resume", "-v")
    assert resumed.exit_code == 0, resumed.stderr
    assert scored_models(resumed.stderr) == []


def test_score_resume_relative_record_other_folder(tmp_path, monkeypatch):
    # A record of 'a.onnx' written from folder A does not cover B's a.onnx.
    first, second = tmp_path / "A", tmp_path / "B"
    first.mkdir()
    second.mkdir()
    write_model(first, "a.onnx", _SQUARE)
    other = write_model(second, "a.onnx", _SQUARE)
    target = tmp_path / "records.jsonl"
    monkeypatch.chdir(first)
    assert invoke("score", "a.onnx", "-o", str(target), "--batch-size", "8").exit_code == 0
    monkeypatch.chdir(second)
    resumed = invoke("score", other, "-o", str(target), "--batch-size", "8", "--resume", "-v")
    assert resumed.exit_code == 0, resumed.stderr
    assert scored_models(resumed.stderr) == [other]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_score_resume_other_batch_size_warns(tmp_path, suffix):
    first = write_model(tmp_path, "a.onnx", _SQUARE)
    second = write_model(tmp_path, "b.onnx", _SQUARE)
    target = tmp_path / f"records.{suffix}"
    assert invoke("score", first, "-o", str(target), "--batch-size", "8").exit_code == 0
    same = invoke("score", first, second, "-o", str(target), "--batch-size", "8", "--resume")
    assert same.exit_code == 0, same.stderr
    assert "mixes settings" not in same.stderr
    third = write_model(tmp_path, "c.onnx", _SQUARE)
    other = invoke("score", first, third, "-o", str(target), "--batch-size", "4", "--resume")
    assert other.exit_code == 0, other.stderr
    assert "now mixes settings: batch_size 8 before, 4 now." in other.stderr


def test_score_resume_missing_file_starts_it(tmp_path, square):
    target = tmp_path / "records.jsonl"
    result = invoke("score", square, "-o", str(target), "--batch-size", "8", "--resume")
    assert result.exit_code == 0, result.stderr
    assert [r["model"] for r in json_records(target.read_text())] == [square]


@pytest.mark.parametrize(
    "output",
    [[], ["-o", "records.txt"], ["--format", "json"]],
    ids=["stdout", "table-file", "json-stdout"],
)
def test_score_resume_needs_streamed_file(tmp_path, monkeypatch, square, output):
    monkeypatch.chdir(tmp_path)
    result = invoke("score", square, "--resume", *output)
    assert result.exit_code == 2
    assert "--resume needs -o FILE with format json or csv" in result.stderr


def record_line(model) -> str:
    """Return a JSON Lines score record for the model, with every record key."""
    return json.dumps(dict.fromkeys(_SCORE_KEYS) | {"model": model}) + "\n"


def test_score_resume_invalid_line_exits_one(tmp_path, square):
    target = tmp_path / "records.jsonl"
    target.write_text(record_line("a.onnx") + "not json\n" + record_line("b.onnx"))
    result = invoke("score", square, "-o", str(target), "--resume", "--batch-size", "8")
    assert_one_error_line(result, str(target), "line 2 is not a JSON record")
    assert target.read_text().count("\n") == 3


def test_score_resume_foreign_csv_exits_one(tmp_path, square):
    target = tmp_path / "records.csv"
    target.write_text("name,value\nx,1\n")
    result = invoke("score", square, "-o", str(target), "--resume", "--batch-size", "8")
    assert_one_error_line(result, str(target), "CSV header")


def resume_rejects(target, square, *fragments: str) -> None:
    """Check --resume on the target fails in one line and leaves its bytes as they were."""
    before = target.read_bytes()
    result = invoke("score", square, "-o", str(target), "--resume", "--batch-size", "8")
    assert_one_error_line(result, str(target), *fragments)
    assert target.read_bytes() == before


def test_score_resume_notes_file_unchanged(tmp_path, square):
    target = tmp_path / "notes.jsonl"
    target.write_text("just some notes\nno trailing newline here")
    resume_rejects(target, square, "line 1 is not a JSON record")


def test_score_resume_binary_file_unchanged(tmp_path, square):
    target = tmp_path / "random.jsonl"
    target.write_bytes(bytes(range(256))[::-1] * 2)
    resume_rejects(target, square, "line 1 is not a JSON record")


def test_score_resume_foreign_last_line_unchanged(tmp_path, square):
    target = tmp_path / "records.jsonl"
    target.write_text(record_line("a.onnx") + "notes after the records")
    resume_rejects(target, square, "line 2 is not a JSON score record")


def test_score_resume_plan_records_rejected(tmp_path, square):
    target = tmp_path / "plan.jsonl"
    planned = invoke("plan", square, "--format", "json", "-o", str(target))
    assert planned.exit_code == 0, planned.stderr
    resume_rejects(target, square, "line 1 is not an onnxeps score record", "'sha256'")


def test_score_resume_model_not_string(tmp_path, square):
    target = tmp_path / "records.jsonl"
    target.write_text(record_line(["a.onnx"]))
    resume_rejects(target, square, "line 1", "'model' is not a string")


def test_score_resume_csv_short_row_unchanged(tmp_path, square):
    target = tmp_path / "records.csv"
    target.write_text(",".join(_SCORE_KEYS) + "\na.onnx,abc\n")
    resume_rejects(target, square, "row 2 has 2 fields")


def test_streamed_csv_undecodable_model_path(tmp_path):
    # A folder listing gives a file name that is not UTF-8 as surrogate escapes.
    model = os.fsdecode(b"m\xff.onnx")
    target = tmp_path / "records.csv"
    sink = StreamedRecords("csv", str(target), _SCORE_KEYS, resume=False)
    sink.add(dict.fromkeys(_SCORE_KEYS) | {"model": model}, 0)
    sink.close()
    assert target.read_bytes().splitlines()[1].startswith(b"m\xff.onnx,")
    resumed = StreamedRecords("csv", str(target), _SCORE_KEYS, resume=True)
    resumed.close()
    assert list(resumed.previous) == [model]


def test_score_failed_stream_write_one_line(tmp_path, monkeypatch, square):
    other = write_model(tmp_path, "other.onnx", _SQUARE)
    target = tmp_path / "records.jsonl"
    real_write, records_written = os.write, []

    def write_until_full(fd, data):
        if data.startswith(b'{"model"'):
            if records_written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            records_written.append(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_until_full)
    result = invoke("score", square, other, "-o", str(target), "--batch-size", "8", "-j", "1", "-q")
    assert_one_error_line(result, f"cannot write {target}: No space left on device")
    assert [r["model"] for r in json_records(target.read_text())] == [square]


def test_score_table_through_symlink(tmp_path, square):
    real = tmp_path / "real.txt"
    real.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    result = invoke("score", square, "-o", str(link), "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink()
    assert os.readlink(link) == str(real)
    assert real.read_text().startswith("model ")


def test_score_table_into_fifo(tmp_path, square):
    fifo = tmp_path / "records.txt"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = invoke("score", square, "-o", str(fifo), "--batch-size", "8")
    if reader.is_alive():  # unblock the reader when the FIFO was never opened
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    reader.join(timeout=30)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert received and received[0].startswith(b"model ")


def test_write_or_fail_stdout_named(monkeypatch, caplog):
    read_end, write_end = os.pipe()
    os.close(read_end)
    broken = open(write_end, "w")
    monkeypatch.setattr(sys, "stdout", broken)
    with pytest.raises(SystemExit) as stopped:
        write_or_fail("record\n", None)
    assert stopped.value.code == 1
    assert "cannot write stdout: Broken pipe" in caplog.text
    monkeypatch.undo()
    with pytest.raises(BrokenPipeError):  # the text still in its buffer
        broken.close()


def test_score_cache_hit_same_record(tmp_path, square):
    first = invoke("score", square, "--format", "json", "--batch-size", "8", "-v")
    second = invoke("score", square, "--format", "json", "--batch-size", "8", "-v")
    assert first.exit_code == 0, first.stderr
    assert second.exit_code == 0, second.stderr
    assert "(from the cache)" not in first.stderr
    assert "(from the cache)" in second.stderr
    assert "1 of 1 results came from the cache" in second.stderr
    assert json.loads(second.stdout) == json.loads(first.stdout)


def test_score_no_cache_writes_nothing(tmp_path, monkeypatch, square):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ONNXEPS_CACHE_DIR", str(folder))
    result = invoke("score", square, "--batch-size", "8", "--no-cache")
    assert result.exit_code == 0, result.stderr
    assert not folder.exists()
    result = invoke("score", square, "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    assert len(list(folder.rglob("*.json"))) == 1


def test_score_unwritable_cache_one_warning(tmp_path, monkeypatch, square):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("ONNXEPS_CACHE_DIR", str(blocker))
    other = write_model(tmp_path, "other.onnx", _SQUARE.replace("s = Mul (h, h)", "s = Mul (h, h)\n  t = Mul (s, h)"))
    result = invoke("score", square, other, "--format", "json", "--batch-size", "8", "-j", "1")
    assert result.exit_code == 0, result.stderr
    assert len(json_records(result.stdout)) == 2
    assert result.stderr.count("cannot write the result cache") == 1


def test_score_address_needs_ray(square):
    result = invoke("score", square, "--address", "127.0.0.1:6379")
    assert result.exit_code == 2
    assert "--address needs --engine ray" in result.stderr


def test_score_ray_engine_missing_ray_one_line(monkeypatch, square, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    other = write_model(tmp_path, "other.onnx", _SQUARE)
    result = invoke("score", square, other, "--engine", "ray", "--batch-size", "8")
    assert_one_error_line(result, "the Ray engine needs the ray package")


def test_score_jobs_zero_usage_error(square):
    result = invoke("score", square, "-j", "0")
    assert result.exit_code == 2
    assert "Invalid value for '-j'" in result.stderr

# plan


def test_plan_json_lines(square):
    result = invoke("plan", square, "--format", "json")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert list(record) == _PLAN_KEYS
    assert record["model"] == square
    assert record["tensor"] == "w"
    assert record["role"] == "weight"
    assert record["action"] == "set to w"
    assert record["shape"] == [3, 1]


def test_plan_csv_columns(square):
    result = invoke("plan", square, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == _PLAN_KEYS
    assert rows[1][1] == "w"


def test_plan_table(square):
    result = invoke("plan", square)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["tensor", "shape", "dtype", "role", "action", "split", "reason"]
    assert lines[1].split()[:3] == ["w", "3,1", "float32"]


def test_plan_output_file(tmp_path, square):
    target = tmp_path / "plan.csv"
    result = invoke("plan", square, "-o", str(target))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert target.read_text().splitlines()[0] == ",".join(_PLAN_KEYS)


def test_plan_missing_file(tmp_path):
    path = str(tmp_path / "missing.onnx")
    assert_one_error_line(invoke("plan", path), f"{path}: file not found.")


def test_plan_truncated(tmp_path, square):
    data = open(square, "rb").read()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 3])
    assert_one_error_line(invoke("plan", str(path)), "not a valid ONNX model")


def test_plan_strict_unclassified_exits_one(tmp_path):
    text = """
    unknown (float[N,3] x) => (float[N,3] y) {
      r = Relu (x)
      y = Add (r, b)
    }
    """
    model = onnx.parser.parse_model(_HEADER + text)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "b"))
    path = tmp_path / "unknown.onnx"
    onnx.save_model(model, path)
    relaxed = invoke("plan", str(path), "--format", "json")
    assert relaxed.exit_code == 0
    assert "unclassified tensor 'b'" in relaxed.stderr
    strict = invoke("plan", str(path), "--format", "json", "--strict")
    assert strict.exit_code == 1
    assert "1 unclassified float tensors and --strict is set" in strict.stderr


def test_plan_unknown_format_usage_error(square):
    result = invoke("plan", square, "--format", "yaml")
    assert result.exit_code == 2


def test_plan_output_onto_model_usage_error(square):
    result = invoke("plan", square, "-o", square, "--format", "json")
    assert result.exit_code == 2
    assert "would overwrite the input file" in result.stderr


def _group_members(group: int) -> list[int]:
    """Return the live processes of a process group, from /proc."""
    members = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while listed
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(status.parent.name))
    return members


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_score_stopped_leaves_no_workers(cell_dir, tmp_path, stop):
    import time

    target = tmp_path / "records.jsonl"
    command = [sys.executable, "-c", "from onnxeps.cli import main; main()", "score",
               str(cell_dir), "--batch-size", "64", "-o", str(target), "--no-cache", "-j", "2"]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    _wait_for_first_record(target, process)
    process.send_signal(stop)
    process.wait(timeout=60)
    assert process.returncode in (128 + stop, -stop)
    end = time.monotonic() + 20
    while _group_members(process.pid) and time.monotonic() < end:
        time.sleep(0.2)
    assert _group_members(process.pid) == []
    process.communicate(timeout=10)
    json_records(target.read_bytes()[: target.read_bytes().rfind(b"\n") + 1].decode())


def test_score_output_hard_link_to_model(tmp_path, square):
    link = tmp_path / "link.json"
    os.link(square, link)
    before = Path(square).read_bytes()
    result = invoke("score", square, "-o", str(link), "--batch-size", "8")
    assert result.exit_code == 2
    assert "would overwrite the input file" in result.stderr
    assert Path(square).read_bytes() == before


def test_score_non_utf8_file_name(tmp_path, square):
    name = os.fsdecode(b"bad\xff.onnx")
    path = tmp_path / name
    path.write_bytes(Path(square).read_bytes())
    result = invoke("score", str(path), "--batch-size", "8", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert "onnx.checker" not in result.stderr


def test_score_pattern_skips_empty_folder(tmp_path, square):
    folder = tmp_path / "g"
    (folder / "sub.onnx").mkdir(parents=True)
    model = folder / "a.onnx"
    model.write_bytes(Path(square).read_bytes())
    result = invoke("score", str(folder / "*.onnx"), "--batch-size", "8", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert [r["model"] for r in json_records(result.stdout)] == [str(model)]
