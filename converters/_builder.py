"""Graph builder shared by the benchmark converters.

The builder gives every node, tensor and initializer a unique name, records the role of
each float initializer for the ``onnxeps.roles`` metadata entry, draws deterministic
initial weights, and assembles a checked opset-17 model.
"""

from __future__ import annotations

import json
import os
import secrets
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxeps.tensors import tensor_from_array

OPSET = 17
# IR version 8 is the lowest that opset 17 allows, so older runtimes can load the
# models.
IR_VERSION = 8
BATCH_DIM = "batch"

ROLES = frozenset(
    {
        "weight",
        "bias",
        "norm_scale",
        "norm_shift",
        "norm_stat",
        "embedding",
        "recurrent_weight",
        "recurrent_bias",
        "recurrent_state",
        "keep",
    }
)

# Metadata keys that every converted model carries.
ENCODING_KEY = "onnxeps.encoding"
CONVERTER_KEY = "onnxeps.converter"
ROLES_KEY = "onnxeps.roles"
# Metadata keys of models exported from a framework (torch, Keras).
EXPORTER_KEY = "onnxeps.exporter"
EXPORT_SETTINGS_KEY = "onnxeps.export_settings"

# Protobuf cannot serialize a message of 2 GiB or more.
MAX_MODEL_BYTES = 2**31 - 1

Initializer = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]

# Node attributes made so far, by _attribute_key. The converters use a few dozen.
_ATTRIBUTES: dict[tuple, onnx.AttributeProto] = {}
_MAX_CACHED_ATTRIBUTES = 4096


def he_normal(fan_in: int) -> Initializer:
    """Return an initializer that draws N(0, 2 / fan_in), the He-normal scheme."""
    std = float(np.sqrt(2.0 / fan_in))
    return lambda rng, shape: rng.normal(0.0, std, size=shape)


def uniform(bound: float) -> Initializer:
    """Return an initializer that draws U(-bound, bound)."""
    return lambda rng, shape: rng.uniform(-bound, bound, size=shape)


def filled(value: float) -> Initializer:
    """Return an initializer that fills the tensor with one value."""
    return lambda rng, shape: np.full(shape, value)


class GraphBuilder:
    """Nodes, initializers and their roles for one ONNX graph under construction.

    Initial values are drawn per initializer from a generator seeded with
    ``(init_seed, crc32(name))``, so a tensor's value depends only on the seed and its
    name, not on build order or on which other tensors ``weights`` supplies. With
    ``init_seed`` None every parameter is zero, which is cheaper when the values do not
    matter (scoring replaces them all).
    """

    def __init__(
        self, init_seed: int | None = 0, weights: Mapping[str, Any] | None = None
    ) -> None:
        # Nodes and initializers go straight into the model, which saves copying them.
        self.model = onnx.ModelProto()
        self.roles: dict[str, str] = {}
        self._init_seed = init_seed
        self._supplied = dict(weights or {})
        self._values: dict[str, np.ndarray] = {}
        self._names: set[str] = set()

    def unique_name(self, hint: str) -> str:
        """Reserve and return ``hint``, or ``hint_<n>`` if ``hint`` is taken."""
        name = hint
        suffix = 1
        while name in self._names:
            name = f"{hint}_{suffix}"
            suffix += 1
        self._names.add(name)
        return name

    def add_node(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        output: str | None = None,
        **attributes: Any,
    ) -> str:
        """Append a node with one output and return the output's tensor name.

        ``output`` fixes the output name, for example to a graph output's name.
        """
        names = None if output is None else [output]
        return self.add_node_outputs(op_type, inputs, name, 1, names, **attributes)[0]

    def add_node_outputs(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        num_outputs: int,
        output_names: Sequence[str] | None = None,
        **attributes: Any,
    ) -> list[str]:
        """Append a node named after ``name`` and return its output tensor names."""
        node_name = self.unique_name(f"{name}/{op_type}")
        if output_names is None:
            outputs = [
                self.unique_name(f"{node_name}:{i}") for i in range(num_outputs)
            ]
        else:
            outputs = [self.reserve_name(output) for output in output_names]
        node = self.model.graph.node.add(
            op_type=op_type, input=inputs, output=outputs, name=node_name
        )
        node.attribute.extend(
            _attribute(key, value)
            for key, value in sorted(attributes.items())
            if value is not None
        )
        return outputs

    def reserve_name(self, name: str) -> str:
        """Reserve exactly ``name`` and return it. Raise ValueError if it is taken."""
        if name in self._names:
            raise ValueError(f"tensor name {name!r} is used twice")
        self._names.add(name)
        return name

    def add_parameter(
        self, name: str, shape: Sequence[int], role: str, initializer: Initializer
    ) -> str:
        """Add a float32 initializer named exactly ``name`` and return the name.

        The value comes from ``weights`` when it has ``name`` (its shape must match),
        otherwise from ``initializer``, or is all zeros when the builder has no
        ``init_seed``.
        """
        shape = tuple(int(size) for size in shape)
        if name in self._supplied:
            value = np.asarray(self._supplied[name], dtype=np.float32)
            if value.shape != shape:
                raise ValueError(
                    f"weights[{name!r}] has shape {value.shape}, expected {shape}"
                )
        elif self._init_seed is None:
            value = np.zeros(shape, dtype=np.float32)
        else:
            rng = np.random.default_rng([self._init_seed, zlib.crc32(name.encode())])
            value = np.asarray(initializer(rng, shape), dtype=np.float32)
        return self._add_initializer(self.reserve_name(name), value, role)

    def add_constant(self, name: str, value: np.ndarray) -> str:
        """Add a constant initializer and return its unique name.

        A float constant gets the role ``keep``, because it is part of the function and
        not a trainable parameter. Integer constants (shapes, indices) get no role.
        """
        value = np.asarray(value)
        role = _constant_role(value)
        return self._add_initializer(self.unique_name(name), value, role)

    def shared_constant(self, name: str, value: np.ndarray) -> str:
        """Return the constant named exactly ``name``, adding it with ``value`` once."""
        if name not in self._values:
            value = np.asarray(value)
            self._add_initializer(self.reserve_name(name), value, _constant_role(value))
        return name

    def value(self, name: str) -> np.ndarray:
        """Return the value of an initializer added earlier."""
        return self._values[name]

    def _add_initializer(self, name: str, value: np.ndarray, role: str | None) -> str:
        # The caller has reserved ``name``.
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown role {role!r}; valid roles are {sorted(ROLES)}")
        self._values[name] = value
        self.model.graph.initializer.append(tensor_from_array(value, name))
        if role is not None:
            self.roles[name] = role
        return name

    def check_weights_used(self) -> None:
        """Raise ValueError if ``weights`` has names that are not initializers here."""
        unknown = sorted(set(self._supplied) - set(self._values))
        if unknown:
            known = ", ".join(sorted(self.roles)[:5])
            raise ValueError(
                f"weights has names that are not initializers of this network: "
                f"{unknown[:10]}; valid names look like {known}, ..."
            )

    def build_model(
        self,
        graph_name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        metadata: Mapping[str, str],
    ) -> onnx.ModelProto:
        """Assemble, annotate and check the model. Call it once: the nodes and
        initializers were written into the returned model as they were added.

        ``metadata`` must contain the encoding and the converter id. The role table of
        every float initializer is added under ``onnxeps.roles``.
        """
        self.check_weights_used()
        model = self.model
        model.ir_version = IR_VERSION
        model.opset_import.add(domain="", version=OPSET)
        model.producer_name = "onnxeps.converters"
        model.graph.name = graph_name
        model.graph.input.extend(inputs)
        model.graph.output.extend(outputs)
        properties = dict(metadata)
        properties[ROLES_KEY] = json.dumps(self.roles)
        helper.set_model_props(model, properties)
        # Tensor data makes up nearly all of a model's size, so only a model whose
        # weights come near the limit is serialised to measure it.
        weight_bytes = sum(value.nbytes for value in self._values.values())
        if weight_bytes > MAX_MODEL_BYTES // 2 and model.ByteSize() > MAX_MODEL_BYTES:
            raise ValueError(
                f"model {graph_name!r} is {model.ByteSize()} bytes, over the 2 GiB "
                f"protobuf limit; use a smaller network, for example a smaller "
                f"vocabulary"
            )
        # Only the structural check runs here. The full check adds shape inference,
        # which doubles the time to build a cell. The converter tests run it.
        onnx.checker.check_model(model)
        return model


def _attribute(key: str, value: Any) -> onnx.AttributeProto:
    """Return a node attribute, made once per name and value when the value is a
    number, a string or a list of numbers (most attributes of a network repeat)."""
    cache_key = _attribute_key(key, value)
    if cache_key is None:
        return helper.make_attribute(key, value)
    if cache_key not in _ATTRIBUTES:
        if len(_ATTRIBUTES) >= _MAX_CACHED_ATTRIBUTES:
            _ATTRIBUTES.clear()
        _ATTRIBUTES[cache_key] = helper.make_attribute(key, value)
    return _ATTRIBUTES[cache_key]


def _attribute_key(key: str, value: Any) -> tuple | None:
    """Return a cache key that differs for any two values that make different
    attributes (1 and 1.0, 0.0 and -0.0), or None for a value that is not cached."""
    if type(value) in (int, float, str):
        return key, _typed(value)
    if isinstance(value, list) and all(type(item) in (int, float) for item in value):
        return key, list, tuple(_typed(item) for item in value)
    return None


def _typed(value: int | float | str) -> tuple:
    # float.hex keeps the sign of zero and gives NaN a key equal to itself.
    return (float, value.hex()) if type(value) is float else (type(value), value)


def _constant_role(value: np.ndarray) -> str | None:
    return "keep" if np.issubdtype(value.dtype, np.floating) else None


def make_value_info(
    name: str, elem_type: int, shape: Sequence[int | str]
) -> onnx.ValueInfoProto:
    """Return the value info of a graph input or output. String dims are symbolic."""
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def update_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Set the ``metadata_props`` entries of ``model``, keeping the other entries."""
    properties = {prop.key: prop.value for prop in model.metadata_props}
    properties.update(entries)
    helper.set_model_props(model, properties)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` through a temporary file in the same folder.

    The final ``os.replace`` is atomic on POSIX file systems, so readers never see a
    partly written file. The temporary file is removed if writing fails, and the new
    file gets the usual permissions (0o666 minus the umask).
    Raises OSError if the folder is missing or not writable.
    """
    target = Path(path)
    data = model.SerializeToString()
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target
