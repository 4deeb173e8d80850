"""Tests of model loading and the model's SHA-256 identity."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from onnxeps.errors import ModelLoadError
from onnxeps.load import adopt_built_model, load_model, referenced_files

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
    with pytest.raises(ModelLoadError, match="not a file. Pass the path of an .onnx file"):
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


def test_adopt_built_model_same_identity():
    model = tiny_model()
    adopted = adopt_built_model(model)
    loaded = load_model(model)
    assert adopted.proto is model
    assert adopted.sha256 == loaded.sha256
    assert adopted.label == loaded.label
    assert adopted.base_dir is None


def test_adopt_built_model_given_hash():
    assert adopt_built_model(tiny_model(), "f" * 64).sha256 == "f" * 64


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


def labelled_model() -> onnx.ModelProto:
    """Return a model whose names are distinct tokens, to make one invalid UTF-8."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["INPUTNAME", "WEIGHTNAME"], ["HIDDENNAME"], name="NODENAME"),
         helper.make_node("Softmax", ["HIDDENNAME"], ["OUTPUTNAME"], name="SOFTNAME",
                          domain="ai.onnx", axis=1)],
        "GRAPHNAME", [helper.make_tensor_value_info("INPUTNAME", TensorProto.FLOAT, ["DIMPARAM", 3])],
        [helper.make_tensor_value_info("OUTPUTNAME", TensorProto.FLOAT, ["DIMPARAM", 2])],
        [numpy_helper.from_array(np.ones((3, 2), np.float32), "WEIGHTNAME")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"METAKEY": "value"})
    return model


def break_token(data: bytes, token: bytes) -> bytes:
    """Replace the third byte of ``token`` by 0xff, which is never valid UTF-8."""
    assert token in data
    return data.replace(token, token[:2] + b"\xff" + token[3:])


@pytest.mark.parametrize(
    ("token", "field"),
    [
        (b"NODENAME", "graph.node[0].name (in node of type MatMul)"),
        (b"MatMul", "graph.node[0].op_type"),
        (b"ai.onnx", "graph.node[1].domain (in node 'SOFTNAME' of type Softmax)"),
        (b"axis", "graph.node[1].attribute[0].name (in node 'SOFTNAME' of type Softmax)"),
        (b"WEIGHTNAME", "graph.initializer[0].name"),
        (b"INPUTNAME", "graph.input[0].name"),
        (b"OUTPUTNAME", "graph.output[0].name"),
        (b"METAKEY", "metadata_props[0].key"),
    ],
)
def test_load_non_utf8_string_rejected(tmp_path, token, field):
    path = tmp_path / "model.onnx"
    path.write_bytes(break_token(labelled_model().SerializeToString(), token))
    broken = token[:2] + b"\xff" + token[3:]
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    message = caught.value.message
    prefix = f"{path}: not a valid ONNX model: the string field {field} "
    assert message.startswith(prefix)
    assert message.endswith(f"is not valid UTF-8: {broken!r}.")
    assert "\n" not in str(caught.value)


def test_load_non_utf8_dim_param_rejected(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(break_token(labelled_model().SerializeToString(), b"DIMPARAM"))
    with pytest.raises(ModelLoadError, match=r"shape\.dim\[0\]\.dim_param is not valid UTF-8"):
        load_model(path)


def test_load_non_utf8_in_subgraph_names_path(tmp_path):
    branch = helper.make_graph(
        [helper.make_node("Identity", ["INNERNAME"], ["inner_out"])], "then", [],
        [helper.make_tensor_value_info("inner_out", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    path.write_bytes(break_token(model.SerializeToString(), b"INNERNAME"))
    with pytest.raises(
        ModelLoadError, match=r"graph\.node\[0\]\.attribute\[\d\]\.g\.node\[0\]\.input\[0\] "
        r"\(in node of type Identity\)",
    ):  # fmt: skip
        load_model(path)


def test_load_non_utf8_external_location_rejected(tmp_path):
    path = _save_external(tmp_path, one_file=True)
    path.write_bytes(break_token(path.read_bytes(), b"weights.bin"))
    with pytest.raises(ModelLoadError, match=r"external_data\[\d\]\.value is not valid"):
        load_model(path)
    assert referenced_files(path) == [path]


def test_load_proto_non_utf8_graph_name_label():
    model = onnx.ModelProto()
    model.ParseFromString(break_token(labelled_model().SerializeToString(), b"GRAPHNAME"))
    with pytest.raises(ModelLoadError, match=r"^<in-memory model>: .* graph\.name is not"):
        load_model(model)
