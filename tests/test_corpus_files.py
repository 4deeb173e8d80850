"""Run every model of the ONNX corpus through ``onnxeps score`` and check the rule that
every input either scores or fails cleanly.

The corpus contains 78 public .onnx files from many exporters, broken files included. For
each one the command line must exit 0 with exactly one JSON record, or exit 1 with
exactly one ``error:`` line on stderr and nothing on stdout. It must never print a Python
traceback, crash, hang or change the file (or its external data).

The files run as subprocesses on a pool of two workers that starts when the first test
requests a result. The whole corpus took 1.5 to 2 minutes on two cores shared with
other work. Set
``ONNXEPS_CORPUS_OUTCOMES=FILE`` to also write every run as one JSON line to FILE;
``benchmarks/corpus_outcomes.py --outcomes FILE`` turns that file into the table of
``docs/robustness.md``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from conftest import reference_data_dir

SCORE_KEYS = [
    "model", "sha256", "epsilon", "reason", "weights", "batch_size", "input", "output",
    "preset", "provider", "warnings", "seconds",
]  # fmt: skip
SCORE_OPTIONS = ["--batch-size", "8", "--format", "json", "--timeout", "60"]
# The per-model --timeout covers loading, rewriting and both runs. Starting Python and
# importing the runtime come on top, so a run still alive after this is a hang.
HANG_SECONDS = 180
WORKERS = 2
OUTCOMES_ENV = "ONNXEPS_CORPUS_OUTCOMES"



def _manifest_rows(corpus: Path) -> list[dict[str, str]]:
    with open(corpus / "MANIFEST.csv", newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _corpus_params() -> list:
    """Return one parameter per corpus file, read at collection time.

    The tests themselves reach the files through the ``data_dir`` fixture. Without
    the corpus a single parameter remains, and the fixture or the first assert fails.
    """
    corpus = reference_data_dir() / "onnx-corpus"
    if not (corpus / "MANIFEST.csv").is_file():
        return [pytest.param("MANIFEST.csv", id="corpus-missing")]
    return [pytest.param(row["path"], id=row["path"]) for row in _manifest_rows(corpus)]


def onnxeps_command() -> list[str]:
    """Return the onnxeps entry point installed beside this interpreter."""
    script = Path(sys.executable).with_name("onnxeps")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from onnxeps.cli import main; main()"]


def sha256_of_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class CorpusRun:
    """One ``onnxeps score`` run on a corpus file."""

    path: str
    command: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    hung: bool
    sha256_before: str
    sha256_after: str


def run_corpus_file(corpus: Path, row: dict[str, str]) -> CorpusRun:
    """Score one corpus file in a subprocess and hash its files before and after."""
    model = corpus / row["path"]
    files = [model] + [corpus / p for p in row["external_data_files"].split(";") if p]
    before = sha256_of_files(files)
    command = [*onnxeps_command(), "score", str(model), *SCORE_OPTIONS]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=HANG_SECONDS, check=False
        )
        returncode, stdout, stderr, hung = done.returncode, done.stdout, done.stderr, False
    except subprocess.TimeoutExpired as expired:
        returncode, hung = None, True
        stdout = (expired.stdout or b"").decode("utf-8", "replace")
        stderr = (expired.stderr or b"").decode("utf-8", "replace")
    seconds = time.monotonic() - started
    after = sha256_of_files(files)
    return CorpusRun(
        row["path"], command, returncode, stdout, stderr, seconds, hung, before, after
    )


def _selected_paths(request) -> set[str]:
    """Return the corpus paths of the tests this session runs, after -k and other filters."""
    return {
        item.callspec.params["path"]
        for item in request.session.items
        if item.originalname == "test_corpus_file_scores_or_fails_cleanly"
    }


@pytest.fixture(scope="module")
def corpus_runs(request, data_dir):
    """Start every selected corpus file on the worker pool and map its path to the future."""
    corpus = data_dir / "onnx-corpus"
    selected = _selected_paths(request)
    rows = [row for row in _manifest_rows(corpus) if row["path"] in selected]
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures: dict[str, Future] = {
        row["path"]: pool.submit(run_corpus_file, corpus, row) for row in rows
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=False)
    target = os.environ.get(OUTCOMES_ENV)
    if target:
        with open(target, "w", encoding="utf-8") as stream:
            for path, future in futures.items():
                stream.write(json.dumps(asdict(future.result())) + "\n")


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_corpus_manifest_lists_files(data_dir):
    corpus = data_dir / "onnx-corpus"
    listed = {row["path"] for row in _manifest_rows(corpus)}
    on_disk = {str(p.relative_to(corpus)) for p in corpus.rglob("*.onnx")}
    assert listed == on_disk


@pytest.mark.parametrize("path", _corpus_params())
def test_corpus_file_scores_or_fails_cleanly(path, corpus_runs):
    run: CorpusRun = corpus_runs[path].result()
    assert not run.hung, f"no exit after {HANG_SECONDS} s with --timeout 60"
    assert run.returncode in (0, 1), f"exit code {run.returncode}: {run.stderr[-2000:]}"
    assert "Traceback" not in run.stdout
    assert "Traceback" not in run.stderr
    assert run.sha256_after == run.sha256_before, "the model or its external data changed"
    if run.returncode == 0:
        records = nonempty_lines(run.stdout)
        assert len(records) == 1, f"stdout is not one JSON line: {run.stdout[:2000]}"
        record = json.loads(records[0])
        assert list(record) == SCORE_KEYS
        if record["epsilon"] is None:
            assert record["reason"], "epsilon is null without a reason"
        else:
            assert math.isfinite(record["epsilon"])
    else:
        errors = nonempty_lines(run.stderr)
        assert run.stdout.strip() == "", f"stdout on failure: {run.stdout[:2000]}"
        assert len(errors) == 1, f"stderr is not one line: {run.stderr[:2000]}"
        assert errors[0].startswith("error:"), errors[0]
        assert "internal error" not in errors[0], errors[0]
        # run_passes words an unexpected exception inside a pass as "rewrite pass X failed".
        assert "rewrite pass" not in errors[0], errors[0]
