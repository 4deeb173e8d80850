"""Load an ONNX model from a path or from memory and identify it by SHA-256."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxeps.errors import ModelLoadError
from onnxeps.graphs import iter_graphs, iter_tensors

__all__ = ["LoadedModel", "load_model", "referenced_files", "PROTO_LIMIT_BYTES"]

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


def _hash_files(paths: list[Path]) -> str:
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


def _checker_warnings(model: str | onnx.ModelProto) -> list[str]:
    """Run onnx.checker (by path for files, so models over 2 GB work)."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        return [f"onnx.checker rejects the model ({first}); ONNX Runtime may still run it"]
    return []


def _check_names(model: onnx.ModelProto, label: str) -> None:
    """Reject a model whose names are not valid UTF-8 (protobuf decodes them lazily)."""
    try:
        for ref in iter_graphs(model):
            graph = ref.graph
            for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
                _ = value.name
            for node in graph.node:
                _ = (node.name, node.op_type, node.domain, list(node.input), list(node.output))
    except UnicodeDecodeError as error:
        raise ModelLoadError(
            f"{label}: not a valid ONNX model (a name is not valid UTF-8: {error}).",
            "Check that the file is a complete, uncorrupted .onnx export.",
        ) from error


def _load_path(path: Path, label: str) -> LoadedModel:
    """Load a model file; ``label`` is the path as the caller wrote it."""
    if not path.exists():
        raise ModelLoadError(f"{label}: file not found.")
    if not path.is_file():
        raise ModelLoadError(f"{label}: not a file.")
    model = _parse(path, label)
    _check_names(model, label)
    locations = _external_locations(model)
    externals = [_resolve_external(path, loc, label) for loc in locations]
    sha = _hash_files([path, *externals])
    log.debug("loaded %s (%d external files, sha256 %s)", label, len(externals), sha)
    return LoadedModel(model, sha, label, path.parent, _checker_warnings(str(path)))


def referenced_files(path: str | os.PathLike) -> list[Path]:
    """Return the model file and the external-data files it references.

    An unreadable model gives just its own path; loading it reports the error.
    """
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # any parse failure: the caller reports it when scoring
        return [path]
    return [path, *(path.parent / loc for loc in _external_locations(model))]


def load_model(model: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """Load a model from a path (external data beside it) or take a ModelProto.

    The SHA-256 covers the file's bytes followed by each external-data file's bytes in the
    order the model references them; for an in-memory model it covers the serialised proto.
    A ModelProto is copied, so later rewrites never touch the caller's object.
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _check_names(copy, copy.graph.name or "<in-memory model>")
        try:
            data = copy.SerializeToString()
        except ValueError as error:
            raise ModelLoadError(
                f"in-memory model cannot be serialised ({error}).",
                "Save models over 2 GB with external data and pass the path.",
            ) from error
        sha = hashlib.sha256(data).hexdigest()
        label = copy.graph.name or "<in-memory model>"
        return LoadedModel(copy, sha, label, None, _checker_warnings(copy))
    return _load_path(Path(model), os.fspath(model))
