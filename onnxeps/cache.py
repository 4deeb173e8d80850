"""A result cache of score records: one small JSON file per key.

The key is the SHA-256 of a canonical JSON document that contains the model's sha256, every
setting that changes the score, the identity of the input batch and the versions of
onnxeps and ONNX Runtime. The folder is ``$ONNXEPS_CACHE_DIR``, else
``$XDG_CACHE_HOME/onnxeps``, else ``~/.cache/onnxeps``. Entries are written atomically,
so concurrent writers of one key leave one whole file, and a corrupt or unreadable entry
is treated as a miss.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from onnxeps.load import hash_files, referenced_files
from onnxeps.report import atomic_write_text, json_ready
from onnxeps.runtime import import_runtime
from onnxeps.score import ScoreSettings

__all__ = [
    "KEYED_SETTINGS",
    "ResultCache",
    "cache_key",
    "default_cache_dir",
    "input_identity",
    "model_sha256",
]

log = logging.getLogger(__name__)

# Settings that change how fast a model is scored, never its record: a time limit, a
# thread count, and a flag that the preset decides.
_UNKEYED_SETTINGS = frozenset({"timeout", "threads", "recurrent_as_weight"})
KEYED_SETTINGS = tuple(
    field.name
    for field in dataclasses.fields(ScoreSettings)
    if field.name not in _UNKEYED_SETTINGS
)
# Raise when the key document or the entry layout changes, so old entries are missed.
_KEY_FORMAT = 1


def default_cache_dir() -> Path:
    """Return the cache folder: $ONNXEPS_CACHE_DIR, $XDG_CACHE_HOME/onnxeps or ~/.cache/onnxeps.

    An empty or relative $XDG_CACHE_HOME is ignored, as the XDG base directory
    specification requires.
    """
    configured = os.environ.get("ONNXEPS_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "onnxeps"


def model_sha256(path: str | os.PathLike) -> str:
    """Return the sha256 of a model file followed by its external-data files.

    This is the ``sha256`` of the model's score record. Raises OSError when a file
    cannot be read.
    """
    return hash_files(referenced_files(path))


def _array_identity(array: np.ndarray) -> dict:
    contiguous = np.ascontiguousarray(array)
    return {
        "dtype": contiguous.dtype.str,
        "shape": list(contiguous.shape),
        "sha256": hashlib.sha256(contiguous.data).hexdigest(),
    }


def input_identity(inputs) -> dict | None:
    """Describe an input batch for the key: its path and bytes, or its arrays.

    ``inputs`` is what :func:`onnxeps.score` takes: None (synthetic), a path, an array
    or a dict of arrays. Raises OSError when an input file cannot be read.
    """
    if inputs is None:
        return None
    if isinstance(inputs, np.ndarray):
        return {"array": _array_identity(inputs)}
    if isinstance(inputs, dict):
        return {"arrays": {name: _array_identity(inputs[name]) for name in sorted(inputs)}}
    # The path is part of the key because records describe the input as file:PATH.
    return {"path": os.fspath(inputs), "sha256": hash_files([Path(inputs)])}


@functools.cache
def _versions() -> dict:
    from onnxeps import __version__

    runtime = import_runtime()
    return {
        "onnxeps": __version__,
        "onnxruntime": f"{runtime.__version__} {runtime.get_device()}",
    }


def cache_key(kind: str, model_sha: str, options: dict, identity: dict | None) -> str:
    """Return the key of one score.

    ``kind`` names the record's layout: "score", or "bench" with cost columns.
    ``options`` are the keyword arguments given to :func:`onnxeps.score`, of which
    every setting in :data:`KEYED_SETTINGS` enters the key. ``identity`` comes from
    :func:`input_identity`. Raises :class:`onnxeps.OnnxepsError` when ONNX Runtime is
    not installed.
    """
    document = {
        "format": _KEY_FORMAT,
        "kind": kind,
        "model_sha256": model_sha,
        "settings": {name: options.get(name) for name in KEYED_SETTINGS},
        "input": identity,
        **_versions(),
    }
    text = json.dumps(json_ready(document), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# The JSON types of the record fields that later steps read.
_RECORD_TYPES = {
    "sha256": str,
    "epsilon": (int, float, type(None)),
    "reason": (str, type(None)),
    "weights": list,
    "batch_size": int,
    "warnings": list,
    "seconds": (int, float),
}


class ResultCache:
    """Score records stored as ``FOLDER/<first two hex digits>/<key>.json``.

    A write that fails logs one warning and turns further writes off, so a read-only
    or full folder never stops a run.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.writable = True

    def _entry_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def load(self, key: str, required: Iterable[str]) -> dict | None:
        """Return the stored record of ``key``, or None when there is no valid entry.

        An entry that cannot be read or parsed, or whose record lacks a ``required``
        key, is logged at debug level and treated as a miss.
        """
        path = self._entry_path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            log.debug("ignoring unreadable cache entry %s: %s", path, error)
            return None
        record = entry.get("record") if isinstance(entry, dict) else None
        if not isinstance(record, dict) or entry.get("key") != key:
            log.debug("ignoring cache entry %s: not a record of this key", path)
            return None
        missing = [name for name in required if name not in record]
        if missing:
            log.debug("ignoring cache entry %s: no %s", path, ", ".join(missing))
            return None
        wrong = [
            name
            for name, kinds in _RECORD_TYPES.items()
            if name in record and not isinstance(record[name], kinds)
        ]
        if wrong:
            log.debug("ignoring cache entry %s: wrong type of %s", path, ", ".join(wrong))
            return None
        return record

    def store(self, key: str, record: dict) -> None:
        """Write the record of ``key`` atomically, unless an earlier write failed."""
        if not self.writable:
            return
        path = self._entry_path(key)
        text = json.dumps({"key": key, "record": json_ready(record)}, allow_nan=False)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text + "\n")
        except OSError as error:
            self.writable = False
            log.warning(
                "cannot write the result cache in %s (%s), so this run's results are "
                "not cached; set ONNXEPS_CACHE_DIR to a writable folder or pass "
                "--no-cache",
                self.folder, error.strerror or error,
            )  # fmt: skip
