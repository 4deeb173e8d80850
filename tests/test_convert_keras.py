"""Tests of the Keras converter (onnxeps.converters.keras_export and convert keras).

The main check is parity: epsilon of the converted model, scored by ``onnxeps.score``,
must equal epsilon computed natively in Keras within relative 1e-4. The native side
runs a clone of the model on the same batch. Every kernel and BatchNormalization gamma
is w, every bias and beta 0, and the embedding table contains the U(0, 1) values the core
draws. BatchNormalization runs in training mode (batch statistics) with dropout off.
Both outputs then go through ``onnxeps.epsilon``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

# Keras 3.15 converts tensors with np.array(x, copy=False), which NumPy 2 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
tf2onnx = pytest.importorskip("tf2onnx")

import onnxeps  # noqa: E402
from onnxeps.cli import main as cli_main  # noqa: E402
from onnxeps.converters import keras_export, nb201  # noqa: E402

PARITY_TOLERANCE = 1e-4
BATCH_SIZE = 32
SEQ_LEN = 12
VOCAB_SIZE = 100
EMBEDDING_DIM = 16
# The core's default seed. With an explicit input batch nothing is drawn before the
# embedding tables, so the first table is the first draw of this generator.
CORE_SEED = 21
NB201_ARCH = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|"
    "+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
)
NB201_WEIGHTS = (1e-7, 1.0)  # the nb201 preset


# ----- the models under test -----


def randomise_batch_norm(model) -> None:
    """Give every BatchNormalization random parameters and moving statistics, so a
    rewrite that kept any of them would change the score."""
    rng = np.random.default_rng(4)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, size=w.shape) if v.name == "gamma"
                    else rng.normal(size=w.shape) if v.name in ("beta", "moving_mean")
                    else rng.uniform(0.5, 2.0, size=w.shape)
                    for v, w in zip(layer.weights, layer.get_weights())
                ]
            )  # fmt: skip


# With constant weights and BatchNorm on batch statistics, a chain of convolutions,
# BatchNorm and ReLU is invariant to the scale w, so its epsilon is rounding noise. The
# CNNs below add a residual connection or a bounded activation (ReLU6, tanh), which
# make the output depend on w.


def cnn_with_batch_norm():
    """A residual CNN with BatchNorm, ReLU6 and dropout on 16x16x3 images (NHWC)."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    stem = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(stem)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(keras.layers.Add()([x, stem]))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(max_value=6.0)(x)
    x = keras.layers.Dropout(0.3)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    randomise_batch_norm(model)
    return model


def cnn_with_plain_batch_norm():
    """BatchNormalization without gamma and beta (scale=False, center=False)."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(scale=False, center=False)(x)
    x = keras.layers.Activation("tanh")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    randomise_batch_norm(model)
    return model


def mlp():
    inputs = keras.Input((24,), name="features")
    x = keras.layers.Dense(32, activation="relu")(inputs)
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Dense(32, activation="tanh")(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


def lstm_model():
    """An embedding, an LSTM over (batch, seq) token ids and a per-step decoder."""
    inputs = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCAB_SIZE, EMBEDDING_DIM)(inputs)
    x = keras.layers.LSTM(24, return_sequences=True)(x)
    return keras.Model(inputs, keras.layers.Dense(VOCAB_SIZE)(x))


class Case(NamedTuple):
    factory: Callable
    batch_shape: tuple[int, ...]
    weight_pairs: list[tuple[float, float]]


CASES = {
    "cnn": Case(
        cnn_with_batch_norm, (BATCH_SIZE, 16, 16, 3), [(1e-7, 1.0), (1e-4, 10.0)]
    ),
    "cnn_plain_bn": Case(
        cnn_with_plain_batch_norm, (BATCH_SIZE, 8, 8, 3), [(1e-7, 1.0)]
    ),
    "mlp": Case(mlp, (BATCH_SIZE, 24), [(1e-7, 1.0), (1e-4, 10.0)]),
    "lstm": Case(lstm_model, (BATCH_SIZE, SEQ_LEN), [(1e-7, 1.0), (1e-5, 1e-3)]),
}
PARITY_CASES = [
    (name, pair) for name, case in CASES.items() for pair in case.weight_pairs
]
PARITY_IDS = [f"{name}-w{pair[0]:g}-{pair[1]:g}" for name, pair in PARITY_CASES]


def case_batch(name: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return (batch, embedding tables) for the case."""
    shape = CASES[name].batch_shape
    if name == "lstm":
        tokens = np.random.default_rng(7).integers(0, VOCAB_SIZE, size=shape)
        table = np.random.default_rng(CORE_SEED).random((VOCAB_SIZE, EMBEDDING_DIM))
        return tokens.astype(np.int32), [table.astype(np.float32)]
    return np.random.default_rng(5).normal(size=shape).astype(np.float32), []


# ----- the Keras-native epsilon -----

_WEIGHT_NAMES = {"kernel", "recurrent_kernel", "gamma"}
_ZERO_NAMES = {"bias", "beta"}
_STATISTIC_NAMES = {"moving_mean", "moving_variance"}


def set_constants(model, weight: float, tables: list[np.ndarray]) -> None:
    """Set every variable by its name: kernels and gamma to w, biases and beta to 0,
    and embedding tables from ``tables`` in order. Moving statistics stay unused."""
    pending = list(tables)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if variable.name in _WEIGHT_NAMES:
            variable.assign(np.full(shape, weight, dtype=np.float32))
        elif variable.name in _ZERO_NAMES:
            variable.assign(np.zeros(shape, dtype=np.float32))
        elif variable.name == "embeddings":
            variable.assign(pending.pop(0))
        elif variable.name not in _STATISTIC_NAMES:
            raise TypeError(f"no constant rule for variable {variable.path}")


def use_batch_statistics(model) -> None:
    """Make every BatchNormalization layer of ``model`` run in training mode."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            original = layer.call

            def call(inputs, training=None, mask=None, original=original):
                return original(inputs, training=True, mask=mask)

            object.__setattr__(layer, "call", call)


def native_output(model, batch: np.ndarray, weight: float, tables) -> np.ndarray:
    clone = keras.models.clone_model(model)
    set_constants(clone, weight, tables)
    use_batch_statistics(clone)
    output = clone(batch, training=False)  # training=False turns dropout off
    return keras.ops.convert_to_numpy(output).astype(np.float64)


def native_epsilon(model, batch: np.ndarray, weights, tables=()) -> float:
    outputs = [native_output(model, batch, weight, tables) for weight in weights]
    return onnxeps.epsilon(outputs[0], outputs[1]).value


def onnx_epsilon(model, batch: np.ndarray, weights) -> float:
    result = onnxeps.score(model, inputs=batch, weights=weights, seed=CORE_SEED)
    return math.nan if result.epsilon is None else result.epsilon


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def nodes_of(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op_type]


@pytest.fixture(scope="module")
def models() -> dict:
    keras.utils.set_random_seed(0)
    return {name: case.factory() for name, case in CASES.items()}


@pytest.fixture(scope="module")
def converted(models) -> dict[str, onnx.ModelProto]:
    return {name: keras_export.export(model) for name, model in models.items()}


# ----- parity -----


@pytest.mark.parametrize(("name", "weights"), PARITY_CASES, ids=PARITY_IDS)
def test_export_parity_with_keras(name, weights, models, converted):
    batch, tables = case_batch(name)
    expected = native_epsilon(models[name], batch, weights, tables)
    scored = onnx_epsilon(converted[name], batch, weights)

    assert math.isfinite(expected), f"native epsilon of {name} is undefined"
    assert math.isfinite(scored), f"onnxeps epsilon of {name} is undefined"
    assert relative_difference(scored, expected) <= PARITY_TOLERANCE, (
        f"{name}: onnxeps {scored!r}, keras {expected!r}"
    )


def test_native_helper_detects_moving_statistics(models):
    """Parity must fail if either side used the moving statistics."""
    model = models["cnn"]
    batch, _ = case_batch("cnn")
    weights = CASES["cnn"].weight_pairs[0]
    outputs = []
    for weight in weights:
        clone = keras.models.clone_model(model)
        set_constants(clone, weight, [])
        output = clone(batch, training=False)
        outputs.append(keras.ops.convert_to_numpy(output).astype(np.float64))
    moving = onnxeps.epsilon(outputs[0], outputs[1]).value

    assert math.isfinite(moving)
    assert relative_difference(moving, native_epsilon(model, batch, weights)) > 1e-3


# ----- structure and metadata -----


def test_export_keeps_batchnorm_nodes(converted):
    model = converted["cnn"]
    batch_norms = nodes_of(model, "BatchNormalization")
    names = [tensor.name for tensor in model.graph.initializer]

    assert len(batch_norms) == 3
    assert not any(name.endswith("_fused_bn") for name in names)
    assert "Dropout" not in {node.op_type for node in model.graph.node}


def test_export_records_settings(converted):
    found = metadata(converted["cnn"])
    settings = json.loads(found["onnxeps.export_settings"])

    assert found["onnxeps.converter"] == keras_export.CONVERTER_ID
    assert found["onnxeps.exporter"].startswith(f"tf2onnx {tf2onnx.__version__}")
    assert found["onnxeps.normalisation"] == "kept"
    assert "remove_back_to_back" in settings["tf2onnx_optimizers_skipped"]
    assert settings["opset"] == 17


@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_export_without_batchnorm_records_absent(name, converted):
    assert metadata(converted[name])["onnxeps.normalisation"] == "absent"


def test_export_lstm_becomes_lstm_operator(converted):
    op_types = {node.op_type for node in converted["lstm"].graph.node}

    assert "LSTM" in op_types
    assert "Loop" not in op_types


def test_export_names_batch_axis(converted):
    model = converted["cnn"]
    input_dims = model.graph.input[0].type.tensor_type.shape.dim
    output_dims = model.graph.output[0].type.tensor_type.shape.dim

    assert model.graph.input[0].name == "image"
    assert model.graph.output[0].name == "output"
    assert input_dims[0].dim_param == "batch"
    assert output_dims[0].dim_param == "batch"
    assert [dim.dim_value for dim in input_dims[1:]] == [16, 16, 3]


def test_export_plain_batchnorm_scale_hinted_keep(converted):
    model = converted["cnn_plain_bn"]
    hints = json.loads(metadata(model)["onnxeps.roles"])
    batch_norm = nodes_of(model, "BatchNormalization")[0]

    assert hints == {batch_norm.input[1]: "keep"}


@pytest.mark.parametrize("name", list(CASES))
def test_export_plan_has_no_warnings(name, converted):
    assert onnxeps.plan(converted[name]).warnings == []


def test_export_leaves_model_unchanged(models):
    model = models["cnn"]
    before = [np.array(value) for value in model.get_weights()]
    keras_export.export(model)
    after = model.get_weights()
    batch_norms = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]

    for old, new in zip(before, after):
        assert np.array_equal(old, new)
    for layer in batch_norms:
        assert "call" not in vars(layer), f"{layer.name} keeps the patched call"


def test_export_input_shape_overrides(models):
    model = keras_export.export(models["mlp"], input_shape=(7, 24))
    dims = model.graph.input[0].type.tensor_type.shape.dim

    assert dims[0].dim_param == "batch"
    assert dims[1].dim_value == 24


def test_export_rejects_non_keras():
    with pytest.raises(TypeError, match="Keras model"):
        keras_export.export(object())


def test_export_rejects_unsupported_op():
    """tf2onnx 1.17 cannot convert the exact GELU (Erfc)."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="gelu")(inputs))

    with pytest.raises(ValueError, match="Erfc"):
        keras_export.export(model)


# ----- detection of folded normalisation -----


def test_plan_warns_on_default_tf2onnx_route(models):
    """tf2onnx's own route folds Keras BatchNorm into the convolutions."""
    model = models["cnn"]
    signature = (tf.TensorSpec((None, 16, 16, 3), tf.float32, name="image"),)
    function = tf.function(lambda image: model(image, training=False))
    folded, _ = tf2onnx.convert.from_function(
        function, input_signature=signature, opset=17
    )
    found = onnxeps.plan(folded).warnings

    assert "BatchNormalization" not in {node.op_type for node in folded.graph.node}
    assert any("never had normalisation" in text for text in found)


def test_plan_names_tf2onnx_fusion():
    """tf2onnx fuses a Conv followed by a FusedBatchNormV3 and names the result."""

    @tf.function
    def conv_batch_norm(image):
        # Constants made inside the function become Const nodes that tf2onnx can fold.
        kernel = tf.constant(np.ones((3, 3, 3, 4), np.float32))
        scale = tf.constant(np.linspace(0.5, 1.5, 4, dtype=np.float32))
        offset = tf.constant(np.linspace(-1.0, 1.0, 4, dtype=np.float32))
        x = tf.nn.conv2d(image, kernel, 1, "SAME")
        y = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=scale,
            offset=offset,
            mean=offset,
            variance=scale,
            is_training=False,
        )
        return tf.nn.relu(y[0])

    signature = (tf.TensorSpec((None, 8, 8, 3), tf.float32, name="image"),)
    fused, _ = tf2onnx.convert.from_function(conv_batch_norm, input_signature=signature)
    found = onnxeps.plan(fused).warnings

    assert any("tf2onnx folded BatchNormalization" in text for text in found)


@pytest.fixture(scope="module")
def saved_models(models, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("saved")
    paths = {}
    for name in ["cnn", "mlp"]:
        paths[name] = folder / name
        models[name].export(str(paths[name]), verbose=False)
    return paths


def test_saved_model_records_folded_normalisation(saved_models):
    model = keras_export.convert_file(saved_models["cnn"])

    assert metadata(model)["onnxeps.normalisation"] == "folded"
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}


def test_saved_model_folding_in_plan_and_score(saved_models):
    model = keras_export.convert_file(saved_models["cnn"])
    batch, _ = case_batch("cnn")
    plan_warnings = onnxeps.plan(model).warnings
    score_warnings = onnxeps.score(model, inputs=batch).warnings

    recorded = "recorded that normalisation was folded"

    assert any(recorded in text for text in plan_warnings)
    assert any(recorded in text for text in score_warnings)


def test_saved_model_input_shape_override(saved_models):
    model = keras_export.convert_file(saved_models["mlp"], input_shape=(1, 24))
    dims = model.graph.input[0].type.tensor_type.shape.dim

    assert dims[0].dim_param == "batch"
    assert dims[1].dim_value == 24


def test_saved_model_without_normalisation_parity(models, saved_models):
    """The SavedModel route gives the native epsilon for a model without BatchNorm."""
    model = keras_export.convert_file(saved_models["mlp"])
    batch, _ = case_batch("mlp")
    weights = CASES["mlp"].weight_pairs[0]
    expected = native_epsilon(models["mlp"], batch, weights)

    assert metadata(model)["onnxeps.normalisation"] == "absent"
    assert relative_difference(onnx_epsilon(model, batch, weights), expected) <= (
        PARITY_TOLERANCE
    )


# ----- one architecture from Keras and from its NAS-Bench-201 encoding -----


def nb201_edges(arch_str: str) -> dict[tuple[int, int], str]:
    edges = {}
    for target, group in enumerate(arch_str.split("+"), start=1):
        for entry in group.strip("|").split("|"):
            op, source = entry.split("~")
            edges[(int(source), target)] = op
    return edges


def relu_conv_bn(x, channels: int, kernel: int, stride: int = 1):
    """ReLU, convolution and BatchNorm as NAS-Bench-201 has them (PyTorch padding)."""
    x = keras.layers.ReLU()(x)
    if stride == 1:
        x = keras.layers.Conv2D(channels, kernel, padding="same", use_bias=False)(x)
    else:
        # TensorFlow's "same" pads a stride-2 convolution only at the end; PyTorch's
        # padding=1 pads both sides.
        x = keras.layers.ZeroPadding2D(kernel // 2)(x)
        x = keras.layers.Conv2D(channels, kernel, strides=stride, use_bias=False)(x)
    return keras.layers.BatchNormalization(epsilon=1e-5)(x)


def nb201_cell(x, edges: dict[tuple[int, int], str], channels: int):
    nodes = [x]
    for target in (1, 2, 3):
        terms = []
        for source in range(target):
            op = edges[(source, target)]
            if op.startswith("nor_conv"):
                terms.append(relu_conv_bn(nodes[source], channels, int(op[-1])))
            elif op == "avg_pool_3x3":
                # TensorFlow's "same" average pool leaves padding out of the count,
                # like PyTorch's count_include_pad=False.
                pool = keras.layers.AveragePooling2D(3, 1, padding="same")
                terms.append(pool(nodes[source]))
            elif op == "skip_connect":
                terms.append(nodes[source])
            else:
                raise ValueError(f"this test network has no {op!r} edges")
        nodes.append(terms[0] if len(terms) == 1 else keras.layers.Add()(terms))
    return nodes[3]


def nb201_network(arch_str: str):
    """The NAS-Bench-201 topology network of one arch string, NHWC, with 1 output."""
    edges = nb201_edges(arch_str)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-5)(x)
    for stage, channels in enumerate((16, 32, 64)):
        if stage > 0:
            branch = relu_conv_bn(x, channels, 3, stride=2)
            branch = relu_conv_bn(branch, channels, 3)
            shortcut = keras.layers.AveragePooling2D(2, 2)(x)
            shortcut = keras.layers.Conv2D(channels, 1, use_bias=False)(shortcut)
            x = keras.layers.Add()([shortcut, branch])
        for _ in range(5):
            x = nb201_cell(x, edges, channels)
    x = keras.layers.BatchNormalization(epsilon=1e-5)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x))


@pytest.fixture(scope="module")
def nb201_scores():
    keras.utils.set_random_seed(1)
    network = nb201_network(NB201_ARCH)
    randomise_batch_norm(network)
    rng = np.random.default_rng(11)
    images = rng.normal(size=(BATCH_SIZE, 3, 32, 32)).astype(np.float32)
    channels_last = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    converted = keras_export.export(network)
    return {
        "native": native_epsilon(network, channels_last, NB201_WEIGHTS),
        "keras_export": onnx_epsilon(converted, channels_last, NB201_WEIGHTS),
        "encoding": onnx_epsilon(nb201.build(NB201_ARCH), images, NB201_WEIGHTS),
    }


def test_nb201_encoding_defined(nb201_scores):
    assert math.isfinite(nb201_scores["encoding"])


@pytest.mark.parametrize("source", ["native", "keras_export"])
def test_nb201_keras_matches_encoding(source, nb201_scores):
    assert relative_difference(nb201_scores[source], nb201_scores["encoding"]) <= (
        PARITY_TOLERANCE
    ), nb201_scores


# ----- the command line -----


def invoke(*args: str):
    return CliRunner().invoke(cli_main, ["convert", "keras", *args])


def test_cli_convert_keras_file(models, tmp_path):
    source = tmp_path / "cnn.keras"
    models["cnn"].save(source)
    output = tmp_path / "cnn.onnx"
    result = invoke(str(source), "-o", str(output))
    model = onnx.load(output)

    assert result.exit_code == 0, result.output
    assert "BatchNormalization" in {node.op_type for node in model.graph.node}
    assert metadata(model)["onnxeps.normalisation"] == "kept"


def test_cli_convert_keras_saved_model_warns(saved_models, tmp_path):
    output = tmp_path / "saved.onnx"
    result = invoke(str(saved_models["cnn"]), "-o", str(output))

    assert result.exit_code == 0, result.output
    assert "normalisation was folded at export" in result.stderr
    assert output.is_file()


def test_cli_convert_keras_missing_file_one_line(tmp_path):
    result = invoke(str(tmp_path / "absent.keras"), "-o", str(tmp_path / "o.onnx"))
    lines = result.stderr.strip().splitlines()

    assert result.exit_code == 1
    assert len(lines) == 1, result.stderr
    assert "not found" in lines[0]


def test_cli_convert_keras_wrong_file_one_line(tmp_path):
    source = tmp_path / "weights.txt"
    source.write_text("not a model")
    result = invoke(str(source), "-o", str(tmp_path / "o.onnx"))
    lines = result.stderr.strip().splitlines()

    assert result.exit_code == 1
    assert len(lines) == 1, result.stderr
    assert "neither a Keras file" in lines[0]
