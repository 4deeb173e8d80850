"""Tests of the bench command: sampling, scoring, aggregation, statistics, reports."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict

import numpy as np
import pytest
from click.testing import CliRunner

from records import assert_same_record
from onnxeps.bench import (
    SPACES,
    nb201_parameter_free_path,
    read_candidates,
    render_markdown,
    run_bench,
)
from onnxeps.cli import main
from onnxeps.errors import InputError

BATCH = 8
SAMPLE = 12
# The bench builds NB201 with one output unit, but the CSV counts the 10-class
# network, whose classifier has 9 * (64 + 1) more parameters.
NB201_CLASSIFIER_DIFFERENCE = 9 * (64 + 1)
STATISTICS = {"epsilon (omit)", "epsilon (rank-last)", "params", "macs"}
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"


@pytest.fixture(scope="module")
def nb201_truth(data_dir):
    return data_dir / "nb201" / "nb201_accuracy.csv"


@pytest.fixture(scope="module")
def nb201_rows(nb201_truth) -> dict[str, dict]:
    with open(nb201_truth, newline="") as stream:
        return {row["arch_str"]: row for row in csv.DictReader(stream)}


@pytest.fixture(scope="module")
def nb201_result(nb201_truth):
    return run_bench(
        "nb201", nb201_truth, sample=SAMPLE, batch_size=BATCH, synthetic="grey"
    )


# ----- NAS-Bench-201 -----


def test_nb201_record_count(nb201_result):
    assert len(nb201_result.records) == SAMPLE


def test_nb201_record_fields(nb201_result):
    for record in nb201_result.records:
        assert record["model"].startswith("nb201:|")
        assert isinstance(record["params"], int)
        assert isinstance(record["macs"], int)
        assert record["macs"] > 0
        assert record["batch_size"] == BATCH
        assert record["preset"] == "nb201"


def test_nb201_truth_from_csv(nb201_result, nb201_rows):
    for record in nb201_result.records:
        row = nb201_rows[record["model"].removeprefix("nb201:")]
        assert record["truth"] == pytest.approx(float(row["test_acc_c10"]))


def test_nb201_params_match_csv(nb201_result, nb201_rows):
    checked = 0
    for record in nb201_result.records:
        row = nb201_rows[record["model"].removeprefix("nb201:")]
        listed = float(row["params_m"]) * 1e6
        # 199 rows of the CSV hold non-integer counts, averages that include another
        # cell's count, so only whole counts are compared.
        if abs(listed - round(listed)) > 0.01:
            continue
        checked += 1
        expected = listed - NB201_CLASSIFIER_DIFFERENCE
        assert abs(record["params"] - expected) <= 0.5, record["model"]
    assert checked >= SAMPLE - 2


def test_nb201_summary_statistics(nb201_result):
    table = nb201_result.summary["statistics"]
    assert set(table) == STATISTICS
    assert table["epsilon (omit)"]["policy"] == "omit"
    assert table["epsilon (rank-last)"]["policy"] == "rank-last"
    assert table["params"]["n"] == SAMPLE
    assert table["macs"]["n"] == SAMPLE


def test_nb201_summary_coverage(nb201_result):
    table = nb201_result.summary["statistics"]
    defined = sum(record["epsilon"] is not None for record in nb201_result.records)
    assert table["epsilon (omit)"]["n"] == defined
    assert table["epsilon (omit)"]["defined"] == defined
    assert table["epsilon (rank-last)"]["n"] == SAMPLE
    assert table["epsilon (rank-last)"]["total"] == SAMPLE


def test_nb201_summary_settings(nb201_result, nb201_truth):
    summary = nb201_result.summary
    assert summary["space"] == "nb201"
    assert summary["truth"] == str(nb201_truth)
    assert summary["metric_column"] == "test_acc_c10"
    assert summary["higher_is_better"] is True
    assert summary["sample"] == SAMPLE
    assert summary["scored"] == SAMPLE
    assert summary["failed"] == 0
    assert summary["input"] == "synthetic:input=grey"
    assert summary["input"] == nb201_result.records[0]["input"]
    assert summary["weights"] == [1e-7, 1.0]
    assert summary["batch_size"] == BATCH


def test_nb201_structural_nan(nb201_result):
    check = nb201_result.summary["structural_nan"]
    assert check["mismatches"] == []
    assert check["undefined"] == check["cells_without_path"]
    undefined = sum(record["epsilon"] is None for record in nb201_result.records)
    assert check["undefined"] == undefined


def test_nb201_structural_rule_per_record(nb201_result):
    for record in nb201_result.records:
        arch = record["model"].removeprefix("nb201:")
        assert (record["epsilon"] is not None) == nb201_parameter_free_path(arch), arch


def test_sample_seed_repeatable(nb201_truth):
    space = SPACES["nb201"]
    candidates = read_candidates(space, nb201_truth, space.metric_column)
    assert len(candidates) == 15_625
    first = run_bench("nb201", nb201_truth, sample=2, sample_seed=5, batch_size=4)
    second = run_bench("nb201", nb201_truth, sample=2, sample_seed=5, batch_size=4)
    assert [r["model"] for r in first.records] == [r["model"] for r in second.records]


def test_render_markdown(nb201_result):
    text = render_markdown(nb201_result.summary)
    defined = sum(record["epsilon"] is not None for record in nb201_result.records)
    assert text.startswith("# onnxeps bench nb201\n")
    assert "| epsilon (omit) |" in text
    assert "| epsilon (rank-last) |" in text
    # Coverage is defined / total under both policies, and the baselines are always
    # defined.
    assert f"| {defined}/{SAMPLE} |" in text
    assert f"| {SAMPLE}/{SAMPLE} |" in text
    assert "multiply-accumulates per sample" in text
    assert "cells where the two disagree: 0." in text


# ----- NAS-Bench-101 -----


@pytest.fixture(scope="module")
def nb101_truth(data_dir):
    return data_dir / "nb101" / "nb101_subset500.csv"


def test_nb101_aggregates_cells(nb101_truth):
    with open(nb101_truth, newline="") as stream:
        rows = list(csv.DictReader(stream))
    groups = defaultdict(list)
    for row in rows:
        matrix, ops = json.loads(row["pruned_matrix"]), json.loads(row["pruned_ops"])
        cell = {"matrix": matrix, "ops": ops}
        groups[json.dumps(cell)].append(float(row["val_accuracy"]))
    space = SPACES["nb101"]
    candidates = read_candidates(space, nb101_truth, space.metric_column)
    assert len(rows) == 500
    assert len(candidates) == 301
    by_label = {candidate.label: candidate for candidate in candidates}
    assert set(by_label) == set(groups)
    for label, values in groups.items():
        assert by_label[label].truth == pytest.approx(np.mean(values), abs=1e-9), label
    # The sample has repeated cells, so the averaging is exercised.
    assert max(len(values) for values in groups.values()) > 1


def test_nb101_run(nb101_truth):
    result = run_bench("nb101", nb101_truth, sample=2, batch_size=4, synthetic="grey")
    assert len(result.records) == 2
    assert result.summary["weights"] == [1e-4, 10.0]
    assert "structural_nan" not in result.summary
    space = SPACES["nb101"]
    candidates = read_candidates(space, nb101_truth, "val_accuracy")
    truths = {candidate.label: candidate.truth for candidate in candidates}
    for record in result.records:
        assert record["truth"] == truths[record["model"].removeprefix("nb101:")]


# ----- NAS-Bench-NLP -----


def test_nlp_read_candidates(data_dir):
    truth = data_dir / "nas-bench-nlp" / "nlp_wt2_recipes_joined_ptb.csv"
    space = SPACES["nlp"]
    candidates = read_candidates(space, truth, space.metric_column)
    assert len(candidates) == 313
    assert space.higher_is_better is False
    assert all(candidate.label.startswith("recipe ") for candidate in candidates)
    assert all(math.isfinite(candidate.truth) for candidate in candidates)
    first = json.loads(candidates[0].encoding)
    assert "h_new_0" in first


# Two one-node cells with made-up losses. The bench builds NLP graphs unrolled over 70
# steps, so only the smallest recipes keep the run short.
NLP_ROWS = [
    ("1000000", '{"f": {"op": "linear", "input": ["x", "h_prev_0"]}, '
                '"h_new_0": {"op": "activation_tanh", "input": ["f"]}}', "4.9"),
    ("1000222", '{"node_0": {"op": "linear", "input": ["x", "h_prev_0"]}, '
                '"h_new_0": {"op": "activation_sigm", "input": ["node_0"]}}', "5.2"),
]  # fmt: skip


def test_nlp_run(tmp_path):
    truth = tmp_path / "nlp.csv"
    with open(truth, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["recipe_id", "recipe", "ptb_test_loss"])
        writer.writerows(NLP_ROWS)
    result = run_bench("nlp", truth, sample=None, batch_size=4)
    labels = [record["model"] for record in result.records]
    assert labels == ["nlp:recipe 1000000", "nlp:recipe 1000222"]
    assert [r["truth"] for r in result.records] == [4.9, 5.2]
    assert result.summary["higher_is_better"] is False
    assert result.summary["weights"] == [1e-5, 1e-3]
    assert all(record["output"] == "hidden_unit0" for record in result.records)


# ----- invalid truth tables -----


def test_missing_column_raises(tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text(f"arch_str,accuracy\n{ALL_NONE},10\n")
    with pytest.raises(InputError, match="no column 'test_acc_c10'"):
        run_bench("nb201", truth, sample=None)


def test_wrong_space_raises(nb101_truth):
    # The NB101 table has val_accuracy but no arch_str column.
    with pytest.raises(InputError, match="not a nb201 ground-truth table"):
        run_bench("nb201", nb101_truth, sample=1, metric_column="val_accuracy")


def test_blank_truth_skipped(tmp_path):
    arch = "|skip_connect~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|"
    truth = tmp_path / "truth.csv"
    truth.write_text(f"arch_str,test_acc_c10\n{arch},50.5\n{arch},\n")
    space = SPACES["nb201"]
    candidates = read_candidates(space, truth, space.metric_column)
    assert [candidate.truth for candidate in candidates] == [50.5]


def test_no_candidates_raises(tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text(f"arch_str,test_acc_c10\n{ALL_NONE},\n")
    with pytest.raises(InputError):
        run_bench("nb201", truth, sample=None)



# ----- engine -----


def assert_same_records(actual: list[dict], expected: list[dict]) -> None:
    """Check records in order: epsilon within relative 1e-5, other keys but
    ``seconds`` equal. Workers run ONNX Runtime with fewer threads, which may sum in
    another order."""
    assert [r["model"] for r in actual] == [r["model"] for r in expected]
    for record, other in zip(expected, actual):
        assert list(other) == list(record)
        assert_same_record(record, other)


def test_jobs_two_same_records(nb201_truth, nb201_result):
    parallel = run_bench(
        "nb201", nb201_truth, sample=SAMPLE, batch_size=BATCH, synthetic="grey", jobs=2
    )
    assert_same_records(parallel.records, nb201_result.records)
    assert parallel.summary["scored"] == nb201_result.summary["scored"]


def test_record_keys_in_order(nb201_result):
    for record in nb201_result.records:
        assert list(record)[-4:] == ["seconds", "truth", "params", "macs"]


def test_cache_second_run_hits(nb201_truth, monkeypatch, tmp_path, caplog):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ONNXEPS_CACHE_DIR", str(folder))
    options = dict(sample=3, batch_size=BATCH, synthetic="grey", cache=True)
    first = run_bench("nb201", nb201_truth, **options)
    assert len(list(folder.rglob("*.json"))) == 3
    with caplog.at_level("INFO", logger="onnxeps.engine"):
        second = run_bench("nb201", nb201_truth, **options)
    assert "3 of 3 results came from the cache" in caplog.text
    assert second.records == first.records


def test_invalid_encoding_fails_one(tmp_path, caplog):
    truth = tmp_path / "truth.csv"
    truth.write_text(f"arch_str,test_acc_c10\n{ALL_NONE},10\n|bad_op~0|+|,20\n")
    result = run_bench("nb201", truth, sample=None, batch_size=BATCH)
    assert result.summary["scored"] == 1
    assert result.summary["failed"] == 1
    assert "nb201:|bad_op~0|+|: invalid nb201 encoding" in caplog.text

# ----- command line -----


def reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def invoke(args):
    return CliRunner().invoke(main, ["bench", *args])


def test_cli_json_report(tmp_path, nb201_truth):
    report = tmp_path / "report.json"
    records = tmp_path / "rec.jsonl"
    result = invoke(["nb201", "--truth", str(nb201_truth), "--sample", "6",
                     "--batch-size", str(BATCH), "--format", "json",
                     "-o", str(report), "--records", str(records)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    summary = json.loads(report.read_text(), parse_constant=reject_constant)
    assert isinstance(summary, dict)
    assert summary["sample"] == 6
    assert set(summary["statistics"]) == STATISTICS
    lines = records.read_text().splitlines()
    assert len(lines) == 6
    for line in lines:
        record = json.loads(line)
        assert {"model", "epsilon", "truth", "params", "macs"} <= set(record)


def test_cli_markdown_stdout(nb201_truth):
    result = invoke(["nb201", "--truth", str(nb201_truth), "--sample", "2",
                     "--batch-size", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# onnxeps bench nb201\n")


def test_cli_bad_column_exit_1(nb201_truth):
    result = invoke(["nb201", "--truth", str(nb201_truth), "--sample", "2",
                     "--metric-column", "accuracy"])  # fmt: skip
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no column 'accuracy'" in lines[0]


def test_cli_truth_without_column_exit_1(tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text(f"arch_str,accuracy\n{ALL_NONE},10\n")
    result = invoke(["nb201", "--truth", str(truth), "--sample", "1"])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_sample_zero_exit_2(nb201_truth):
    result = invoke(["nb201", "--truth", str(nb201_truth), "--sample", "0"])
    assert result.exit_code == 2
    assert "--sample" in result.stderr


def test_cli_sample_text_exit_2(nb201_truth):
    result = invoke(["nb201", "--truth", str(nb201_truth), "--sample", "some"])
    assert result.exit_code == 2


def test_cli_input_and_synthetic_exit_2(data_dir, nb201_truth):
    images = data_dir / "inputs" / "cifar10_256.npz"
    result = invoke(["nb201", "--truth", str(nb201_truth), "--sample", "1",
                     "--input", str(images), "--synthetic", "grey"])  # fmt: skip
    assert result.exit_code == 2


def test_cli_jobs_two_records(tmp_path, nb201_truth):
    records = tmp_path / "rec.jsonl"
    result = invoke(["nb201", "--truth", str(nb201_truth), "--sample", "4",
                     "--batch-size", str(BATCH), "-j", "2", "--no-cache",
                     "--records", str(records)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# onnxeps bench nb201\n")
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 4
    expected = run_bench("nb201", nb201_truth, sample=4, batch_size=BATCH)
    assert_same_records(lines, expected.records)


def test_cli_address_needs_ray(nb201_truth):
    result = invoke(["nb201", "--truth", str(nb201_truth), "--address", "host:6379"])
    assert result.exit_code == 2
    assert "--address needs --engine ray" in result.stderr
