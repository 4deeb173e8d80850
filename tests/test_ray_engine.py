"""Tests of the Ray engine (onnxeps.ray_engine.ray_map) on a local Ray instance.

One Ray instance of two CPUs serves the module. It listens on loopback only, runs
without token authentication and keeps its files in a short folder under
``<repo>/.ray-tmp``, or under the system's temporary folder when the checkout's path is
too long for Ray's socket paths (107 characters).
Tests of starting, connecting and failing to connect run a separate driver process,
because one process can hold one Ray connection only.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytest
import ray_helpers

from onnxeps.engine import Job, make_task, run_job, run_jobs, start_worker
from onnxeps.errors import OnnxepsError
from onnxeps.ray_engine import (
    TASKS_PER_WORKER,
    RayConnectionError,
    RayNotInstalledError,
    WorkerLost,
    ray_map,
)

TESTS_DIR = Path(__file__).resolve().parent
RAY_TMP_ROOT = TESTS_DIR.parent / ".ray-tmp"
WORKERS = 2
PARITY_CELLS = 100
PARITY_SEED = 7

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray 2.60 use 127.0.0.1 as the node address,
# so every Ray server listens on loopback only. PYTHONPATH lets workers import
# ray_helpers.
RAY_ENVIRONMENT = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "PYTHONPATH": os.pathsep.join(
        path for path in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if path
    ),
}


# Ray puts sockets at TEMP/ray/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store,
# 68 characters below TEMP, and Linux allows 107 in a socket path.
_MAX_TEMP_CHARS = 107 - 68


def _short_temp_dir() -> Path:
    """Make a Ray temporary folder in the work tree, or under /tmp when the work tree's
    path is too long for Ray's socket paths."""
    root = RAY_TMP_ROOT
    if len(str(root)) + len("/t12345678") > _MAX_TEMP_CHARS:
        root = Path(tempfile.gettempdir()) / "oe-ray"
    root.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="t", dir=root))


@pytest.fixture(scope="module")
def ray_package():
    return pytest.importorskip("ray")


@pytest.fixture
def driver_temp_dir(ray_package):
    """Return a short temporary folder for a driver process's Ray files."""
    temp_dir = _short_temp_dir()
    yield temp_dir
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_instance(ray_package):
    """Start the module's local Ray instance, and stop it after the last test."""
    ray = ray_package
    temp_dir = _short_temp_dir()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_ENVIRONMENT.items():
            patch.setenv(name, value)
        # NOTE: Ray reads the variable once, at import, and this pytest run may have
        # imported Ray earlier, so the constant read from it is set as well.
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        ray.init(
            num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
            _temp_dir=str(temp_dir),
        )  # fmt: skip
        try:
            assert ray.util.get_node_ip_address() == "127.0.0.1"
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _run_driver(code: str, temp_dir: Path) -> subprocess.CompletedProcess:
    """Run Python code in a new process with the Ray test environment."""
    environment = os.environ | RAY_ENVIRONMENT | {"RAY_TMPDIR": str(temp_dir)}
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----- mapping -----


def test_ray_map_yields_every_index_once(ray_instance):
    results = list(ray_map(ray_helpers.square, range(20), workers=WORKERS))

    indices = [index for index, _ in results]
    assert sorted(indices) == list(range(20))
    assert dict(results) == {index: index * index for index in range(20)}


def test_initializer_runs_once_per_worker(ray_instance):
    results = list(
        ray_map(
            ray_helpers.initializer_calls, range(12), workers=WORKERS,
            initializer=ray_helpers.count_initializer,
        )
    )  # fmt: skip

    calls_by_process = dict(value for _, value in results)
    assert len(results) == 12
    assert set(calls_by_process.values()) == {1}


def test_results_stream_before_last_tasks_start(ray_instance):
    drawn = []

    def durations():
        for index in range(12):
            drawn.append(index)
            yield 0.2

    results = ray_map(ray_helpers.start_time_after_sleep, durations(), workers=WORKERS)
    next(results)
    first_arrival = time.time()
    drawn_at_first_result = len(drawn)
    later_starts = [started for _, started in results]

    assert drawn_at_first_result == TASKS_PER_WORKER * WORKERS
    assert len(later_starts) == 11
    assert first_arrival < max(later_starts)


def test_exited_worker_reported_as_worker_lost(ray_instance, tmp_path):
    marker = str(tmp_path / "exited")
    items = [(0, None), (1, None), (2, marker), (3, None), (4, None)]

    results = dict(ray_map(ray_helpers.exit_first_time, items, workers=WORKERS))

    assert sorted(results) == [0, 1, 2, 3, 4]
    assert isinstance(results[2], WorkerLost)
    assert "WorkerCrashedError" in str(results[2])
    assert "\n" not in str(results[2])
    assert {index: results[index] for index in (0, 1, 3, 4)} == {0: 0, 1: 1, 3: 3, 4: 4}


def test_interrupt_cancels_outstanding_tasks(ray_instance, tmp_path):
    # The first two items end after 1 s. The others write their file only after 4 s
    # more, so a loaded machine has time to cancel them.
    items = [(str(tmp_path / f"item{index}"), 1.0 if index < 2 else 4.0) for index in range(6)]

    with pytest.raises(KeyboardInterrupt):
        for _ in ray_map(ray_helpers.touch_after_sleep, items, workers=WORKERS):
            raise KeyboardInterrupt
    time.sleep(5.0)

    # Items 2 and 3 started when the first two finished, and were cancelled.
    touched = sorted(path.name for path in tmp_path.iterdir())
    assert "item2" not in touched
    assert "item3" not in touched
    assert "item4" not in touched


def test_function_error_propagates(ray_instance):
    with pytest.raises(ValueError, match="invalid literal"):
        list(ray_map(int, ["1", "one"], workers=WORKERS))


def test_missing_ray_raises_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)

    with pytest.raises(RayNotInstalledError) as raised:
        next(ray_map(ray_helpers.square, [1]))

    assert isinstance(raised.value, OnnxepsError)
    assert "pip install 'onnxeps[ray]'" in str(raised.value)


# ----- starting, connecting and failing to connect -----


def test_local_instance_started_and_stopped(driver_temp_dir):
    code = (
        "import json, ray\n"
        "from onnxeps.ray_engine import ray_map\n"
        "from ray_helpers import square\n"
        "results = sorted(ray_map(square, range(6), workers=1))\n"
        "print(json.dumps({'results': results, 'initialised': ray.is_initialized()}))\n"
    )
    finished = _run_driver(code, driver_temp_dir)

    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert len(lines) == 1, finished.stdout
    output = json.loads(lines[0])
    assert output["results"] == [[index, index * index] for index in range(6)]
    assert output["initialised"] is False


def test_address_connects_and_leaves_cluster_running(ray_instance, driver_temp_dir):
    address = ray_instance.get_runtime_context().gcs_address
    code = (
        "import json, ray\n"
        "from onnxeps.ray_engine import ray_map\n"
        "from ray_helpers import square\n"
        f"results = sorted(ray_map(square, range(4), address={address!r}))\n"
        "print(json.dumps({'results': results, 'initialised': ray.is_initialized()}))\n"
    )

    finished = _run_driver(code, driver_temp_dir)

    assert finished.returncode == 0, finished.stderr
    output = json.loads(finished.stdout)
    assert output["results"] == [[index, index * index] for index in range(4)]
    assert output["initialised"] is False
    assert list(ray_map(ray_helpers.square, [3])) == [(0, 9)]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "not-an-address"])
def test_bad_address_raises_one_line(address, driver_temp_dir):
    address = address.format(port=_closed_port())
    code = (
        "import json, time\n"
        "from onnxeps.ray_engine import ray_map\n"
        "started = time.monotonic()\n"
        "try:\n"
        f"    next(ray_map(abs, [1], address={address!r}))\n"
        "except Exception as error:\n"
        "    print(json.dumps({'type': type(error).__name__, 'message': str(error),\n"
        "                      'seconds': time.monotonic() - started}))\n"
    )

    finished = _run_driver(code, driver_temp_dir)

    assert finished.returncode == 0, finished.stderr
    output = json.loads(finished.stdout)
    assert output["type"] == RayConnectionError.__name__
    assert address in output["message"]
    assert "\n" not in output["message"]
    assert output["seconds"] < 10


# ----- scores -----


def _sample_cells(data_dir: Path) -> list[str]:
    with open(data_dir / "nb201" / "nb201_accuracy.csv", newline="") as table:
        arch_strings = [row["arch_str"] for row in csv.DictReader(table)]
    return random.Random(PARITY_SEED).sample(arch_strings, PARITY_CELLS)


def test_run_jobs_default_workers_on_ray(ray_instance, data_dir):
    # Without a worker count the Ray engine keeps every CPU of the cluster busy.
    cells = _sample_cells(data_dir)[:4]
    jobs = [Job.encoded(arch, "nb201", arch) for arch in cells]
    images = str(data_dir / "inputs" / "cifar10_256.npz")
    task = make_task(images, {"preset": "nb201", "batch_size": 8}, cache=False)
    outcomes = list(run_jobs(jobs, task, workers=None, engine="ray"))
    assert sorted(outcome.index for outcome in outcomes) == [0, 1, 2, 3]
    assert [outcome.error for outcome in outcomes] == [None] * 4


def _without_seconds(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "seconds"}


def test_ray_and_in_process_records_identical(ray_instance, data_dir):
    jobs = [Job.encoded(arch, "nb201", arch) for arch in _sample_cells(data_dir)]
    images = str(data_dir / "inputs" / "cifar10_256.npz")
    task = make_task(images, {"preset": "nb201", "batch_size": 8}, cache=False)

    on_ray = dict(
        ray_map(run_job, jobs, workers=WORKERS, initializer=partial(start_worker, task))
    )
    start_worker(task)
    in_process = [run_job(job) for job in jobs]

    assert sorted(on_ray) == list(range(PARITY_CELLS))
    assert [outcome.error for outcome in on_ray.values()] == [None] * PARITY_CELLS
    assert [outcome.error for outcome in in_process] == [None] * PARITY_CELLS
    assert any(outcome.record["epsilon"] is not None for outcome in in_process)
    for index, expected in enumerate(in_process):
        on_ray_record = _without_seconds(on_ray[index].record)
        assert on_ray_record == _without_seconds(expected.record)
