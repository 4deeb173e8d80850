"""The memory limit checked before scoring materialises a model's weights.

Scoring writes every weight into the rewritten model and reads the external data of
the tensors it keeps. :func:`check_weight_memory` estimates the peak memory of that
from the tensors' dims and data types (external data included, never read) and raises
:class:`MemoryLimitError` when it exceeds the limit. The default limit is the memory
available when the check runs.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import re
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import helper

from onnxeps.errors import InputError, MemoryLimitError
from onnxeps.graphs import iter_tensors
from onnxeps.load import LoadedModel

try:
    import resource
except ImportError:  # not a POSIX system: no address-space limit to read
    resource = None

__all__ = [
    "AUTO",
    "MemoryLimitParam",
    "PEAK_COPIES_COLLAPSE",
    "PEAK_COPIES_FULL",
    "available_memory",
    "check_weight_memory",
    "format_bytes",
    "parse_memory_limit",
    "tensor_bytes",
    "weight_bytes",
]

log = logging.getLogger(__name__)

# The memory limit value that means "the memory available when the check runs".
AUTO = "auto"
# Peak resident memory of scoring as a multiple of the weights' bytes. Measured with
# `onnxeps score` (onnxruntime 1.32, CPU) on a 2.1 GB MatMul weight at batch 2 and on
# four 0.13 GB MatMul-Tanh layers at batch 8: 2.0 and 2.1 times with --no-collapse,
# 3.9 and 3.2 times with the channel collapse. The factors round these up.
PEAK_COPIES_FULL = 2.5
PEAK_COPIES_COLLAPSE = 4.0

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_KEYWORDS = {"none": None, AUTO: AUTO}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_DISPLAY_UNITS = [(10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB")]
# cgroup memory limit files (v2, then v1) of the container the process runs in.
_CGROUP_LIMIT_FILES = [
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
]
# cgroup v1 reports "no limit" as a number near 2**63.
_CGROUP_UNLIMITED = 2**60


def parse_memory_limit(value: int | str | None) -> int | str | None:
    """Return a memory limit in bytes, None for no limit, or :data:`AUTO`.

    Text is a number and a unit in any letter case: B, kB, MB, GB, TB (powers of 1000)
    or KiB, MiB, GiB, TiB (powers of 1024). "none" and "auto" are also accepted.
    Raises ValueError for anything else, and for a size that is not positive.
    """
    if value is None:
        return None
    if isinstance(value, str):
        keyword = value.strip().lower()
        if keyword in _KEYWORDS:
            return _KEYWORDS[keyword]
        size = _bytes_from_text(value)
    else:
        size = _whole_bytes(value)
    if size <= 0:
        raise ValueError(f"invalid memory limit {value!r}: the size must be positive")
    return size


def _bytes_from_text(text: str) -> int:
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(
            f"invalid memory limit {text!r}: give a number and a unit (B, kB, MB, GB, "
            "TB, KiB, MiB, GiB, TiB) such as 3GB or 512MiB, or none or auto"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _whole_bytes(value) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError("a bool is not a size")
        return operator.index(value)
    except TypeError:
        raise ValueError(
            f"invalid memory limit {value!r}: give a whole number of bytes or a size "
            "such as 3GB"
        ) from None


class MemoryLimitParam(click.ParamType):
    """A ``--memory-limit`` value: a size such as 3GB or 512MiB, none or auto."""

    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_memory_limit(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def format_bytes(size: int | float) -> str:
    """Return a byte count in decimal units with one decimal, e.g. "5.2 GB"."""
    for unit_bytes, unit in _DISPLAY_UNITS:
        if size >= unit_bytes:
            return f"{size / unit_bytes:.1f} {unit}"
    return f"{int(size)} bytes"


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Return the bytes a tensor takes as a numpy array, from its dims and data type.

    External data is not read. A string tensor counts its strings' lengths, and a
    tensor of an unknown data type counts 0 (loading it fails later with its own error).
    """
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(item) for item in tensor.string_data)
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, ValueError, TypeError):
        return 0
    return math.prod(max(dim, 0) for dim in tensor.dims) * itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    """Return the bytes of all initializers and Constant-node tensors in all graphs."""
    return sum(tensor_bytes(tensor) for tensor in iter_tensors(model))


def _meminfo_available() -> int | None:
    """Return MemAvailable of /proc/meminfo (Linux), else the free pages' bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_limit() -> int | None:
    """Return the memory limit of the process's cgroup, or None when there is none."""
    for path in _CGROUP_LIMIT_FILES:
        try:
            text = path.read_text(encoding="ascii").strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= _CGROUP_UNLIMITED:
            return None
        return int(text)
    return None


def _address_space_left() -> int | None:
    """Return the soft address-space limit (ulimit -v) minus the process's size now."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        pages = int(Path("/proc/self/statm").read_text(encoding="ascii").split()[0])
        used = pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def available_memory() -> int | None:
    """Return the bytes this process can allocate now, or None when unknown.

    The smallest of the system's available memory, the cgroup's memory limit and the
    address space left under ulimit -v.
    """
    found = [_meminfo_available(), _cgroup_limit(), _address_space_left()]
    known = [size for size in found if size is not None]
    return min(known) if known else None


def check_weight_memory(
    loaded: LoadedModel, memory_limit: int | str | None, collapse: bool
) -> None:
    """Raise :class:`MemoryLimitError` when scoring's peak memory for the weights
    exceeds ``memory_limit`` (bytes, text as :func:`parse_memory_limit` takes, None
    for no limit, or "auto" for the memory available now)."""
    try:
        limit = parse_memory_limit(memory_limit)
    except ValueError as error:
        raise InputError(f"{error}.") from None

    origin = ""
    if limit == AUTO:
        limit, origin = available_memory(), " (the memory available now)"
        if limit is None:
            log.debug("%s: available memory unknown, so no memory limit", loaded.label)
    if limit is None:
        return

    weights = weight_bytes(loaded.proto)
    copies = PEAK_COPIES_COLLAPSE if collapse else PEAK_COPIES_FULL
    need = weights * copies
    log.debug(
        "%s: weights %s, estimated peak %s, limit %s",
        loaded.label, format_bytes(weights), format_bytes(need), format_bytes(limit),
    )  # fmt: skip
    if need <= limit:
        return

    fewer = " --no-collapse to hold fewer copies," if collapse else ""
    raise MemoryLimitError(
        f"{loaded.label}: the weights need about {format_bytes(need)} of memory to "
        f"score ({format_bytes(weights)} of tensors, held about {copies:g} times), and "
        f"the memory limit is {format_bytes(limit)}{origin}.",
        f"Pass a larger --memory-limit (or none),{fewer} or score on a machine with "
        "more memory.",
    )
