"""Tests of the result cache: its folder, its key and its entries."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxeps.cache as cache_module
from onnxeps.cache import (
    KEYED_SETTINGS,
    ResultCache,
    cache_key,
    default_cache_dir,
    input_identity,
    model_sha256,
)

SHA = "a" * 64
KEY = "0123" + "f" * 60
RECORD = {"model": "m.onnx", "sha256": SHA, "epsilon": 0.5, "warnings": []}
# One value per keyed setting that differs from its value in BASE_OPTIONS.
OTHER_VALUES = {
    "weights": (1e-5, 1.0),
    "synthetic": "normal",
    "batch_size": 16,
    "seed": 22,
    "output_name": "hidden",
    "device": "cuda",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.2, 0.2, 0.2),
    "seq_len": 35,
    "strict": True,
    "collapse": False,
    "preset": "nb201",
}
BASE_OPTIONS = {"batch_size": 8, "seed": 21, "seq_len": 70, "device": "cpu"}


# ----- folder -----


def test_folder_from_onnxeps_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXEPS_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"


def test_folder_from_xdg_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("ONNXEPS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "onnxeps"


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_folder_ignores_unusable_xdg(monkeypatch, tmp_path, xdg):
    monkeypatch.delenv("ONNXEPS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "onnxeps"


# ----- key -----


def test_keyed_settings_are_the_score_changing_ones():
    assert set(KEYED_SETTINGS) == set(OTHER_VALUES)


def test_key_repeatable():
    first = cache_key("score", SHA, dict(BASE_OPTIONS), None)
    assert first == cache_key("score", SHA, dict(BASE_OPTIONS), None)
    assert len(first) == 64


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_key_changes_with_setting(name):
    base = cache_key("score", SHA, BASE_OPTIONS, None)
    changed = cache_key("score", SHA, BASE_OPTIONS | {name: OTHER_VALUES[name]}, None)
    assert changed != base


def test_key_ignores_timeout():
    base = cache_key("score", SHA, BASE_OPTIONS, None)
    assert cache_key("score", SHA, BASE_OPTIONS | {"timeout": 5.0}, None) == base


def test_key_changes_with_model_kind_and_input():
    base = cache_key("score", SHA, BASE_OPTIONS, None)
    assert cache_key("score", "b" * 64, BASE_OPTIONS, None) != base
    assert cache_key("bench", SHA, BASE_OPTIONS, None) != base
    identity = {"path": "x.npy", "sha256": SHA}
    assert cache_key("score", SHA, BASE_OPTIONS, identity) != base


def test_key_changes_with_versions(monkeypatch):
    base = cache_key("score", SHA, BASE_OPTIONS, None)
    versions = cache_module._versions()
    for name in ("onnxeps", "onnxruntime"):
        changed = versions | {name: "0.0.0"}
        monkeypatch.setattr(cache_module, "_versions", lambda changed=changed: changed)
        assert cache_key("score", SHA, BASE_OPTIONS, None) != base


def test_versions_name_runtime():
    versions = cache_module._versions()
    assert versions["onnxeps"]
    assert versions["onnxruntime"].split()[0][0].isdigit()


# ----- identities -----


def test_input_identity_of_file(tmp_path):
    path = tmp_path / "batch.npy"
    np.save(path, np.zeros((4, 3), np.float32))
    identity = input_identity(str(path))
    assert identity["path"] == str(path)
    assert identity["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_input_identity_follows_bytes_and_path(tmp_path):
    first, second = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(first, np.zeros((4, 3), np.float32))
    np.save(second, np.zeros((4, 3), np.float32))
    before = input_identity(first)
    assert input_identity(second) != before  # same bytes, another path
    np.save(first, np.ones((4, 3), np.float32))
    assert input_identity(first) != before


def test_input_identity_of_arrays():
    array = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert input_identity(array) == input_identity(array.copy())
    assert input_identity(array) != input_identity(array.astype(np.float64))
    assert input_identity(array) != input_identity(array.reshape(3, 4))
    assert input_identity({"x": array}) != input_identity({"x": array + 1})
    assert input_identity(None) is None


def test_input_identity_missing_file(tmp_path):
    with pytest.raises(OSError):
        input_identity(tmp_path / "absent.npy")


def test_model_sha256_covers_external_data(tmp_path):
    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "m (float[N,3] x) => (float[N,1] y) { y = MatMul (x, w) }"
    )
    weight = np.array([[0.5], [-1.0], [2.0]], np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    expected = hashlib.sha256(path.read_bytes() + (tmp_path / "w.bin").read_bytes())
    assert model_sha256(path) == expected.hexdigest()


# ----- entries -----


def test_store_then_load(tmp_path):
    cache = ResultCache(tmp_path)
    cache.store(KEY, RECORD)
    assert cache.load(KEY, ["model", "epsilon"]) == RECORD
    assert (tmp_path / KEY[:2] / f"{KEY}.json").is_file()
    assert sorted(p.name for p in (tmp_path / KEY[:2]).iterdir()) == [f"{KEY}.json"]


def test_load_missing_entry(tmp_path):
    assert ResultCache(tmp_path).load(KEY, []) is None


def test_store_nan_as_null(tmp_path):
    cache = ResultCache(tmp_path)
    cache.store(KEY, RECORD | {"epsilon": float("nan")})
    assert cache.load(KEY, [])["epsilon"] is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"key": KEY, "record": "text"}),
        json.dumps({"key": "other", "record": RECORD}),
        b"\xff\xfe".decode("latin-1"),
    ],
)
def test_corrupt_entry_is_a_miss(tmp_path, caplog, content):
    path = tmp_path / KEY[:2] / f"{KEY}.json"
    path.parent.mkdir()
    path.write_text(content, encoding="latin-1")
    with caplog.at_level(logging.DEBUG, logger="onnxeps.cache"):
        assert ResultCache(tmp_path).load(KEY, []) is None
    assert str(path) in caplog.text


def test_entry_without_required_key_is_a_miss(tmp_path):
    cache = ResultCache(tmp_path)
    cache.store(KEY, RECORD)
    assert cache.load(KEY, ["model", "params"]) is None


def test_unwritable_folder_warns_once(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    cache = ResultCache(blocker)
    with caplog.at_level(logging.WARNING, logger="onnxeps.cache"):
        cache.store(KEY, RECORD)
        cache.store("ab" + KEY[2:], RECORD)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(blocker) in warnings[0].getMessage()
    assert "--no-cache" in warnings[0].getMessage()
    assert not cache.writable
    assert blocker.read_text() == "a file where the cache folder should be"


def test_entry_rewrite_replaces_whole_file(tmp_path):
    cache = ResultCache(tmp_path)
    cache.store(KEY, RECORD | {"warnings": ["x" * 5000]})
    cache.store(KEY, RECORD)
    entry = json.loads(Path(tmp_path / KEY[:2] / f"{KEY}.json").read_text())
    assert entry == {"key": KEY, "record": RECORD}


def test_load_wrong_type_is_miss(tmp_path):
    cache = ResultCache(tmp_path)
    cache.store(KEY, {"model": "m.onnx", "sha256": "a" * 64, "epsilon": 0.5, "warnings": 5})
    assert cache.load(KEY, ["model", "epsilon"]) is None
