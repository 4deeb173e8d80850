"""Tests of input batches: synthetic kinds, .npy/.npz files and user arrays."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxeps.errors import InputError
from onnxeps.inputs import (
    batch_from_arrays,
    input_specs,
    read_array_file,
    synthetic_batch,
)
from onnxeps.plan import build_plan

_HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def make_model(text: str, **initializers) -> onnx.ModelProto:
    model = onnx.parser.parse_model(_HEADER + text)
    for name, array in initializers.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def synthesise(model, kind=None, batch_size=8, seq_len=5, seed=21):
    plan = build_plan(model)
    rng = np.random.default_rng(seed)
    return synthetic_batch(model, plan, kind, batch_size, seq_len, rng)


_IMAGE = """
g (float[N,3,4,4] x) => (float[N,3,4,4] y) { y = Relu (x) }
"""
_IMAGE_64 = """
g (double[N,2] x) => (double[N,2] y) { y = Relu (x) }
"""


def _token_model(dims: str = "seq, batch", rows: int = 10) -> onnx.ModelProto:
    text = f"""
    g (int64[{dims}] tokens) => (float[{dims}, 4] y) {{ y = Gather (table, tokens) }}
    """
    return make_model(text, table=np.ones((rows, 4), np.float32))


# Synthetic batches


def test_synthetic_grey_exact_values():
    batch = synthesise(make_model(_IMAGE), batch_size=8)
    x = batch.feeds["x"]
    assert x.shape == (8, 3, 4, 4)
    assert x.dtype == np.float32
    for i in range(8):
        assert np.all(x[i] == np.float32(i / 8)), i
    assert batch.batch_size == 8
    assert batch.description == "synthetic:x=grey"
    assert batch.warnings == []


def test_synthetic_grey_float64():
    batch = synthesise(make_model(_IMAGE_64), batch_size=3)
    x = batch.feeds["x"]
    assert x.dtype == np.float64
    assert x[:, 0].tolist() == [0.0, 1 / 3, 2 / 3]


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_synthetic_seed_determinism(kind):
    model = make_model(_IMAGE)
    first = synthesise(model, kind, seed=3).feeds["x"]
    again = synthesise(model, kind, seed=3).feeds["x"]
    other = synthesise(model, kind, seed=4).feeds["x"]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_synthetic_uniform_range():
    x = synthesise(make_model(_IMAGE), "uniform").feeds["x"]
    assert x.min() >= 0.0
    assert x.max() < 1.0


def test_synthetic_normal_draws_from_seed():
    x = synthesise(make_model(_IMAGE), "normal", batch_size=2, seed=9).feeds["x"]
    expected = np.random.default_rng(9).standard_normal((2, 3, 4, 4))
    assert np.array_equal(x, expected.astype(np.float32))


def test_synthetic_tokens_below_vocabulary():
    batch = synthesise(_token_model(rows=10), batch_size=64, seq_len=7)
    tokens = batch.feeds["tokens"]
    assert tokens.shape == (7, 64)
    assert tokens.dtype == np.int64
    assert tokens.min() >= 0
    assert tokens.max() < 10
    assert batch.batch_size == 64
    assert batch.description == "synthetic:tokens=tokens"


def test_synthetic_grey_on_ids_warns():
    batch = synthesise(_token_model(rows=10), "grey", batch_size=4)
    assert batch.description == "synthetic:tokens=tokens"
    assert batch.warnings == [
        "input 'tokens' is int64, so it gets tokens instead of the requested synthetic grey"
    ]


def test_synthetic_default_kind_no_warning():
    assert synthesise(_token_model(rows=10), batch_size=4).warnings == []


def test_synthetic_tokens_single_letter_axes():
    # N names the batch axis even though S comes first.
    batch = synthesise(_token_model("S, N"), batch_size=6, seq_len=4)
    assert batch.feeds["tokens"].shape == (4, 6)
    assert batch.batch_size == 6


def test_synthetic_tokens_batch_first():
    batch = synthesise(_token_model("batch, sequence"), batch_size=6, seq_len=4)
    assert batch.feeds["tokens"].shape == (6, 4)


def test_synthetic_tokens_smallest_table():
    text = """
    g (int64[seq, batch] tokens) => (float[seq, batch, 4] y, float[seq, batch, 4] z) {
      y = Gather (big, tokens)
      ids = Identity (tokens)
      z = Gather (small, ids)
    }
    """
    model = make_model(
        text, big=np.ones((50, 4), np.float32), small=np.ones((3, 4), np.float32)
    )
    tokens = synthesise(model, batch_size=200).feeds["tokens"]
    assert tokens.max() < 3


def test_synthetic_tokens_table_through_identity():
    text = """
    g (int64[seq, batch] tokens) => (float[seq, batch, 4] y) {
      rows = Identity (table)
      y = Gather (rows, tokens)
    }
    """
    model = make_model(text, table=np.ones((6, 4), np.float32))
    tokens = synthesise(model, batch_size=200).feeds["tokens"]
    assert tokens.max() < 6


def test_synthetic_tokens_transposed_table():
    # The Gather reads the (10, 4) transpose of a (4, 10) table: 10 rows.
    text = """
    g (int64[seq, batch] tokens) => (float[seq, batch, 4] y) {
      rows = Transpose <perm = [1, 0]> (table)
      y = Gather (rows, tokens)
    }
    """
    model = make_model(text, table=np.ones((4, 10), np.float32))
    tokens = synthesise(model, batch_size=200).feeds["tokens"]
    assert tokens.max() < 10
    assert tokens.max() >= 4


def test_synthetic_integer_without_embedding_raises():
    model = make_model("g (int64[N,3] x) => (int64[N,3] y) { y = Neg (x) }")
    with pytest.raises(
        InputError, match="integer input 'x': no embedding table reads it"
    ):
        synthesise(model)


def test_synthetic_tokens_for_float_raises():
    with pytest.raises(
        InputError, match="--synthetic tokens needs integer inputs, but input 'x'"
    ):
        synthesise(make_model(_IMAGE), "tokens")


def test_synthetic_bool_input_all_true():
    text = """
    g (bool[N,3] mask, float[N,3] x) => (float[N,3] y) {
      zero = Constant <value_float = 0.0> ()
      y = Where (mask, x, zero)
    }
    """
    batch = synthesise(make_model(text), batch_size=4)
    assert batch.feeds["mask"].dtype == np.bool_
    assert batch.feeds["mask"].all()
    assert batch.description == "synthetic:mask=ones,x=grey"


def test_synthetic_fixed_batch_warns():
    model = make_model("g (float[2,3] x) => (float[2,3] y) { y = Relu (x) }")
    batch = synthesise(model, batch_size=8)
    assert batch.feeds["x"].shape == (2, 3)
    assert batch.batch_size == 2
    assert batch.warnings == [
        "input 'x' has a fixed batch axis of 2; scored at that batch size (small "
        "batches weaken the metric)"
    ]


def test_synthetic_unknown_dims_filled():
    model = make_model(_IMAGE)
    # An axis with neither a value nor a name.
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    batch = synthesise(model, batch_size=5)
    assert batch.feeds["x"].shape == (5, 3, 4, 4)


def test_synthetic_no_shape_raises():
    model = make_model(_IMAGE)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(InputError, match="model input 'x' has no declared shape"):
        synthesise(model)


def test_input_specs_skip_initializers():
    text = "g (float[N,3] x, float[3,3] w) => (float[N,3] y) { y = MatMul (x, w) }"
    model = make_model(text, w=np.eye(3, dtype=np.float32))
    specs = input_specs(model)
    assert [spec.name for spec in specs] == ["x"]
    assert specs[0].shape == ("N", 3)
    assert specs[0].describe_shape() == "(N, 3)"


# Array files


def test_read_npy_named_x(tmp_path):
    path = tmp_path / "batch.npy"
    np.save(path, np.arange(6.0).reshape(2, 3))
    arrays = read_array_file(path)
    assert list(arrays) == ["x"]
    assert arrays["x"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_read_npz_named_arrays(tmp_path):
    path = tmp_path / "batch.npz"
    np.savez(path, a=np.zeros(2), b=np.ones(3))
    arrays = read_array_file(path)
    assert sorted(arrays) == ["a", "b"]
    assert arrays["b"].tolist() == [1.0, 1.0, 1.0]


def test_read_missing_file_raises(tmp_path):
    with pytest.raises(InputError, match="missing.npy: input file not found"):
        read_array_file(tmp_path / "missing.npy")


def test_read_not_numpy_raises(tmp_path):
    path = tmp_path / "batch.npy"
    path.write_text("not an array\n")
    with pytest.raises(InputError, match="batch.npy: not a readable .npy or .npz file"):
        read_array_file(path)


def test_read_pickled_array_rejected(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a readable .npy or .npz file"):
        read_array_file(path)


def test_read_npz_pickled_member_rejected(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="an array in the file cannot be read"):
        read_array_file(path)


# Batches from arrays

_TWO_INPUTS = """
g (float[N,3] a, float[N,3] b) => (float[N,3] y) { y = Add (a, b) }
"""
_ONE_INPUT = """
g (float[N,3] img) => (float[N,3] y) { y = Relu (img) }
"""


def test_arrays_named_per_input():
    arrays = {"a": np.zeros((2, 3)), "b": np.ones((2, 3))}
    model = make_model(_TWO_INPUTS)
    batch = batch_from_arrays(model, arrays, "in.npz", "file:in.npz", None)
    assert sorted(batch.feeds) == ["a", "b"]
    assert batch.feeds["b"].dtype == np.float32
    assert batch.feeds["b"].tolist() == [[1.0] * 3] * 2
    assert batch.batch_size == 2
    assert batch.description == "file:in.npz"


def test_arrays_missing_input_raises():
    with pytest.raises(
        InputError, match=r"in.npz: no array for model inputs b \(arrays: a, c\)"
    ):
        batch_from_arrays(
            make_model(_TWO_INPUTS),
            {"a": np.zeros((2, 3)), "c": np.zeros((2, 3))},
            "in.npz",
            "file:in.npz",
            None,
        )


def test_arrays_one_input_prefers_name():
    arrays = {"x": np.zeros((2, 3)), "img": np.ones((2, 3)), "labels": np.zeros(2)}
    batch = batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npz", "d", None)
    assert batch.feeds["img"].tolist() == [[1.0] * 3] * 2


def test_arrays_one_input_uses_x():
    arrays = {"x": np.ones((2, 3)), "labels": np.zeros(2)}
    batch = batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npz", "d", None)
    assert batch.feeds["img"].tolist() == [[1.0] * 3] * 2


def test_arrays_one_input_only_array():
    arrays = {"images": np.ones((2, 3))}
    batch = batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npz", "d", None)
    assert batch.feeds["img"].shape == (2, 3)


def test_arrays_one_input_ambiguous_raises():
    arrays = {"first": np.ones((2, 3)), "second": np.ones((2, 3))}
    with pytest.raises(
        InputError, match="contains arrays first, second; none is named 'img' or 'x'"
    ):
        batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npz", "d", None)


def test_arrays_batch_size_keeps_first():
    arrays = {"x": np.arange(12.0).reshape(4, 3)}
    batch = batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npy", "d", 2)
    assert batch.feeds["img"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert batch.batch_size == 2


def test_arrays_sequence_first_batch_axis():
    # The token input is (seq, batch), so --batch-size keeps the first 3 columns.
    tokens = np.arange(28, dtype=np.int64).reshape(7, 4) % 10
    batch = batch_from_arrays(_token_model(), {"x": tokens}, "in.npy", "d", 3)
    assert batch.feeds["tokens"].shape == (7, 3)
    assert np.array_equal(batch.feeds["tokens"], tokens[:, :3])
    assert batch.batch_size == 3


def test_arrays_sequence_first_full_batch():
    tokens = np.zeros((7, 4), np.int64)
    batch = batch_from_arrays(_token_model(), {"x": tokens}, "in.npy", "d", None)
    assert batch.batch_size == 4


def test_arrays_too_few_samples_raises():
    arrays = {"x": np.zeros((2, 3))}
    with pytest.raises(
        InputError,
        match="input 'img' contains 2 samples, fewer than --batch-size 4. Pass "
        "--batch-size 2 or less",
    ):
        batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npy", "d", 4)


def test_arrays_shape_mismatch_names_both():
    arrays = {"x": np.zeros((2, 4))}
    with pytest.raises(
        InputError,
        match=r"in.npy: model input 'img' has shape \(N, 3\), but the array has "
        r"shape \(2, 4\)\.",
    ):
        batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npy", "d", None)


def test_arrays_rank_mismatch_raises():
    arrays = {"x": np.zeros((2, 3, 1))}
    with pytest.raises(
        InputError, match=r"has shape \(N, 3\), but the array has shape \(2, 3, 1\)"
    ):
        batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npy", "d", None)


def test_arrays_dtype_mismatch_names_input():
    arrays = {"x": np.zeros((2, 3), np.int64)}
    with pytest.raises(
        InputError, match="model input 'img' is float32, but the array is int64"
    ):
        batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npy", "d", None)


def test_arrays_float64_cast_to_float32():
    arrays = {"x": np.full((2, 3), 0.1, np.float64)}
    batch = batch_from_arrays(make_model(_ONE_INPUT), arrays, "in.npy", "d", None)
    assert batch.feeds["img"].dtype == np.float32
    assert batch.feeds["img"].flags["C_CONTIGUOUS"]


def _nhwc_images() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)


def test_arrays_uint8_nhwc_normalised():
    images = _nhwc_images()
    mean = [0.5, 0.4, 0.3]
    std = [0.2, 0.25, 0.3]
    batch = batch_from_arrays(
        make_model(_IMAGE), {"x": images}, "in.npy", "d", None, mean, std
    )
    x = batch.feeds["x"]
    assert x.shape == (2, 3, 4, 4)
    assert x.dtype == np.float32
    expected = images.transpose(0, 3, 1, 2) / 255.0
    channel = (1, 3, 1, 1)
    expected = (expected - np.reshape(mean, channel)) / np.reshape(std, channel)
    assert np.allclose(x, expected, rtol=1e-6, atol=1e-6)
    assert batch.warnings == []


def test_arrays_uint8_without_mean_warns():
    images = _nhwc_images()
    batch = batch_from_arrays(make_model(_IMAGE), {"x": images}, "in.npy", "d", None)
    assert np.allclose(batch.feeds["x"], images.transpose(0, 3, 1, 2) / 255.0)
    assert len(batch.warnings) == 1
    assert "scaled to [0, 1] without mean/std normalisation" in batch.warnings[0]


def test_arrays_uint8_mean_length_raises():
    with pytest.raises(
        InputError, match="--mean has 2 values but the images have 3 channels"
    ):
        batch_from_arrays(
            make_model(_IMAGE), {"x": _nhwc_images()}, "in.npy", "d", None, [0.5, 0.5]
        )


def test_arrays_uint8_single_mean_broadcasts():
    images = _nhwc_images()
    batch = batch_from_arrays(
        make_model(_IMAGE), {"x": images}, "in.npy", "d", None, [0.5], [0.25]
    )
    expected = (images.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25
    assert np.allclose(batch.feeds["x"], expected, rtol=1e-6, atol=1e-6)
