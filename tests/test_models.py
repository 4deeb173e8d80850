"""The example models in models/: they score through the CLI, and the script that
regenerates them still writes models with the same scores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest

import onnxeps

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "models"
MODEL_NAMES = ["lstm_lm", "mlp", "resnet_bn"]
MAX_MODEL_BYTES = 1_000_000
CLI_TIMEOUT_S = 120
# Score record keys in the order of the interface contract.
RECORD_KEYS = [
    "model", "sha256", "epsilon", "reason", "weights", "batch_size", "input", "output",
    "preset", "provider", "warnings", "seconds",
]  # fmt: skip


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def onnxeps_command() -> list[str]:
    """Return the installed onnxeps console script, preferring this interpreter's."""
    script = Path(sys.executable).with_name("onnxeps")
    if script.is_file():
        return [str(script)]
    found = shutil.which("onnxeps")
    if found is None:
        pytest.fail("the onnxeps console script is not installed; run pip install -e .")
    return [found]


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*onnxeps_command(), *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def load_make_models():
    """Import models/make_models.py, which is a script rather than a package module."""
    name = "make_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MODELS_DIR / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


class CliRun:
    """One ``onnxeps score`` run with the model file's hash before and after."""

    def __init__(self, model: Path, *arguments: str) -> None:
        self.sha256_before = sha256_of(model)
        self.process = run_cli("score", str(model.relative_to(REPO_ROOT)), *arguments)
        self.sha256_after = sha256_of(model)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.process.stdout.splitlines()]


@pytest.fixture(scope="module")
def bundled_runs() -> dict[str, CliRun]:
    return {
        name: CliRun(MODELS_DIR / f"{name}.onnx", "--format", "json", "--batch-size", "16")
        for name in MODEL_NAMES
    }


@pytest.fixture(scope="module")
def cifar_run(data_dir) -> tuple[CliRun, Path]:
    batch = data_dir / "inputs" / "cifar10_256.npz"
    run = CliRun(
        MODELS_DIR / "resnet_bn.onnx",
        "--input", str(batch), "--preset", "nb201", "--batch-size", "64",
        "--format", "json",
    )  # fmt: skip
    return run, batch


def test_models_folder_lists_bundled_models():
    found = sorted(path.stem for path in MODELS_DIR.glob("*.onnx"))

    assert found == MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_file_size_small(name):
    assert (MODELS_DIR / f"{name}.onnx").stat().st_size < MAX_MODEL_BYTES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_readme_mentions_model(name):
    readme = (MODELS_DIR / "README.md").read_text(encoding="utf-8")

    assert f"{name}.onnx" in readme


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cli_score_bundled_model(name, bundled_runs):
    run = bundled_runs[name]
    process = run.process
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert len(lines) == 1, process.stdout
    record = json.loads(lines[0])

    assert list(record) == RECORD_KEYS
    assert record["model"] == f"models/{name}.onnx"
    assert record["sha256"] == run.sha256_before
    assert record["batch_size"] == 16
    assert record["epsilon"] is not None, record["reason"]
    assert math.isfinite(record["epsilon"])
    assert record["reason"] is None


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cli_score_leaves_model_unchanged(name, bundled_runs):
    run = bundled_runs[name]

    assert run.process.returncode == 0, run.process.stderr
    assert run.sha256_after == run.sha256_before


def test_cli_score_resnet_cifar_batch(cifar_run):
    run, batch = cifar_run
    assert run.process.returncode == 0, run.process.stderr
    records = run.records()
    assert len(records) == 1
    record = records[0]

    assert record["epsilon"] is not None, record["reason"]
    assert math.isfinite(record["epsilon"])
    assert record["input"] == f"file:{batch}"
    assert record["preset"] == "nb201"
    assert record["weights"] == [1e-7, 1.0]
    assert record["batch_size"] == 64
    assert run.sha256_after == run.sha256_before


def graph_structure(path: Path) -> tuple[list[str], list[tuple[str, tuple[int, ...]]]]:
    """Return a model's operator types in order and its initializers' names and shapes."""
    graph = onnx.load(path).graph
    op_types = [node.op_type for node in graph.node]
    initializers = [(tensor.name, tuple(tensor.dims)) for tensor in graph.initializer]
    return op_types, initializers


def test_make_models_main_matches_committed(tmp_path):
    pytest.importorskip("torch")
    make_models = load_make_models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and LSTM notes
        written = make_models.main(tmp_path)

    assert sorted(path.stem for path in written) == MODEL_NAMES
    for path in written:
        committed_path = MODELS_DIR / path.name
        committed_ops, committed_tensors = graph_structure(committed_path)
        regenerated_ops, regenerated_tensors = graph_structure(path)
        assert regenerated_ops == committed_ops, f"{path.name}: operators differ"
        assert regenerated_tensors == committed_tensors, f"{path.name}: initializers differ"
        committed = onnxeps.score(committed_path, batch_size=16)
        regenerated = onnxeps.score(path, batch_size=16)
        assert committed.epsilon is not None, f"{path.name}: {committed.reason}"
        assert regenerated.epsilon is not None, f"{path.name}: {regenerated.reason}"
        difference = abs(regenerated.epsilon - committed.epsilon)
        assert difference <= 1e-5 * abs(committed.epsilon), (
            f"{path.name}: regenerated {regenerated.epsilon!r}, "
            f"committed {committed.epsilon!r}; rerun python models/make_models.py"
        )
