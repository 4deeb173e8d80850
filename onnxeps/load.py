"""Load an ONNX model from a path or from memory and identify it by SHA-256."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import external_data_helper

from onnxeps.errors import ModelLoadError
from onnxeps.graphs import iter_tensors

__all__ = ["LoadedModel", "adopt_built_model", "load_model", "referenced_files", "hash_files", "PROTO_LIMIT_BYTES"]

log = logging.getLogger(__name__)

# Protobuf cannot serialise a message of 2 GiB or more; larger models keep their tensors
# in external data files and are checked by path.
PROTO_LIMIT_BYTES = 2**31 - 1
_HASH_CHUNK_BYTES = 1 << 20


@dataclass
class LoadedModel:
    """A parsed model with its identity.

    Tensors stored as external data stay external (only their references are loaded);
    ``base_dir`` resolves them.
    """

    proto: onnx.ModelProto
    sha256: str
    label: str
    base_dir: Path | None
    warnings: list[str] = field(default_factory=list)


# The label of an in-memory model without a usable graph name.
_IN_MEMORY_LABEL = "<in-memory model>"


def hash_files(paths: Iterable[Path]) -> str:
    """Return the SHA-256 of the files' bytes, read in order, in chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as stream:
            while chunk := stream.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _external_locations(model: onnx.ModelProto) -> list[str]:
    """Return each external-data file name once, in the order the model references it."""
    locations: list[str] = []
    for tensor in iter_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        if info.location not in locations:
            locations.append(info.location)
    return locations


def _resolve_external(path: Path, location: str, label: str) -> Path:
    base = path.parent.resolve()
    candidate = (base / location).resolve()
    if base not in candidate.parents:
        raise ModelLoadError(
            f"{label}: external data location {location!r} points outside the model's "
            "folder.",
            "Keep external data files beside the .onnx file.",
        )
    if not candidate.is_file():
        raise ModelLoadError(
            f"{label}: external data file {location!r} not found beside the model.",
            "Copy the .onnx file together with its external data files.",
        )
    return candidate


def _parse(path: Path, label: str) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, TypeError, OSError) as error:
        raise ModelLoadError(
            f"{label}: not a valid ONNX model ({type(error).__name__}: {error}).",
            "Check that the file is a complete .onnx export.",
        ) from error
    # A file cut off right after the graph still parses, but without its opset imports.
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise ModelLoadError(
            f"{label}: not a valid ONNX model (no graph, IR version or opset import).",
            "Check that the file is a complete .onnx export.",
        )
    return model


def _checkable(path: Path, model: onnx.ModelProto) -> str | onnx.ModelProto:
    """Return the path for onnx.checker, or the loaded model when the checker cannot
    take the file name (it accepts UTF-8 names only)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return model
    return str(path)


def _checker_warnings(model: str | onnx.ModelProto) -> list[str]:
    """Run onnx.checker (by path for files, so models over 2 GB work)."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        return [f"onnx.checker rejects the model ({first}); ONNX Runtime may still run it"]
    return []


# One step from the model towards a field: (previous step, the message the step
# reaches or None for a string, field name, index in a repeated field or None).
_Trail = tuple | None
# ListFields() would copy a tensor's data out of the proto, so tensors list only these.
_TENSOR_TEXT_FIELDS = [
    field
    for field in onnx.TensorProto.DESCRIPTOR.fields
    if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE)
]


def _set_fields(message: Message) -> list[tuple[FieldDescriptor, object]]:
    if not isinstance(message, onnx.TensorProto):
        return message.ListFields()
    return [
        (field, getattr(message, field.name))
        for field in _TENSOR_TEXT_FIELDS
        if field.is_repeated or message.HasField(field.name)
    ]


def _invalid_strings(model: onnx.ModelProto) -> Iterator[tuple[_Trail, bytes]]:
    """Yield every string field that is not valid UTF-8, with the trail to it.

    Protobuf (7.36, upb backend) returns such a field as ``bytes`` instead of raising.
    """
    pending: list[tuple[Message, _Trail]] = [(model, None)]
    while pending:
        message, trail = pending.pop()
        for descriptor, value in _set_fields(message):
            items = enumerate(value) if descriptor.is_repeated else [(None, value)]
            name = descriptor.name
            if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
                pending.extend((item, (trail, item, name, i)) for i, item in items)
            elif descriptor.type == FieldDescriptor.TYPE_STRING:
                for index, item in items:
                    if type(item) is bytes:
                        yield (trail, None, name, index), item


def _describe_field(trail: _Trail) -> str:
    """Return the field's path from the model, e.g. ``graph.node[3].input[0]``, and
    the type and name of the node it belongs to."""
    names: list[str] = []
    node = None
    while trail is not None:
        trail, message, name, index = trail
        names.append(name if index is None else f"{name}[{index}]")
        if node is None and isinstance(message, onnx.NodeProto):
            node = message
    path = ".".join(reversed(names))
    if node is None or type(node.op_type) is bytes:
        return path
    named = f" '{node.name}'" if node.name and type(node.name) is str else ""
    return f"{path} (in node{named} of type {node.op_type})"


def _check_strings(model: onnx.ModelProto, label: str) -> None:
    """Reject a model with a string field (a name, op type, dim_param, ...) that is not
    valid UTF-8, because every later step expects text there."""
    found = next(_invalid_strings(model), None)
    if found is None:
        return
    trail, value = found
    raise ModelLoadError(
        f"{label}: not a valid ONNX model: the string field {_describe_field(trail)} "
        f"is not valid UTF-8: {value[:60]!r}.",
        "Re-export the model, or rewrite that field as UTF-8 text with the onnx "
        "Python package.",
    )


def _load_path(path: Path, label: str) -> LoadedModel:
    """Load a model file; ``label`` is the path as the caller wrote it."""
    if not path.exists():
        raise ModelLoadError(f"{label}: file not found.")
    if not path.is_file():
        raise ModelLoadError(
            f"{label}: not a file.",
            "Pass the path of an .onnx file (onnxeps score also takes folders).",
        )
    model = _parse(path, label)
    _check_strings(model, label)
    locations = _external_locations(model)
    externals = [_resolve_external(path, loc, label) for loc in locations]
    sha = hash_files([path, *externals])
    log.debug("loaded %s (%d external files, sha256 %s)", label, len(externals), sha)
    return LoadedModel(model, sha, label, path.parent, _checker_warnings(_checkable(path, model)))


def referenced_files(path: str | os.PathLike) -> list[Path]:
    """Return the model file and the external-data files it references.

    An unreadable model gives just its own path; loading it reports the error.
    """
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # any parse failure: the caller reports it when scoring
        return [path]
    if next(_invalid_strings(model), None) is not None:
        return [path]
    return [path, *(path.parent / loc for loc in _external_locations(model))]


def adopt_built_model(model: onnx.ModelProto, sha256: str | None = None) -> LoadedModel:
    """Take a model that a converter has just built and checked, without a copy.

    Scoring rewrites the model in place, so the caller must not use it afterwards. The
    strings were set through protobuf, which accepts only valid UTF-8, and the converter
    ran the checker, so neither check runs again. ``sha256`` is the hash of the
    serialised model when the caller has it.
    """
    if sha256 is None:
        sha256 = hashlib.sha256(model.SerializeToString()).hexdigest()
    return LoadedModel(model, sha256, model.graph.name or _IN_MEMORY_LABEL, None)


def load_model(model: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """Load a model from a path (external data beside it) or take a ModelProto.

    The SHA-256 covers the file's bytes followed by each external-data file's bytes in the
    order the model references them; for an in-memory model it covers the serialised proto.
    A ModelProto is copied, so later rewrites never touch the caller's object.
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        # The graph name labels the model unless it is empty or not valid UTF-8.
        label = copy.graph.name if isinstance(copy.graph.name, str) else ""
        label = label or _IN_MEMORY_LABEL
        _check_strings(copy, label)
        try:
            data = copy.SerializeToString()
        except ValueError as error:
            raise ModelLoadError(
                f"in-memory model cannot be serialised ({error}).",
                "Save models over 2 GB with external data and pass the path.",
            ) from error
        sha = hashlib.sha256(data).hexdigest()
        return LoadedModel(copy, sha, label, None, _checker_warnings(copy))
    return _load_path(Path(model), os.fspath(model))
