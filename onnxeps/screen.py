"""Screen candidate models: epsilon beside size, MACs, activation memory and latency.

Each record is the score record followed by these columns, in this order:

- ``params``: elements of trainable tensors (running statistics excluded).
- ``macs``: multiply-accumulates per sample of Conv, ConvTranspose, Gemm, MatMul and
  the LSTM/GRU/RNN gate matrices, from shapes inferred at the scoring input with a
  batch of 1. Elementwise, normalisation and pooling operators are not counted.
- ``peak_activation_bytes``: an estimate of the peak bytes of live activations at the
  scoring batch (method in :mod:`onnxeps.memory`).
- ``file_bytes``: the .onnx file plus its external data files.
- ``latency_ms_batch1`` and ``latency_ms_batch``: median ONNX Runtime latency of the
  original, unrewritten model at batch 1 and at the scoring batch, on synthetic inputs
  made per input type as scoring makes them (method in :mod:`onnxeps.latency`). Null
  when not measured, with a warning saying why.
- ``pareto``: whether the model is on the Pareto front that maximises epsilon and
  minimises the chosen cost column. A model with an undefined epsilon or a null cost is
  never on the front.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from onnxeps.corpus import TEXT_SUFFIXES
from onnxeps.cost import count_macs, parameter_count
from onnxeps.errors import InputError, OnnxepsError
from onnxeps.graphs import iter_tensors
from onnxeps.infer import skeleton
from onnxeps.inputs import (
    Batch,
    _symbolic_batch_axis,
    batch_from_arrays,
    input_specs,
    read_array_file,
    synthetic_batch,
)
from onnxeps.latency import find_runtime_crashers, median_latency_ms, open_session
from onnxeps.load import LoadedModel, load_model
from onnxeps.memory import peak_activation_bytes
from onnxeps.plan import Plan, build_plan
from onnxeps.pareto import pareto_flags
from onnxeps.score import DEFAULT_SEED, DEFAULT_SEQ_LEN, DEFAULT_TIMEOUT, score

__all__ = [
    "COST_COLUMNS",
    "SCREEN_COLUMNS",
    "DEFAULT_LATENCY_RUNS",
    "MACS_CONVENTION",
    "screen_model",
    "file_bytes",
    "macs_per_sample",
    "mark_pareto",
]

log = logging.getLogger(__name__)

COST_COLUMNS = (
    "macs", "params", "peak_activation_bytes", "file_bytes", "latency_ms_batch1",
    "latency_ms_batch",
)  # fmt: skip
# The columns a screen record adds after the score record, in order.
SCREEN_COLUMNS = [
    "params", "macs", "peak_activation_bytes", "file_bytes", "latency_ms_batch1",
    "latency_ms_batch", "pareto",
]  # fmt: skip
DEFAULT_LATENCY_RUNS = 10
MACS_CONVENTION = (
    "macs: multiply-accumulates per sample of Conv, ConvTranspose, Gemm, MatMul and "
    "LSTM/GRU/RNN gate matrices, at the scoring input shapes with batch 1; elementwise, "
    "normalisation and pooling operators are not counted"
)


def file_bytes(loaded: LoadedModel) -> int:
    """Return the bytes of the .onnx file plus each external data file it references.

    An in-memory model (no folder) counts its serialised size.
    """
    if loaded.base_dir is None:
        return loaded.proto.ByteSize()
    total = Path(loaded.label).stat().st_size
    locations = []
    for tensor in iter_tensors(loaded.proto):
        if external_data_helper.uses_external_data(tensor):
            location = external_data_helper.ExternalDataInfo(tensor).location
            if location not in locations:
                locations.append(location)
    for location in locations:
        total += (loaded.base_dir / location).stat().st_size
    return total


def _is_text(inputs) -> bool:
    if not isinstance(inputs, str | os.PathLike):
        return False
    return Path(inputs).suffix.lower() in TEXT_SUFFIXES


def _arrays(inputs) -> dict[str, np.ndarray]:
    if isinstance(inputs, dict):
        return inputs
    if isinstance(inputs, np.ndarray):
        return {"x": inputs}
    return read_array_file(inputs)


def _batch_like_scoring(
    model: onnx.ModelProto, plan: Plan, inputs, synthetic, batch_size, seq_len, seed
) -> Batch:
    """Build a batch of the shapes that scoring uses at ``batch_size`` samples.

    A text input gives the same (sequence, batch) shape as synthetic tokens, so it is
    replaced by them here. Only the shapes of the result are meant to match scoring.
    """
    if inputs is None or _is_text(inputs):
        kind = synthetic if inputs is None else None
        rng = np.random.default_rng(seed)
        return synthetic_batch(model, plan, kind, batch_size, seq_len, rng)
    return batch_from_arrays(model, _arrays(inputs), "input", "input", batch_size)


def _shapes(batch: Batch) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape) for name, array in batch.feeds.items()}


def _per_sample_shapes(model: onnx.ModelProto, batch: Batch, warnings: list[str]):
    """Return the batch's input shapes with each fixed batch axis set to 1.

    Scoring takes axis 0 as the batch of an input without a symbolic batch axis.
    """
    shapes = _shapes(batch)
    for spec in input_specs(model):
        shape = shapes.get(spec.name)
        if spec.shape is None or not shape or shape[0] == 1:
            continue
        if _symbolic_batch_axis(spec.shape) is None:
            shapes[spec.name] = (1, *shape[1:])
            warnings.append(
                f"input '{spec.name}' has a fixed batch axis of {shape[0]}; MACs are "
                "counted with it set to 1"
            )
    return shapes


def _without_declared_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy the model without the shapes declared for outputs and intermediate tensors.

    Shape inference keeps a declared shape over an inferred one, so a fixed batch
    declared there would survive setting the input's batch axis to 1.
    """
    bare = skeleton(model)
    del bare.graph.value_info[:]
    for value in bare.graph.output:
        value.type.tensor_type.ClearField("shape")
    return bare


def macs_per_sample(
    model: onnx.ModelProto, plan: Plan, inputs, synthetic, seq_len, seed,
    scoring_batch: int, warnings: list[str],
) -> int:  # fmt: skip
    """Count MACs at the scoring input shapes with a batch of 1."""
    try:
        batch = _batch_like_scoring(model, plan, inputs, synthetic, 1, seq_len, seed)
    except InputError:
        # User arrays for a fixed batch axis cannot be cut to one sample.
        batch = _batch_like_scoring(
            model, plan, inputs, synthetic, scoring_batch, seq_len, seed
        )
    shapes = _per_sample_shapes(model, batch, warnings)
    if shapes != _shapes(batch):
        model = _without_declared_shapes(model)
    macs, uncounted = count_macs(model, shapes)
    if uncounted:
        shown = ", ".join(uncounted[:3])
        warnings.append(
            f"MACs of {len(uncounted)} operators not counted, because their shapes are "
            f"not static ({shown})"
        )
    return macs


def _activation_peak(model, plan, inputs, synthetic, batch_size, seq_len, seed, warnings) -> int:
    batch = _batch_like_scoring(model, plan, inputs, synthetic, batch_size, seq_len, seed)
    peak = peak_activation_bytes(model, _shapes(batch))
    if peak.unknown:
        warnings.append(
            f"peak_activation_bytes is a lower bound: {len(peak.unknown)} tensors have "
            "no static shape and count as 0 bytes"
        )
    return peak.bytes


def _latencies(
    loaded: LoadedModel, plan: Plan, settings: dict, batch_size: int, runs: int,
    warnings: list[str],
) -> tuple[float | None, float | None]:  # fmt: skip
    """Measure latency at batch 1 and at ``batch_size``.

    Returns (None, None) and appends a warning when the model is known to crash the
    runtime or a run fails.
    """
    if runs == 0:
        return None, None
    crashers = find_runtime_crashers(loaded.proto)
    if crashers:
        warnings.append(f"latency not measured: {crashers[0]}")
        return None, None
    if loaded.base_dir is not None:
        source = loaded.label
    else:
        source = loaded.proto.SerializeToString()
    try:
        session, _ = open_session(source, settings["device"])
        found = []
        for size in (1, batch_size):
            rng = np.random.default_rng(settings["seed"])
            batch = synthetic_batch(
                loaded.proto, plan, settings["synthetic"], size, settings["seq_len"], rng
            )
            if batch.batch_size != size:
                warnings.append(
                    f"the batch axis is fixed at {batch.batch_size}; latency for batch "
                    f"{size} is measured at {batch.batch_size} samples"
                )
            found.append(
                median_latency_ms(session, batch.feeds, runs, timeout=settings["timeout"])
            )
    except OnnxepsError as error:
        warnings.append(f"latency not measured: {error}")
        return None, None
    return round(found[0], 4), round(found[1], 4)


def _settings(options: dict) -> dict:
    """Return the options the screen columns depend on, with scoring's defaults."""
    defaults = {
        "synthetic": None, "seq_len": DEFAULT_SEQ_LEN, "seed": DEFAULT_SEED,
        "device": "auto", "timeout": DEFAULT_TIMEOUT,
    }  # fmt: skip
    return {
        key: default if options.get(key) is None else options[key]
        for key, default in defaults.items()
    }


def screen_model(
    model: str | os.PathLike | onnx.ModelProto,
    inputs=None,
    *,
    latency_runs: int = DEFAULT_LATENCY_RUNS,
    **score_options,
) -> dict:
    """Score a model and add the screen columns (``pareto`` False until marked).

    ``score_options`` are the keyword arguments of :func:`onnxeps.score`.
    ``latency_runs`` is the number of timed runs per batch size; 0 skips the latency
    columns. Raises :class:`onnxeps.OnnxepsError` when the model cannot be scored.
    """
    result = score(model, inputs, **score_options)
    settings = _settings(score_options)
    loaded = load_model(model)
    plan = build_plan(loaded.proto)
    warnings = list(result.warnings)
    synthetic, seq_len, seed = settings["synthetic"], settings["seq_len"], settings["seed"]
    record = result.record()
    record["params"] = parameter_count(plan)
    record["macs"] = macs_per_sample(
        loaded.proto, plan, inputs, synthetic, seq_len, seed, result.batch_size, warnings
    )
    record["peak_activation_bytes"] = _activation_peak(
        loaded.proto, plan, inputs, synthetic, result.batch_size, seq_len, seed, warnings
    )
    record["file_bytes"] = file_bytes(loaded)
    latencies = _latencies(
        loaded, plan, settings, result.batch_size, latency_runs, warnings
    )
    record["latency_ms_batch1"], record["latency_ms_batch"] = latencies
    record["pareto"] = False
    record["warnings"] = warnings
    return record


def mark_pareto(records: list[dict], cost_column: str) -> None:
    """Set each record's ``pareto`` for maximal epsilon and minimal ``cost_column``."""
    if cost_column not in COST_COLUMNS:
        raise ValueError(
            f"unknown cost column {cost_column!r}; valid columns: "
            f"{', '.join(COST_COLUMNS)}"
        )
    points = [(record["epsilon"], record.get(cost_column)) for record in records]
    for record, flag in zip(records, pareto_flags(points)):
        record["pareto"] = flag
