"""Tests of `onnxeps gate`: every exit code, the records, the JUnit report and reruns.

Exit codes: 0 every check passed, 1 a check failed, 2 a usage error or a model or input
that cannot be evaluated, 3 an undefined epsilon.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxeps.cli import main
from onnxeps.gate import GateCheck, exit_code, relative_drop_pct
from inline_models import CONSTANT as _CONSTANT
from inline_models import HEADER as _HEADER
from inline_models import SQUARE as _SQUARE

# Linear in w, so both runs normalise to the same vector and epsilon is exactly 0.
_LINEAR = """
linear (float[N,3] x) => (float[N,1] y) { y = MatMul (x, w) }
"""
_BATCH = ["--batch-size", "8"]
_CHECK_KEYS = [
    "kind", "check", "model", "epsilon", "baseline", "baseline_epsilon", "drop_pct",
    "threshold", "status", "passed", "message",
]  # fmt: skip


def write_model(folder, name: str, text: str) -> str:
    model = onnx.parser.parse_model(_HEADER + text)
    weight = np.array([[0.5], [-1.0], [2.0]], np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    onnx.checker.check_model(model, full_check=True)
    path = folder / name
    onnx.save_model(model, path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("gate")
    return {
        "square": write_model(folder, "square.onnx", _SQUARE),
        "linear": write_model(folder, "linear.onnx", _LINEAR),
        "constant": write_model(folder, "constant.onnx", _CONSTANT),
    }


def invoke(*args: str):
    return CliRunner().invoke(main, ["gate", *args])


def json_records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def check_records(result) -> list[dict]:
    return [r for r in json_records(result) if r["kind"] == "check"]


# ----- exit code 0 -----


def test_gate_min_epsilon_passes(models):
    result = invoke(models["square"], "--min-epsilon", "0.01", *_BATCH, "--format", "json")
    assert result.exit_code == 0, result.output
    checks = check_records(result)
    assert [c["check"] for c in checks] == ["min-epsilon"]
    assert checks[0]["status"] == "passed"
    assert checks[0]["passed"] is True


def test_gate_baseline_passes_when_epsilon_rises(models):
    # The baseline's epsilon is 0, which a defined epsilon can never undercut.
    result = invoke(
        models["square"], "--baseline", models["linear"], "--max-drop", "0",
        *_BATCH, "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    check = check_records(result)[0]
    assert check["baseline_epsilon"] == 0.0
    assert check["drop_pct"] == 0.0
    assert check["status"] == "passed"


def test_gate_records_schema(models):
    result = invoke(
        models["square"], "--min-epsilon", "0.01", "--baseline", models["square"],
        "--max-drop", "5", *_BATCH, "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = json_records(result)
    assert [r["kind"] for r in records] == ["score", "score", "check", "check"]
    assert list(records[0])[1:] == [
        "model", "sha256", "epsilon", "reason", "weights", "batch_size", "input",
        "output", "preset", "provider", "warnings", "seconds",
    ]  # fmt: skip
    assert list(records[2]) == _CHECK_KEYS
    assert records[3]["baseline"] == models["square"]
    assert records[3]["drop_pct"] == 0.0


def test_gate_csv_has_kind_column(models):
    result = invoke(models["square"], "--min-epsilon", "0.01", *_BATCH, "--format", "csv")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("kind,model,sha256,epsilon,")
    assert lines[0].endswith(",check,baseline,baseline_epsilon,drop_pct,threshold,status,passed,message")
    assert [line.split(",")[0] for line in lines[1:]] == ["score", "check"]


# ----- exit code 1 -----


def test_gate_min_epsilon_fails(models):
    result = invoke(models["square"], "--min-epsilon", "10", *_BATCH, "--format", "json")
    assert result.exit_code == 1, result.output
    check = check_records(result)[0]
    assert check["status"] == "failed"
    assert check["passed"] is False
    assert check["threshold"] == 10.0
    assert "below the minimum 10" in check["message"]
    assert "min-epsilon failed" in result.stderr


def test_gate_baseline_drop_fails(models):
    # Epsilon falls from the square model's (above 0) to the linear model's 0: a 100 % drop.
    result = invoke(
        models["linear"], "--baseline", models["square"], "--max-drop", "5",
        *_BATCH, "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    check = check_records(result)[0]
    assert check["check"] == "baseline"
    assert check["epsilon"] == 0.0
    assert check["baseline_epsilon"] > 0
    assert check["drop_pct"] == pytest.approx(100.0)
    assert check["status"] == "failed"


def test_gate_failure_outranks_pass(models):
    result = invoke(
        models["square"], "--min-epsilon", "10", "--baseline", models["square"],
        "--max-drop", "5", *_BATCH, "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert [c["status"] for c in check_records(result)] == ["failed", "passed"]


# ----- exit code 2 -----


def test_gate_missing_model(tmp_path):
    missing = str(tmp_path / "missing.onnx")
    result = invoke(missing, "--min-epsilon", "0.1", *_BATCH)
    assert result.exit_code == 2, result.output
    assert "file not found" in result.stderr


def test_gate_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a protobuf model\n" * 20)
    result = invoke(str(path), "--min-epsilon", "0.1", *_BATCH)
    assert result.exit_code == 2, result.output
    assert "not a valid ONNX model" in result.stderr


def test_gate_bad_input_shape(models, tmp_path):
    batch = tmp_path / "batch.npy"
    np.save(batch, np.zeros((8, 5), np.float32))  # the model takes (N, 3)
    result = invoke(models["square"], "--min-epsilon", "0.1", "--input", str(batch), "--format", "json")
    assert result.exit_code == 2, result.output
    assert "has shape (N, 3), but the array has shape (8, 5)" in result.stderr
    check = check_records(result)[0]
    assert check["status"] == "error"


def test_gate_missing_baseline(models, tmp_path):
    missing = str(tmp_path / "old.onnx")
    result = invoke(models["square"], "--baseline", missing, "--max-drop", "5", *_BATCH, "--format", "json")
    assert result.exit_code == 2, result.output
    records = json_records(result)
    assert [r["kind"] for r in records] == ["score", "check"]
    assert records[1]["status"] == "error"
    assert "file not found" in records[1]["message"]


def test_gate_unknown_option(models):
    result = invoke(models["square"], "--min-epsilon", "0.1", "--no-such-option")
    assert result.exit_code == 2
    assert "No such option" in result.stderr


def test_gate_no_check_is_usage_error(models):
    result = invoke(models["square"], *_BATCH)
    assert result.exit_code == 2
    assert "nothing to check" in result.stderr


def test_gate_baseline_needs_max_drop(models):
    result = invoke(models["square"], "--baseline", models["linear"])
    assert result.exit_code == 2
    assert "--baseline needs --max-drop" in result.stderr


def test_gate_max_drop_needs_baseline(models):
    result = invoke(models["square"], "--max-drop", "5")
    assert result.exit_code == 2
    assert "--max-drop needs --baseline" in result.stderr


def test_gate_negative_threshold_rejected(models):
    result = invoke(models["square"], "--min-epsilon", "-1")
    assert result.exit_code == 2


# ----- exit code 3 -----


def test_gate_undefined_epsilon(models):
    result = invoke(models["constant"], "--min-epsilon", "0.1", *_BATCH, "--format", "json")
    assert result.exit_code == 3, result.output
    check = check_records(result)[0]
    assert check["status"] == "undefined"
    assert check["epsilon"] is None
    assert "output is constant" in check["message"]
    assert "output is constant" in result.stderr


def test_gate_undefined_baseline(models):
    result = invoke(
        models["square"], "--baseline", models["constant"], "--max-drop", "5",
        *_BATCH, "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    check = check_records(result)[0]
    assert check["status"] == "undefined"
    assert check["baseline_epsilon"] is None
    assert "(baseline) is undefined" in check["message"]


def test_gate_undefined_outranks_failure(models):
    result = invoke(
        models["constant"], "--baseline", models["square"], "--max-drop", "5",
        "--min-epsilon", "0.1", *_BATCH,
    )  # fmt: skip
    assert result.exit_code == 3, result.output


# ----- exit code precedence and the drop arithmetic -----


def _check(status: str) -> GateCheck:
    return GateCheck("min-epsilon", "m.onnx", None, None, None, None, 0.1, status, "")


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], 0),
        (["passed", "passed"], 0),
        (["passed", "failed"], 1),
        (["failed", "undefined"], 3),
        (["undefined", "error"], 2),
        (["passed", "error"], 2),
    ],
)
def test_exit_code_most_severe(statuses, expected):
    assert exit_code([_check(status) for status in statuses]) == expected


def test_relative_drop_pct_values():
    assert relative_drop_pct(0.5, 1.0) == 50.0
    assert relative_drop_pct(1.5, 1.0) == -50.0
    assert relative_drop_pct(0.0, 0.0) == 0.0
    assert relative_drop_pct(0.3, 0.0) == 0.0


# ----- JUnit report -----


def read_junit(path) -> ElementTree.Element:
    root = ElementTree.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    return suites[0]


def test_junit_failure_and_pass(models, tmp_path):
    report = tmp_path / "gate.xml"
    result = invoke(
        models["square"], "--min-epsilon", "10", "--baseline", models["square"],
        "--max-drop", "5", *_BATCH, "--junit", str(report),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    suite = read_junit(report)
    assert suite.get("tests") == "2"
    assert suite.get("failures") == "1"
    assert suite.get("errors") == "0"
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == ["min-epsilon", "baseline"]
    assert [case.get("classname") for case in cases] == [models["square"]] * 2
    failure = cases[0].find("failure")
    assert failure is not None
    assert "below the minimum 10" in failure.get("message")
    assert cases[1].find("failure") is None
    assert cases[1].find("error") is None


def test_junit_properties(models, tmp_path):
    report = tmp_path / "gate.xml"
    result = invoke(models["square"], "--min-epsilon", "0.01", *_BATCH, "--junit", str(report))
    assert result.exit_code == 0, result.output
    properties = {p.get("name"): p.get("value") for p in read_junit(report).iter("property")}
    assert properties["model.batch_size"] == "8"
    assert properties["model.input"] == "synthetic:x=grey"
    assert len(properties["model.sha256"]) == 64


def test_junit_undefined_is_error(models, tmp_path):
    report = tmp_path / "gate.xml"
    result = invoke(models["constant"], "--min-epsilon", "0.1", *_BATCH, "--junit", str(report))
    assert result.exit_code == 3, result.output
    suite = read_junit(report)
    assert suite.get("tests") == "1"
    assert suite.get("failures") == "0"
    assert suite.get("errors") == "1"
    error = suite.find("testcase/error")
    assert error is not None
    assert error.get("type") == "undefined epsilon"
    assert "output is constant" in error.get("message")


def test_junit_written_for_missing_model(tmp_path):
    report = tmp_path / "gate.xml"
    missing = str(tmp_path / "missing.onnx")
    result = invoke(missing, "--min-epsilon", "0.1", "--junit", str(report))
    assert result.exit_code == 2, result.output
    error = read_junit(report).find("testcase/error")
    assert error is not None
    assert error.get("type") == "evaluation error"
    assert "file not found" in error.get("message")


def test_junit_folder_missing_is_usage_error(models, tmp_path):
    report = tmp_path / "no-such-folder" / "gate.xml"
    result = invoke(models["square"], "--min-epsilon", "0.1", "--junit", str(report))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_junit_leaves_no_temporary_files(models, tmp_path):
    report = tmp_path / "gate.xml"
    invoke(models["square"], "--min-epsilon", "0.01", *_BATCH, "--junit", str(report))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate.xml"]


# ----- output file and determinism -----


def test_gate_output_file_by_extension(models, tmp_path):
    path = tmp_path / "gate.jsonl"
    result = invoke(models["square"], "--min-epsilon", "0.01", *_BATCH, "-o", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds == ["score", "check"]


def without_seconds(records: list[dict]) -> list[dict]:
    """Drop the wall time, the one field that may differ between identical runs."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_gate_reruns_identical(models):
    args = [
        models["square"], "--min-epsilon", "0.01", "--baseline", models["linear"],
        "--max-drop", "5", "--synthetic", "normal", "--seed", "3", *_BATCH,
        "--format", "json",
    ]  # fmt: skip
    first = invoke(*args)
    second = invoke(*args)
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert without_seconds(json_records(first)) == without_seconds(json_records(second))
