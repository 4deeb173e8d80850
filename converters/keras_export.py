"""Export Keras models to ONNX so that onnxeps scores them as Keras would.

The metric normalises with batch statistics, so each BatchNormalization layer must stay
a BatchNormalization operator. The usual routes lose it (tf2onnx 1.17, TensorFlow
2.21, Keras 3). ``tf2onnx.convert.from_keras`` fails on Keras 3. Keras 3 writes
inference-mode BatchNormalization as Rsqrt/Mul/Add arithmetic, which TensorFlow's
grappler constant folding merges into the preceding convolution. tf2onnx's own
optimiser also fuses a Conv followed by a BatchNormalization operator.

The route taken here keeps it:

1. The model is traced in a ``tf.function`` with ``training=False`` (dropout off). While
   it is traced, every BatchNormalization layer computes its inference output with
   ``tf.raw_ops.FusedBatchNormV3(is_training=False)`` from the layer's own gamma,
   beta, moving mean, moving variance and epsilon. That op has exactly the inference
   semantics of the layer, grappler does not fold it, and tf2onnx converts it to an
   ONNX BatchNormalization. The layers are restored afterwards.
2. tf2onnx converts the traced function (``tf_loader.from_function`` and
   ``tfonnx.process_tf_graph``) and then optimises the ONNX graph without its
   ``remove_back_to_back`` pass, which fuses Conv+BatchNormalization, and without
   ``merge_duplication``, which would merge equal constants (for example a fresh gamma
   with a fresh moving variance) into one tensor.

A SavedModel folder has no Keras layers to swap, so its graph is converted as saved.
Before conversion, the frozen graph is searched for normalisation written with stored
statistics: an Rsqrt of a non-scalar value computed from constants only, which is
``rsqrt(moving_variance + epsilon)``. If one is found, the model's
``onnxeps.normalisation`` metadata says ``folded``, and the planner then warns in every
plan and score of the file. FusedBatchNorm operators in a SavedModel (tf.keras 2) stay
BatchNormalization operators.

Known gaps: Keras LayerNormalization becomes arithmetic whose scale the planner cannot
classify, so it is kept and the plan warns about it. tf2onnx 1.17 cannot convert the
exact GELU (``Erfc``). Keras GRU and SimpleRNN layers become ONNX Loops whose initial
state the planner reads as a MatMul weight, so only LSTM layers, which become ONNX LSTM
operators, score like Keras.

TensorFlow, Keras and tf2onnx are imported when a conversion runs; without them the call
raises :class:`MissingExtraError` naming the ``onnxeps[tensorflow]`` extra.
"""

from __future__ import annotations

import json
import logging
import os
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxeps.graphs import iter_graphs
from onnxeps.plan import NORMALISATION_KEY

from ._builder import (
    BATCH_DIM,
    CONVERTER_KEY,
    EXPORT_SETTINGS_KEY,
    EXPORTER_KEY,
    ROLES_KEY,
    save_model_atomic,
    update_metadata,
)
from ._extras import MissingExtraError, import_extra

__all__ = [
    "DEFAULT_OPSET",
    "KERAS_SUFFIXES",
    "export",
    "convert_file",
    "MissingExtraError",
]

log = logging.getLogger(__name__)

CONVERTER_ID = "onnxeps.converters.keras_export 1"
DEFAULT_OPSET = 17
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
# tf2onnx optimiser passes left out, for the reasons in the module docstring.
_SKIPPED_OPTIMIZERS = ("remove_back_to_back", "merge_duplication")
# Name of the unit scale given to a BatchNormalization layer built with scale=False.
# Keras multiplies such a layer by nothing, so the tensor gets a "keep" role hint.
_FIXED_SCALE_NAME = "onnxeps_fixed_scale"


def _frameworks():
    """Import and return (tensorflow, keras, tf2onnx)."""
    # TensorFlow reads this when it is first imported. Level 2 hides most C++ info and
    # warning messages, though TensorFlow 2.21 still prints its oneDNN notice.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = import_extra("tensorflow", "TensorFlow", "tensorflow")
    keras = import_extra("keras", "Keras", "tensorflow")
    tf2onnx = import_extra("tf2onnx", "tf2onnx", "tensorflow")
    # These submodules are not imported by the tf2onnx package itself.
    import_extra("tf2onnx.tf_loader", "tf2onnx", "tensorflow")
    import_extra("tf2onnx.tfonnx", "tf2onnx", "tensorflow")
    import_extra("tf2onnx.optimizer", "tf2onnx", "tensorflow")
    return tf, keras, tf2onnx


def export(
    model: Any,
    path: str | os.PathLike[str] | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    input_shape: Sequence[int] | None = None,
    input_signature: Sequence[Any] | None = None,
) -> onnx.ModelProto:
    """Convert a live Keras model to a checked ONNX model with BatchNormalization kept.

    The input shapes come from ``model.inputs``, unless ``input_shape`` or
    ``input_signature`` (a sequence of ``tf.TensorSpec``) is given. ``input_shape``
    applies to one-input models, and its first axis becomes the symbolic batch axis
    whatever its value. ``path``, if given, receives the model atomically. The model
    is unchanged after the call. Raises MissingExtraError without TensorFlow,
    TypeError for a non-Keras model, and ValueError for missing or conflicting inputs
    or ops tf2onnx cannot convert.
    """
    tf, keras, tf2onnx = _frameworks()
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model must be a Keras model, got {type(model).__name__}")
    signature = _signature(model, input_shape, input_signature, tf)

    @tf.function
    def forward(*inputs):
        arguments = inputs[0] if len(inputs) == 1 else list(inputs)
        return model(arguments, training=False)

    patched = _patch_batch_norm(model, keras, tf)
    try:
        concrete = forward.get_concrete_function(*signature)
    finally:
        _restore_calls(patched)
    route = (
        "tf.function with training=False; BatchNormalization layers traced as "
        "FusedBatchNormV3(is_training=False)"
    )
    proto = _convert_concrete(concrete, opset, route, None, (tf, keras, tf2onnx))
    if path is not None:
        save_model_atomic(proto, path)
    return proto


def convert_file(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str] | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    input_shape: Sequence[int] | None = None,
) -> onnx.ModelProto:
    """Convert a saved Keras model (.keras, .h5) or a SavedModel folder to ONNX.

    A Keras file is loaded without compiling and converted by :func:`export`. A
    SavedModel is converted from its ``serving_default`` signature (else its first
    one), and ``input_shape`` then overrides the shape of its only input. Raises
    FileNotFoundError for a missing source and ValueError for another kind of file.
    """
    frameworks = _frameworks()
    keras = frameworks[1]
    source = Path(source)
    if source.is_dir():
        return _convert_saved_model(source, path, opset, input_shape, frameworks)
    if not source.is_file():
        raise FileNotFoundError(f"Keras model {str(source)!r} not found")
    if source.suffix.lower() not in KERAS_SUFFIXES:
        raise ValueError(
            f"{str(source)!r} is neither a Keras file "
            f"({', '.join(KERAS_SUFFIXES)}) nor a SavedModel folder"
        )
    model = keras.models.load_model(source, compile=False)
    return export(model, path, opset, input_shape=input_shape)


def _convert_saved_model(source, path, opset, input_shape, frameworks):
    tf = frameworks[0]
    loaded = tf.saved_model.load(str(source))
    signatures = dict(loaded.signatures)
    if not signatures:
        raise ValueError(f"SavedModel {str(source)!r} has no signatures to convert")
    key = "serving_default"
    if key not in signatures:
        key = next(iter(signatures))
    concrete = signatures[key]
    shape_override = None
    if input_shape is not None:
        names = _input_names(concrete, tf)
        if len(names) != 1:
            raise ValueError(
                f"input_shape applies to one-input models; signature {key!r} has "
                f"{len(names)} inputs"
            )
        sizes = [int(size) for size in input_shape[1:]]
        shape_override = {names[0]: [None, *sizes]}
    route = f"SavedModel signature {key!r} converted as saved"
    proto = _convert_concrete(concrete, opset, route, shape_override, frameworks)
    if path is not None:
        save_model_atomic(proto, path)
    return proto


def _signature(model, input_shape, input_signature, tf) -> tuple:
    if input_shape is not None and input_signature is not None:
        raise ValueError("give input_shape or input_signature, not both")
    if input_signature is not None:
        return tuple(input_signature)
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):  # subclassed models have no symbolic inputs
        inputs = []
    if input_shape is not None:
        if len(inputs) > 1:
            raise ValueError(
                f"input_shape applies to one-input models; this model has "
                f"{len(inputs)} inputs, so pass input_signature"
            )
        dtype = inputs[0].dtype if inputs else "float32"
        name = _spec_name(inputs[0].name, 0) if inputs else "input"
        shape = (None, *(int(size) for size in input_shape[1:]))
        return (tf.TensorSpec(shape, dtype, name=name),)
    if not inputs:
        raise ValueError(
            "the model has no symbolic inputs (a subclassed model?); pass input_shape "
            "or input_signature"
        )
    specs = []
    for index, tensor in enumerate(inputs):
        name = _spec_name(tensor.name, index)
        specs.append(tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype, name=name))
    return tuple(specs)


def _spec_name(name: str | None, index: int) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name or "")
    return cleaned if re.match(r"[A-Za-z_]", cleaned) else f"input_{index}"


def _all_layers(model) -> list:
    # NOTE: Keras 3 has no public recursive layer listing, so this uses the private
    # _flatten_layers of Keras 3.15, the version tested.
    return list(model._flatten_layers(include_self=True, recursive=True))


def _patch_batch_norm(model, keras, tf) -> list[tuple[Any, Any]]:
    """Make every BatchNormalization layer of ``model`` trace as FusedBatchNormV3.

    Return (layer, the layer's own ``call`` attribute or None) for each patched layer.
    The bound method is set on the instance with object.__setattr__, which bypasses
    Keras attribute tracking.
    """
    patched = []
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            patched.append((layer, vars(layer).get("call")))
            call = types.MethodType(_batch_norm_call_factory(tf), layer)
            object.__setattr__(layer, "call", call)
    return patched


def _restore_calls(patched: list[tuple[Any, Any]]) -> None:
    for layer, own_call in patched:
        if own_call is None:
            object.__delattr__(layer, "call")  # the class's call applies again
        else:
            object.__setattr__(layer, "call", own_call)


def _batch_norm_call_factory(tf):
    def call(layer, inputs, training=None, mask=None):
        """Return the layer's inference output: (x - mean) / sqrt(var + eps) * g + b.

        ``training`` and ``mask`` change only the training path of BatchNormalization,
        and the model is traced with training=False.
        """
        # NOTE: Keras computes masked batch statistics in training mode, but the ONNX
        # batch-statistics rewrite averages over every position, masked ones too.
        x = tf.cast(tf.convert_to_tensor(inputs), "float32")
        return tf.cast(_fused_batch_norm(layer, x, tf), layer.compute_dtype)

    return call


def _fused_batch_norm(layer, x, tf):
    rank = x.shape.rank
    axis = layer.axis[0] if isinstance(layer.axis, list | tuple) else layer.axis
    axis %= rank
    if axis != rank - 1:
        order = [*(i for i in range(rank) if i != axis), axis]
        inverse = list(np.argsort(order))
        moved = tf.transpose(x, order)
        return tf.transpose(_fused_batch_norm_last(layer, moved, tf), inverse)
    return _fused_batch_norm_last(layer, x, tf)


def _fused_batch_norm_last(layer, x, tf):
    """Apply FusedBatchNormV3 to ``x`` whose channel axis is the last one."""
    rank = x.shape.rank
    channels = int(x.shape[-1])
    if rank == 2:
        x4 = tf.expand_dims(tf.expand_dims(x, 1), 1)  # (N, 1, 1, C)
    elif rank == 3:
        x4 = tf.expand_dims(x, 2)  # (N, T, 1, C)
    elif rank in (4, 5):
        x4 = x
    else:
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} gets a rank-{rank} input; the "
            "converter handles ranks 2 to 5"
        )
    if layer.scale:
        gamma = tf.cast(layer.gamma, "float32")
    else:
        gamma = tf.constant(np.ones(channels, np.float32), name=_FIXED_SCALE_NAME)
    beta = tf.cast(layer.beta, "float32") if layer.center else tf.zeros([channels])
    outputs = tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=gamma,
        offset=beta,
        mean=tf.cast(layer.moving_mean, "float32"),
        variance=tf.cast(layer.moving_variance, "float32"),
        epsilon=float(layer.epsilon),
        data_format="NHWC" if rank != 5 else "NDHWC",
        is_training=False,
    )
    y = outputs[0]
    if rank == 2:
        return y[:, 0, 0, :]
    if rank == 3:
        return tf.squeeze(y, 2)
    return y


def _input_names(concrete, tf) -> list[str]:
    return [tensor.name for tensor in concrete.inputs if tensor.dtype != tf.resource]


def _convert_concrete(concrete, opset, route, shape_override, frameworks):
    """Convert a traced function to a checked, annotated ONNX model."""
    tf, keras, tf2onnx = frameworks
    input_names = _input_names(concrete, tf)
    output_names = [t.name for t in concrete.outputs if t.dtype != tf.resource]
    folded = _stored_statistics_nodes(concrete)
    if folded:
        log.info(
            "normalisation with stored statistics is folded into the graph (%s); the "
            "model metadata records it, so plans and scores warn",
            ", ".join(folded[:3]),
        )
    renames = tf2onnx.convert.tensor_names_from_structed(
        concrete, input_names, output_names
    )
    unnamed = [name for name in output_names if name not in renames]
    for index, name in enumerate(unnamed):
        renames[name] = "output" if len(unnamed) == 1 else f"output_{index}"
    optimizers = {
        name: factory
        for name, factory in tf2onnx.optimizer._get_optimizers().items()
        if name not in _SKIPPED_OPTIMIZERS
    }
    with tf.device("/cpu:0"):
        graph_def = tf2onnx.tf_loader.from_function(concrete, input_names, output_names)
        with tf.Graph().as_default() as tf_graph:
            tf.import_graph_def(graph_def, name="")
            graph = tf2onnx.tfonnx.process_tf_graph(
                tf_graph,
                opset=opset,
                input_names=input_names,
                output_names=output_names,
                tensors_to_rename=renames,
                shape_override=shape_override,
            )
        graph = tf2onnx.optimizer.optimize_graph(graph, optimizers=optimizers)
        proto = graph.make_model(f"converted from {concrete.name}")
    _reject_unsupported_ops(proto, tf2onnx)
    _name_batch_axes(proto)
    settings = {
        "opset": opset,
        "route": route,
        "tf2onnx_optimizers_skipped": list(_SKIPPED_OPTIMIZERS),
    }
    entries = {
        CONVERTER_KEY: CONVERTER_ID,
        EXPORTER_KEY: (
            f"tf2onnx {tf2onnx.__version__} (process_tf_graph), tensorflow "
            f"{tf.__version__}, keras {keras.__version__}"
        ),
        EXPORT_SETTINGS_KEY: json.dumps(settings),
        NORMALISATION_KEY: _normalisation_state(proto, folded),
    }
    hints = {
        tensor.name: "keep"
        for ref in iter_graphs(proto)
        for tensor in ref.graph.initializer
        if _FIXED_SCALE_NAME in tensor.name
    }
    if hints:
        entries[ROLES_KEY] = json.dumps(hints)
    update_metadata(proto, entries)
    onnx.checker.check_model(proto)
    return proto


def _stored_statistics_nodes(concrete) -> list[str]:
    """Name the Rsqrt nodes of non-scalar values computed from constants only.

    In the frozen graph (variables replaced by constants) such a node is
    ``rsqrt(moving_variance + epsilon)`` of a normalisation written as arithmetic,
    which grappler's constant folding merges into the neighbouring operators.
    """
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(
        concrete, lower_control_flow=False, aggressive_inlining=True
    )
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    nodes = {node.name: node for node in graph_def.node}
    constant: dict[str, bool] = {}

    def is_constant(name: str) -> bool:
        # Iterative depth-first search, because graphs can be deeper than the
        # recursion limit.
        stack = [name]
        while stack:
            current = stack[-1]
            if current in constant:
                stack.pop()
                continue
            node = nodes.get(current)
            if node is None or node.op in ("Placeholder", "PlaceholderWithDefault"):
                constant[current] = False
                stack.pop()
                continue
            sources = [_node_name(i) for i in node.input if not i.startswith("^")]
            pending = [source for source in sources if source not in constant]
            if pending:
                stack.extend(pending)
                continue
            constant[current] = all(constant[source] for source in sources)
            stack.pop()
        return constant[name]

    found = []
    for node in graph_def.node:
        if node.op != "Rsqrt" or not node.input:
            continue
        if _element_count(node) == 1:
            continue  # a scalar, such as an attention scale
        if is_constant(_node_name(node.input[0])):
            found.append(node.name)
    return found


def _node_name(tensor: str) -> str:
    return tensor.split(":")[0]


def _element_count(node) -> int | None:
    """Return the element count of the node's first output, or None if unknown."""
    if "_output_shapes" not in node.attr:
        return None
    shapes = node.attr["_output_shapes"].list.shape
    if not shapes or shapes[0].unknown_rank:
        return None
    sizes = [dim.size for dim in shapes[0].dim]
    if any(size < 0 for size in sizes):
        return None
    return int(np.prod(sizes, dtype=np.int64))


def _normalisation_state(proto: onnx.ModelProto, folded: list[str]) -> str:
    if folded:
        return "folded"
    for ref in iter_graphs(proto):
        if any(node.op_type == "BatchNormalization" for node in ref.graph.node):
            return "kept"
    return "absent"


def _reject_unsupported_ops(proto: onnx.ModelProto, tf2onnx) -> None:
    """Raise ValueError naming the TensorFlow ops tf2onnx left unconverted.

    tf2onnx logs such ops and copies them into the graph under their TensorFlow names,
    which no ONNX runtime can run.
    """
    unsupported = sorted(
        {
            node.op_type
            for ref in iter_graphs(proto)
            for node in ref.graph.node
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)
        }
    )
    if unsupported:
        raise ValueError(
            f"tf2onnx {tf2onnx.__version__} cannot convert the TensorFlow op(s) "
            f"{', '.join(unsupported)}; replace the layers that use them (for example "
            "the exact GELU uses Erfc: use gelu(approximate=True))"
        )


def _name_batch_axes(proto: onnx.ModelProto) -> None:
    """Name axis 0 of every graph input and output ``batch``, as Keras puts the batch
    first, and rename the symbols it replaces everywhere in the graph."""
    renames: dict[str, str] = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            continue
        if dims[0].dim_param:
            renames[dims[0].dim_param] = BATCH_DIM
        dims[0].dim_param = BATCH_DIM
    for value in proto.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
