"""Tests of the engine: the local process map, scoring jobs and the result cache."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxeps
from onnxeps.engine import (
    Job,
    WorkerDied,
    default_jobs,
    make_task,
    process_map,
    run_job,
    run_jobs,
    start_worker,
    worker_threads,
)
from inline_models import CONSTANT as _CONSTANT
from inline_models import HEADER as _HEADER
from inline_models import SQUARE as _SQUARE

BATCH = 8

_worker_tag = None


def tag_worker(tag: str) -> None:
    global _worker_tag
    _worker_tag = tag


def describe(item: int) -> tuple[int, int, str | None]:
    return item * item, os.getpid(), _worker_tag


def crash_on_three(item: int) -> int:
    if item == 3:
        os.kill(os.getpid(), signal.SIGSEGV)
    return item * 10


def crash_always(item: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return item


def fail_on_two(item: int) -> int:
    if item == 2:
        raise ValueError("item two")
    return item


def write_model(folder, name: str, text: str = _SQUARE, scale: float = 1.0) -> str:
    model = onnx.parser.parse_model(_HEADER + text)
    weight = np.array([[0.5], [-1.0], [2.0]], np.float32) * np.float32(scale)
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    path = folder / name
    onnx.save_model(model, path)
    return str(path)


def cache_files(folder) -> list:
    return sorted(path for path in folder.rglob("*.json"))


@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ONNXEPS_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def models(tmp_path) -> list[str]:
    # Different weights give different files, hence different cache keys.
    return [write_model(tmp_path, f"m{i}.onnx", scale=1.0 + i) for i in range(3)]


def score_task(cache: bool = True):
    return make_task(None, {"batch_size": BATCH}, cache=cache)


# ----- process_map -----


def test_pool_ignores_package_in_current_folder(tmp_path):
    # Run from a folder with its own onnxeps package, such as a source checkout, the
    # workers must still import the installed onnxeps. The fork server runs python -c,
    # which puts the current folder first on its module path.
    decoy = tmp_path / "onnxeps"
    decoy.mkdir()
    (decoy / "__init__.py").write_text('raise RuntimeError("imported the decoy package")\n')
    paths = [write_model(tmp_path, name) for name in ("a.onnx", "b.onnx")]
    command = Path(sys.executable).with_name("onnxeps")
    run = subprocess.run(
        [str(command), "score", *paths, "-j", "2", "--batch-size", str(BATCH),
         "--no-cache", "--format", "json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "decoy" not in run.stderr
    assert len(run.stdout.splitlines()) == 2


def test_map_in_process_keeps_order():
    results = list(process_map(describe, [3, 1, 2], workers=1, initializer=lambda: tag_worker("here")))
    assert [index for index, _ in results] == [0, 1, 2]
    assert [value[0] for _, value in results] == [9, 1, 4]
    assert {value[1] for _, value in results} == {os.getpid()}
    assert {value[2] for _, value in results} == {"here"}


def test_map_pool_runs_initializer_in_workers():
    from functools import partial

    items = list(range(6))
    results = dict(process_map(describe, items, workers=2, initializer=partial(tag_worker, "pool")))
    assert sorted(results) == items
    assert [results[i][0] for i in items] == [i * i for i in items]
    pids = {value[1] for value in results.values()}
    assert os.getpid() not in pids
    assert len(pids) <= 2
    assert {value[2] for value in results.values()} == {"pool"}


def test_map_worker_crash_reported_for_its_item():
    results = dict(process_map(crash_on_three, list(range(7)), workers=2))
    assert sorted(results) == list(range(7))
    assert isinstance(results[3], WorkerDied)
    assert "exited while scoring it" in str(results[3])
    assert {i: results[i] for i in results if i != 3} == {
        i: i * 10 for i in range(7) if i != 3
    }


def test_map_stops_after_crashes_in_a_row():
    results = dict(process_map(crash_always, list(range(8)), workers=2))
    assert sorted(results) == list(range(8))
    assert all(isinstance(value, WorkerDied) for value in results.values())
    assert any("in a row" in str(value) for value in results.values())


def test_map_function_error_propagates():
    with pytest.raises(ValueError, match="item two"):
        list(process_map(fail_on_two, list(range(5)), workers=2))


def test_map_rejects_address():
    with pytest.raises(ValueError, match="no address"):
        process_map(describe, [1], workers=1, address="ray://host:10001")


# ----- jobs -----


def test_run_job_error_is_one_line(tmp_path):
    start_worker(score_task(cache=False))
    missing = str(tmp_path / "missing.onnx")
    outcome = run_job(Job.file(missing))
    assert outcome.record is None
    assert outcome.error == f"{missing}: file not found."
    assert outcome.traceback is None


def test_run_jobs_failing_model_among_good(models, tmp_path):
    missing = str(tmp_path / "missing.onnx")
    paths = [models[0], missing, models[1], models[2]]
    outcomes = list(run_jobs([Job.file(p) for p in paths], score_task(), workers=2))
    assert sorted(outcome.index for outcome in outcomes) == [0, 1, 2, 3]
    by_label = {outcome.label: outcome for outcome in outcomes}
    assert by_label[missing].error == f"{missing}: file not found."
    for path in models:
        assert by_label[path].error is None
        assert by_label[path].record["model"] == path
        assert by_label[path].record["epsilon"] > 0


def test_run_jobs_in_process_order(models):
    outcomes = list(run_jobs([Job.file(p) for p in models], score_task(), workers=1))
    assert [outcome.label for outcome in outcomes] == models
    assert [outcome.index for outcome in outcomes] == [0, 1, 2]


def test_score_many_results_and_failures(models, tmp_path):
    missing = str(tmp_path / "missing.onnx")
    results = list(onnxeps.score_many([*models, missing], jobs=2, batch_size=BATCH))
    failures = [r for r in results if isinstance(r, onnxeps.ScoreFailure)]
    scored = [r for r in results if isinstance(r, onnxeps.ScoreResult)]
    assert len(failures) == 1
    assert failures[0].model == missing
    assert sorted(r.model for r in scored) == sorted(models)
    expected = onnxeps.score(models[0], batch_size=BATCH)
    first = next(r for r in scored if r.model == models[0])
    assert first.epsilon == expected.epsilon
    assert first.weights == expected.weights


def test_worker_threads_share_cores():
    assert worker_threads("local", 1) is None
    assert worker_threads("local", 2) == max(1, default_jobs() // 2)
    assert worker_threads("local", 4 * default_jobs()) == 1
    assert worker_threads("ray", 3) == 1


def test_run_jobs_passes_threads(models, monkeypatch):
    import onnxeps.engine

    seen: list = []
    real_score = onnxeps.engine.score

    def recording_score(*args, **kwargs):
        seen.append(kwargs.get("threads"))
        return real_score(*args, **kwargs)

    monkeypatch.setattr(onnxeps.engine, "score", recording_score)
    list(run_jobs([Job.file(models[0])], score_task(cache=False), workers=1))
    task = make_task(None, {"batch_size": BATCH, "threads": 3}, cache=False)
    list(run_jobs([Job.file(models[1])], task, workers=1))
    assert seen == [None, 3]


# ----- cache -----


def test_cache_miss_then_hit(models, cache_dir):
    jobs = [Job.file(p) for p in models]
    first = list(run_jobs(jobs, score_task(), workers=1))
    assert [outcome.cached for outcome in first] == [False] * 3
    assert len(cache_files(cache_dir)) == 3
    second = list(run_jobs(jobs, score_task(), workers=1))
    assert [outcome.cached for outcome in second] == [True] * 3
    assert [o.record for o in second] == [o.record for o in first]


def test_cache_hit_takes_label_as_given(models, cache_dir, tmp_path):
    list(run_jobs([Job.file(models[0])], score_task(), workers=1))
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(open(models[0], "rb").read())
    [outcome] = run_jobs([Job.file(str(copy))], score_task(), workers=1)
    assert outcome.cached
    assert outcome.record["model"] == str(copy)


def test_cache_off_reads_and_writes_nothing(models, cache_dir):
    jobs = [Job.file(p) for p in models]
    list(run_jobs(jobs, score_task(), workers=1))
    entries = {path: path.read_text() for path in cache_files(cache_dir)}
    outcomes = list(run_jobs(jobs, score_task(cache=False), workers=1))
    assert not any(outcome.cached for outcome in outcomes)
    assert {path: path.read_text() for path in cache_files(cache_dir)} == entries
    for path in entries:
        path.unlink()
    list(run_jobs(jobs, score_task(cache=False), workers=1))
    assert cache_files(cache_dir) == []


def test_cache_corrupt_entry_rescored(models, cache_dir):
    job = Job.file(models[0])
    [first] = run_jobs([job], score_task(), workers=1)
    [entry] = cache_files(cache_dir)
    entry.write_text('{"key": "truncated')
    [second] = run_jobs([job], score_task(), workers=1)
    assert not second.cached
    assert second.record["epsilon"] == first.record["epsilon"]
    assert json.loads(entry.read_text())["record"]["epsilon"] == first.record["epsilon"]


def test_cache_unwritable_folder_run_goes_on(models, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("ONNXEPS_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING):
        outcomes = list(run_jobs([Job.file(p) for p in models], score_task(), workers=1))
    assert all(outcome.record is not None for outcome in outcomes)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot write the result cache" in warnings[0].getMessage()


def test_cache_keeps_undefined_not_failures(cache_dir, tmp_path):
    constant = write_model(tmp_path, "constant.onnx", _CONSTANT)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    jobs = [Job.file(constant), Job.file(str(broken))]
    outcomes = list(run_jobs(jobs, score_task(), workers=1))
    assert outcomes[0].record["epsilon"] is None
    assert outcomes[1].error is not None
    [entry] = cache_files(cache_dir)
    assert json.loads(entry.read_text())["record"]["reason"] == outcomes[0].record["reason"]
    again = list(run_jobs(jobs, score_task(), workers=1))
    assert [outcome.cached for outcome in again] == [True, False]


def test_cache_key_follows_settings(models, cache_dir):
    job = Job.file(models[0])
    list(run_jobs([job], score_task(), workers=1))
    other = make_task(None, {"batch_size": BATCH, "seed": 7}, cache=True)
    [outcome] = run_jobs([job], other, workers=1)
    assert not outcome.cached
    assert len(cache_files(cache_dir)) == 2


def test_cache_hits_logged_at_end(models, cache_dir, caplog):
    jobs = [Job.file(p) for p in models]
    list(run_jobs(jobs[:2], score_task(), workers=1))
    with caplog.at_level(logging.INFO, logger="onnxeps.engine"):
        list(run_jobs(jobs, score_task(), workers=1))
    assert f"2 of 3 results came from the cache in {cache_dir}" in caplog.text


def test_cache_hits_from_pool_workers(models, cache_dir):
    jobs = [Job.file(p) for p in models]
    list(run_jobs(jobs, score_task(), workers=1))
    outcomes = list(run_jobs(jobs, score_task(), workers=2))
    assert all(outcome.cached for outcome in outcomes)


def test_task_without_readable_input_has_no_cache(tmp_path):
    task = make_task(str(tmp_path / "absent.npy"), {}, cache=True)
    assert task.cache_dir is None


def test_local_workers_share_available_memory(monkeypatch):
    from onnxeps import engine

    monkeypatch.setattr(engine, "available_memory", lambda: 8_000_000_000)
    task = make_task(None, {"batch_size": BATCH}, cache=False)
    assert engine._share_machine(task, "local", 4).options["memory_limit"] == 2_000_000_000
    assert "memory_limit" not in engine._share_machine(task, "local", 1).options
    assert "memory_limit" not in engine._share_machine(task, "ray", 4).options
    explicit = make_task(None, {"memory_limit": 10**9}, cache=False)
    assert engine._share_machine(explicit, "local", 4).options["memory_limit"] == 10**9


def test_file_changed_while_scored_not_cached(tmp_path, monkeypatch):
    from onnxeps import engine

    path = write_model(tmp_path, "m.onnx")
    real = engine.score

    def replaced_meanwhile(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        result.sha256 = "0" * 64  # the bytes scored are not the bytes hashed for the key
        return result

    monkeypatch.setattr(engine, "score", replaced_meanwhile)
    start_worker(score_task(cache=True))
    outcome = run_job(Job.file(path))
    assert outcome.record is not None
    assert outcome.cache_key is None
