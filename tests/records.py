"""Comparison of score records, shared by the engine, CLI and bench tests."""

import pytest


def assert_same_record(record: dict, other: dict) -> None:
    """Check two records of one model: every key equal except ``seconds``, and
    epsilon equal within relative 1e-5 (worker thread counts change float rounding)."""
    for key in record.keys() - {"seconds", "epsilon"}:
        assert other[key] == record[key], (record["model"], key)
    if record["epsilon"] is None:
        assert other["epsilon"] is None, record["model"]
    else:
        assert other["epsilon"] == pytest.approx(record["epsilon"], rel=1e-5)
