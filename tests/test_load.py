"""Tests of model loading and the model's SHA-256 identity."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper

from onnxeps.errors import ModelLoadError
from onnxeps.load import load_model

_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[N,3] x) => (float[N,2] y) {
  h = MatMul (x, w1)
  y = MatMul (h, w2)
}
"""


def tiny_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(_TEXT)
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (3, 4)), ("w2", (4, 2))):
        array = rng.standard_normal(shape).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def sha256_of(*paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_load_path_hash_and_label(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_model(), path)
    loaded = load_model(path)
    assert loaded.sha256 == sha256_of(path)
    assert loaded.label == str(path)
    assert loaded.base_dir == tmp_path
    assert len(loaded.proto.graph.node) == 2


def test_load_string_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_model(), path)
    assert load_model(str(path)).label == str(path)


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(ModelLoadError, match=r"missing\.onnx: file not found\.$"):
        load_model(tmp_path / "missing.onnx")


def test_load_folder_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(tmp_path)


def test_load_not_onnx_raises(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("These are notes, not a model.\n")
    with pytest.raises(ModelLoadError, match=r"notes\.onnx: not a valid ONNX model"):
        load_model(path)


def test_load_empty_file_raises(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_model(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_load_truncated_raises(tmp_path, fraction):
    data = tiny_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match=r"cut\.onnx: not a valid ONNX model"):
        load_model(path)


def test_load_truncated_after_graph_raises(tmp_path):
    # Cut exactly where the opset imports start: the rest still parses.
    model = tiny_model()
    without_opsets = onnx.ModelProto()
    without_opsets.CopyFrom(model)
    del without_opsets.opset_import[:]
    data = model.SerializeToString()
    prefix = without_opsets.SerializeToString()
    assert data.startswith(prefix)
    path = tmp_path / "cut.onnx"
    path.write_bytes(prefix)
    with pytest.raises(ModelLoadError, match="opset import"):
        load_model(path)


def test_load_message_has_hint(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("not a model")
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    assert caught.value.hint == "Check that the file is a complete .onnx export."


def _save_external(tmp_path, one_file: bool):
    path = tmp_path / "external.onnx"
    onnx.save_model(
        tiny_model(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location="weights.bin" if one_file else None,
        size_threshold=0,
    )
    return path


def test_load_external_data_hash(tmp_path):
    path = _save_external(tmp_path, one_file=True)
    loaded = load_model(path)
    assert loaded.sha256 == sha256_of(path, tmp_path / "weights.bin")
    assert loaded.sha256 != sha256_of(path)


def test_load_external_data_stays_external(tmp_path):
    path = _save_external(tmp_path, one_file=True)
    loaded = load_model(path)
    for tensor in loaded.proto.graph.initializer:
        assert external_data_helper.uses_external_data(tensor)
        assert tensor.raw_data == b""


def test_load_external_files_in_reference_order(tmp_path):
    path = _save_external(tmp_path, one_file=False)
    model = onnx.load(path, load_external_data=False)
    locations = [
        external_data_helper.ExternalDataInfo(tensor).location
        for tensor in model.graph.initializer
    ]
    assert len(locations) == 2
    expected = sha256_of(path, *(tmp_path / location for location in locations))
    assert load_model(path).sha256 == expected


def test_load_external_missing_raises(tmp_path):
    path = _save_external(tmp_path, one_file=True)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(
        ModelLoadError,
        match="external data file 'weights.bin' not found beside the model",
    ):
        load_model(path)


def test_load_external_outside_folder_raises(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    model = tiny_model()
    onnx.save_model(
        model,
        tmp_path / "original.onnx",
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    moved = onnx.load(tmp_path / "original.onnx", load_external_data=False)
    for tensor in moved.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save_model(moved, inner / "escaped.onnx")
    with pytest.raises(ModelLoadError, match="points outside the model's folder"):
        load_model(inner / "escaped.onnx")


def test_load_proto_hash_of_serialisation():
    model = tiny_model()
    loaded = load_model(model)
    expected = hashlib.sha256(model.SerializeToString()).hexdigest()
    assert loaded.sha256 == expected
    assert loaded.label == "tiny"
    assert loaded.base_dir is None


def test_load_proto_is_a_copy():
    model = tiny_model()
    before = model.SerializeToString()
    loaded = load_model(model)
    loaded.proto.graph.node.pop()
    del loaded.proto.graph.initializer[:]
    assert model.SerializeToString() == before
    assert loaded.proto is not model


def test_load_proto_unnamed_graph_label():
    model = tiny_model()
    model.graph.name = ""
    assert load_model(model).label == "<in-memory model>"


def test_load_label_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save_model(tiny_model(), tmp_path / "tiny.onnx")
    assert load_model("./tiny.onnx").label == "./tiny.onnx"


def test_load_missing_message_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"^\./missing\.onnx: file not found\.$"):
        load_model("./missing.onnx")


def test_load_checker_failure_warns(tmp_path):
    model = tiny_model()
    model.graph.node[1].input[0] = "undefined_tensor"
    path = tmp_path / "broken.onnx"
    onnx.save_model(model, path)
    loaded = load_model(path)
    assert len(loaded.warnings) == 1
    assert loaded.warnings[0].startswith("onnx.checker rejects the model (")


def test_load_valid_model_no_warnings(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_model(), path)
    assert load_model(path).warnings == []
    assert load_model(tiny_model()).warnings == []
