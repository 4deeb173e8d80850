"""The input batch: read from .npy/.npz files or arrays, or synthesised per model input.

Synthetic kinds: ``grey`` (sample i is the constant i/B in every element), ``normal``
(standard normal), ``uniform`` (U[0, 1)), ``tokens`` (integer ids below the vocabulary
size of the embedding that reads the input). Random kinds draw from the run's generator
in model-input order, before the embedding tables are filled.
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxeps.errors import InputError
from onnxeps.graphs import consumer_map, uses_through
from onnxeps.infer import TensorType, infer_types
from onnxeps.plan import Plan
from onnxeps.roles import PASS_THROUGH, SLOT_ROLES, Role

__all__ = [
    "InputSpec",
    "Batch",
    "SYNTHETIC_KINDS",
    "input_specs",
    "synthetic_batch",
    "batch_from_arrays",
    "batch_from_file",
    "batch_from_text",
    "read_array_file",
]

log = logging.getLogger(__name__)

SYNTHETIC_KINDS = ("grey", "normal", "uniform", "tokens")
# ONNX element types with a numpy equivalent (UNDEFINED, STRING and unknown ones lack it).
_NUMPY_TYPES = frozenset(helper.get_all_tensor_dtypes()) - {
    onnx.TensorProto.UNDEFINED,
    onnx.TensorProto.STRING,
}
_BATCH_WORDS = ("batch", "n")
_SEQUENCE_WORDS = ("seq", "time", "len", "step", "token", "word", "sentence")


@dataclass(frozen=True)
class InputSpec:
    """A graph input that must be fed: name, element type and declared shape."""

    name: str
    elem_type: int
    shape: tuple[int | str | None, ...] | None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    def describe_shape(self) -> str:
        if self.shape is None:
            return "(unknown rank)"
        dims = ["?" if d is None else str(d) for d in self.shape]
        return "(" + ", ".join(dims) + ")"


@dataclass
class Batch:
    """The feeds for both runs, how they were made, and the batch size."""

    feeds: dict[str, np.ndarray]
    description: str
    batch_size: int
    warnings: list[str] = field(default_factory=list)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Return the inputs to feed (graph inputs that are not initializers)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise InputError(
                f"model input '{value.name}' is not a tensor; onnxeps feeds tensors only."
            )
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in _NUMPY_TYPES:
            raise InputError(
                f"model input '{value.name}' has element type {tensor_type.elem_type}, "
                "which onnxeps cannot feed.",
                "Re-export the model with numeric, typed inputs.",
            )
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(_dim(d) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, tensor_type.elem_type, shape))
    return specs


def _dim(dim) -> int | str | None:
    # Some older exporters mark a dynamic axis as dim_value -1 (or 0).
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return dim.dim_value
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None


def _axis_kind(name: str | None) -> str:
    """Return 'batch', 'sequence' or 'unnamed' for a symbolic axis by its name."""
    lowered = (name or "").lower()
    if any(word in lowered for word in _SEQUENCE_WORDS):
        return "sequence"
    if lowered in _BATCH_WORDS or "batch" in lowered:
        return "batch"
    return "unnamed"


def _symbolic_batch_axis(shape: tuple[int | str | None, ...]) -> int | None:
    """Return the axis named as the batch, else the first unnamed symbolic axis."""
    kinds = [(i, _axis_kind(d)) for i, d in enumerate(shape) if not isinstance(d, int)]
    for wanted in ("batch", "unnamed"):
        for position, kind in kinds:
            if kind == wanted:
                return position
    return None


def _resolve_shape(
    spec: InputSpec, batch_size: int, seq_len: int, warnings: list[str]
) -> tuple[tuple[int, ...], int]:
    """Fill symbolic axes; return the concrete shape and the batch axis."""
    if spec.shape is None:
        raise InputError(
            f"model input '{spec.name}' has no declared shape, so no synthetic batch "
            "can be made for it.",
            "Pass --input with an array for it.",
        )
    shape: list[int] = []
    batch_axis = _symbolic_batch_axis(spec.shape)
    for position, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
        elif position == batch_axis:
            shape.append(batch_size)
        else:
            shape.append(seq_len)
    if batch_axis is None:
        batch_axis = 0
        if shape and shape[0] != batch_size:
            warnings.append(
                f"input '{spec.name}' has a fixed batch axis of {shape[0]}; scored at "
                "that batch size (small batches weaken the metric)"
            )
    return tuple(shape), batch_axis


def _grey(shape: tuple[int, ...], batch_axis: int, dtype: np.dtype) -> np.ndarray:
    size = shape[batch_axis] if shape else 1
    ramp = np.arange(size, dtype=np.float64) / max(size, 1)
    view = [1] * len(shape)
    if shape:
        view[batch_axis] = size
    return np.broadcast_to(ramp.reshape(view), shape).astype(dtype)


def _vocabulary_size(spec: InputSpec, model, plan: Plan) -> int | None:
    """Return the row count of the smallest embedding table indexed by this input.

    The plan names the Gather nodes that read embedding tables, also through Identity
    or Cast, so the table's row count is that of the Gather's data input.
    """
    gathers = {
        terminal.use.node.output[0]: entry
        for entry in plan.entries
        if entry.role is Role.EMBEDDING
        for terminal in entry.uses
    }
    types: dict[str, TensorType] | None = None
    sizes = []
    for use in uses_through(consumer_map(model), spec.name, PASS_THROUGH):
        node = use.node
        if node.op_type == "Gather" and use.slot == 1 and node.output[0] in gathers:
            types = infer_types(model) if types is None else types
            sizes.append(_gathered_rows(node, gathers[node.output[0]].shape, types))
    return min(sizes) if sizes else None


def _gathered_rows(node, table_shape, types: dict[str, TensorType]) -> int:
    """Return the size of the axis a Gather indexes in its data input."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    found = types.get(node.input[0])
    if found is not None and found.shape is not None:
        if isinstance(found.shape[axis], int):
            return found.shape[axis]
    return table_shape[axis]


def _synthesise(spec, kind, shape, batch_axis, rng, vocabulary) -> np.ndarray:
    dtype = spec.dtype
    if dtype == np.bool_:
        return np.ones(shape, dtype=np.bool_)
    if kind == "zeros":
        return np.zeros(shape, dtype=dtype)
    if kind == "tokens":
        return rng.integers(0, vocabulary, size=shape).astype(dtype)
    if kind == "grey":
        return _grey(shape, batch_axis, dtype)
    if kind == "normal":
        return rng.standard_normal(shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def _recurrent_state_inputs(model: onnx.ModelProto) -> set[str]:
    """Name the inputs that reach an initial-state slot of LSTM, GRU or RNN."""
    consumers = consumer_map(model)
    found = set()
    for spec in input_specs(model):
        for use in uses_through(consumers, spec.name, PASS_THROUGH):
            rule = SLOT_ROLES.get(use.node.op_type, {}).get(use.slot)
            if rule is not None and rule.role is Role.RECURRENT_STATE:
                found.add(spec.name)
    return found


def _kind_for(
    spec: InputSpec, requested: str | None, vocabulary: int | None, state: bool
) -> str:
    """Choose the synthetic kind for one input, or fail with the reason."""
    dtype = spec.dtype
    if dtype == np.bool_:
        return "ones"
    if state and np.issubdtype(dtype, np.floating):
        # Initial recurrent states are "as given": zeros, the frameworks' default.
        return "zeros"
    if np.issubdtype(dtype, np.integer):
        if vocabulary is None:
            raise InputError(
                f"cannot synthesise integer input '{spec.name}': no embedding table "
                "reads it, so the range of valid ids is unknown.",
                "Pass --input with an array for it.",
            )
        return "tokens"
    if not np.issubdtype(dtype, np.floating):
        raise InputError(
            f"cannot synthesise input '{spec.name}' of type {dtype.name}.",
            "Pass --input with an array for it.",
        )
    if requested == "tokens":
        raise InputError(
            f"--synthetic tokens needs integer inputs, but input '{spec.name}' is "
            f"{dtype.name}.",
            "Use grey, normal or uniform for float inputs.",
        )
    return requested or "grey"


def synthetic_batch(
    model: onnx.ModelProto,
    plan: Plan,
    kind: str | None,
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator,
) -> Batch:
    """Make a synthetic batch for every model input (``kind`` None: by dtype)."""
    feeds: dict[str, np.ndarray] = {}
    labels: list[str] = []
    warnings: list[str] = []
    sizes: list[int] = []
    states = _recurrent_state_inputs(model)
    for spec in input_specs(model):
        vocabulary = _vocabulary_size(spec, model, plan)
        chosen = _kind_for(spec, kind, vocabulary, spec.name in states)
        if kind is not None and chosen != kind and not np.issubdtype(spec.dtype, np.floating):
            warnings.append(
                f"input '{spec.name}' is {np.dtype(spec.dtype).name}, so it gets "
                f"{chosen} instead of the requested synthetic {kind}"
            )
        shape, batch_axis = _resolve_shape(spec, batch_size, seq_len, warnings)
        feeds[spec.name] = _synthesise(spec, chosen, shape, batch_axis, rng, vocabulary)
        labels.append(f"{spec.name}={chosen}")
        sizes.append(shape[batch_axis] if shape else 1)
    description = "synthetic:" + ",".join(labels)
    return Batch(feeds, description, sizes[0] if sizes else batch_size, warnings)


def read_array_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a .npy (one array, named ``x``) or .npz file; never unpickles."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an input file.")
    if not path.is_file():
        raise InputError(f"{path}: input file not found.", "Check the --input path.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        # numpy reports any unrecognised file as "pickled data", which misleads here.
        reason = "object arrays or not a .npy/.npz file" if "pickle" in str(error) else error
        raise InputError(
            f"{path}: not a readable .npy or .npz file of plain arrays ({reason}).",
            "Save the batch with numpy.save or numpy.savez (numeric arrays only).",
        ) from error
    if isinstance(loaded, np.ndarray):
        return {"x": loaded}
    with loaded:
        try:
            return {name: loaded[name] for name in loaded.files}
        except (ValueError, OSError, zipfile.BadZipFile) as error:
            raise InputError(f"{path}: an array in the file cannot be read ({error}).") from error


def _pick_arrays(specs, arrays: dict[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
    if len(specs) == 1:
        name = specs[0].name
        if name in arrays:
            return {name: arrays[name]}
        if "x" in arrays:
            return {name: arrays["x"]}
        if len(arrays) == 1:
            return {name: next(iter(arrays.values()))}
        accepted = f"'{name}' or 'x'" if name != "x" else "'x'"
        raise InputError(
            f"{origin}: contains arrays {', '.join(sorted(arrays)) or '(none)'}; none "
            f"is named {accepted}.",
            f"Name the array for model input '{name}' after it.",
        )
    missing = [spec.name for spec in specs if spec.name not in arrays]
    if missing:
        raise InputError(
            f"{origin}: no array for model inputs {', '.join(missing)} (arrays: "
            f"{', '.join(sorted(arrays)) or 'none'}).",
            "Store one array per model input, named after the input, in an .npz file "
            "(a .npy file holds one array).",
        )
    return {spec.name: arrays[spec.name] for spec in specs}


def _is_nhwc_image(spec: InputSpec, array: np.ndarray) -> bool:
    if array.dtype != np.uint8 or array.ndim != 4 or spec.shape is None:
        return False
    if len(spec.shape) != 4 or not np.issubdtype(spec.dtype, np.floating):
        return False
    channels = spec.shape[1]
    if isinstance(channels, int):
        return array.shape[3] == channels and array.shape[1] != channels
    return array.shape[3] in (1, 3, 4)


def _normalise_image(array, mean, std, spec, warnings) -> np.ndarray:
    images = array.transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    channels = images.shape[1]
    if mean is None and std is None:
        warnings.append(
            f"uint8 images for input '{spec.name}' scaled to [0, 1] without mean/std "
            "normalisation; pass --mean and --std"
        )
    for label, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, channels):
            raise InputError(
                f"{label} has {len(values)} values but the images have {channels} channels."
            )
    if mean is not None:
        images = images - np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1)
    if std is not None:
        images = images / np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1)
    return images.astype(spec.dtype)


def _check_array(spec: InputSpec, array: np.ndarray, origin: str) -> np.ndarray:
    """Check rank, fixed dims and dtype kind; cast within the same kind."""
    shape_text = "(" + ", ".join(str(d) for d in array.shape) + ")"
    mismatch = spec.shape is not None and (
        len(spec.shape) != array.ndim
        or any(isinstance(d, int) and d != a for d, a in zip(spec.shape, array.shape))
    )
    if mismatch:
        raise InputError(
            f"{origin}: model input '{spec.name}' has shape {spec.describe_shape()}, "
            f"but the array has shape {shape_text}.",
            "Pass an array of the model's shape.",
        )
    want, have = spec.dtype, array.dtype
    same_kind = (
        (np.issubdtype(want, np.floating) and np.issubdtype(have, np.floating))
        or (np.issubdtype(want, np.integer) and np.issubdtype(have, np.integer))
        or (want == np.bool_ and have == np.bool_)
    )
    if not same_kind:
        raise InputError(
            f"{origin}: model input '{spec.name}' is {want.name}, but the array is "
            f"{have.name}.",
            "Convert the array to the model's type before scoring.",
        )
    return np.ascontiguousarray(array.astype(want, copy=False))


def batch_from_arrays(
    model: onnx.ModelProto,
    arrays: dict[str, np.ndarray],
    origin: str,
    description: str,
    batch_size: int | None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Batch:
    """Build feeds from user arrays; ``batch_size`` keeps the first samples.

    The batch axis of each input is its symbolic axis named as the batch (so a
    sequence-first token input is cut along axis 1), else axis 0.
    """
    return _batch_for_specs(input_specs(model), arrays, origin, description, batch_size, mean, std)


def batch_from_file(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    batch_size: int | None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Batch:
    """Build feeds from a .npy/.npz file, as :func:`batch_from_arrays` does.

    The last batches built are kept per process, keyed by the file's identity (path,
    size, modification time) and everything else the feeds depend on, so scoring many
    models on one file reads and normalises it once.
    """
    try:
        stat = os.stat(path)
    except OSError:
        read_array_file(path)  # raises the error that names the problem
        raise
    identity = (os.fspath(path), os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    key_mean = tuple(mean) if mean is not None else None
    key_std = tuple(std) if std is not None else None
    cached = _cached_file_batch(identity, tuple(input_specs(model)), batch_size, key_mean, key_std)
    return Batch(dict(cached.feeds), cached.description, cached.batch_size, list(cached.warnings))


@functools.lru_cache(maxsize=2)
def _cached_file_batch(identity, specs, batch_size, mean, std) -> Batch:
    path = identity[0]
    arrays = read_array_file(path)
    batch = _batch_for_specs(list(specs), arrays, str(path), f"file:{path}", batch_size, mean, std)
    for array in batch.feeds.values():
        array.flags.writeable = False
    return batch


def _batch_for_specs(specs, arrays, origin, description, batch_size, mean, std) -> Batch:
    picked = _pick_arrays(specs, arrays, origin)
    feeds: dict[str, np.ndarray] = {}
    warnings: list[str] = []
    sizes: list[int] = []
    for spec in specs:
        array = np.asarray(picked[spec.name])
        if _is_nhwc_image(spec, array):
            array = _normalise_image(array, mean, std, spec, warnings)
        axis = _array_batch_axis(spec)
        if array.ndim > axis and array.shape[axis] == 0:
            raise InputError(
                f"{origin}: the array for input '{spec.name}' contains no samples."
            )
        if batch_size is not None and array.ndim > axis:
            if array.shape[axis] < batch_size:
                raise InputError(
                    f"{origin}: the array for input '{spec.name}' contains "
                    f"{array.shape[axis]} samples, fewer than --batch-size "
                    f"{batch_size}.",
                    f"Pass --batch-size {array.shape[axis]} or less, or leave it out to "
                    "score every sample.",
                )
            array = array[(slice(None),) * axis + (slice(0, batch_size),)]
        feeds[spec.name] = _check_array(spec, array, origin)
        sizes.append(int(array.shape[axis]) if array.ndim > axis else 1)
    return Batch(feeds, description, sizes[0] if sizes else 1, warnings)


def _array_batch_axis(spec: InputSpec) -> int:
    """Return the batch axis of a user array for an input: the symbolic one, else 0."""
    axis = _symbolic_batch_axis(spec.shape) if spec.shape is not None else None
    return 0 if axis is None else axis


def _text_layout(spec: InputSpec, batch_size: int, seq_len: int) -> tuple[int, int, int]:
    """Return (batch axis, batch size, sequence length) for a rank-2 token input."""
    if spec.shape is None or len(spec.shape) != 2:
        raise InputError(
            f"model input '{spec.name}' has shape {spec.describe_shape()}; text input "
            "needs a rank-2 (sequence, batch) or (batch, sequence) token input."
        )
    resolved, batch_axis = _resolve_shape(spec, batch_size, seq_len, [])
    return batch_axis, resolved[batch_axis], resolved[1 - batch_axis]


def batch_from_text(
    model: onnx.ModelProto, plan: Plan, path, batch_size: int, seq_len: int
) -> Batch:
    """Build a token batch from word-level text (see :mod:`onnxeps.corpus`)."""
    from onnxeps.corpus import token_batch

    specs = input_specs(model)
    if len(specs) != 1 or not np.issubdtype(specs[0].dtype, np.integer):
        raise InputError(
            f"{path}: text input needs a model with one integer token input; this "
            f"model has inputs {', '.join(s.name for s in specs) or 'none'}."
        )
    spec = specs[0]
    batch_axis, batch, steps = _text_layout(spec, batch_size, seq_len)
    tokens, vocabulary = token_batch(path, steps, batch)
    rows = _vocabulary_size(spec, model, plan)
    if rows is not None and vocabulary > rows:
        raise InputError(
            f"{path}: the text has {vocabulary} distinct tokens, but the embedding read "
            f"by input '{spec.name}' has {rows} rows.",
            "Build the model with a vocabulary at least as large as the text's.",
        )
    array = tokens if batch_axis == 1 else tokens.T
    return Batch({spec.name: array.astype(spec.dtype)}, f"file:{path}", batch)
