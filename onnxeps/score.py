"""Score one model: load, plan, rewrite, run twice, compute epsilon."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from onnxeps.corpus import TEXT_SUFFIXES
from onnxeps.cost import parameter_count
from onnxeps.errors import InputError, OnnxepsError, PlanError, ScoreTimeout
from onnxeps.graphs import iter_graphs, node_label
from onnxeps.inputs import (
    Batch,
    batch_from_arrays,
    batch_from_file,
    batch_from_text,
    synthetic_batch,
)
from onnxeps.limits import AUTO, check_weight_memory
from onnxeps.load import LoadedModel, load_model
from onnxeps.metric import epsilon
from onnxeps.passes.base import run_passes
from onnxeps.passes.batchnorm import BatchNormToBatchStatistics
from onnxeps.passes.collapse import CollapseChannels
from onnxeps.passes.constants import (
    ApplyConstants,
    WeightSlots,
    fill_weights,
    weight_cast_warnings,
    weight_feeds,
    weights_as_inputs,
)
from onnxeps.passes.dropout import RemoveDropout
from onnxeps.passes.graph_inputs import DetachInitializerInputs
from onnxeps.passes.output import ExposeOutput, PruneUnused, scored_output_name
from onnxeps.plan import Plan, build_plan
from onnxeps.presets import PRESETS, Preset
from onnxeps.roles import SLOT_ROLES, Action, Role
from onnxeps.runtime import Session

__all__ = [
    "ScoreResult", "ScoreSettings", "score", "validate_weights", "DEFAULT_WEIGHTS",
    "RECORD_KEYS",
]  # fmt: skip

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = (1e-7, 1.0)
DEFAULT_BATCH_SIZE = 256
DEFAULT_SEED = 21
DEFAULT_SEQ_LEN = 70
DEFAULT_TIMEOUT = 120.0

InputsArg = str | os.PathLike | np.ndarray | dict[str, np.ndarray] | None


@dataclass
class ScoreResult:
    """The score record of one model; field order is the record's column order."""

    model: str
    sha256: str
    epsilon: float | None
    reason: str | None
    weights: tuple[float, float]
    batch_size: int
    input: str
    output: str
    preset: str | None
    provider: str
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Elements of the model's trainable tensors (running statistics excluded), for
    # callers that report it beside the score; not part of the record.
    parameters: int | None = field(default=None, repr=False, compare=False)

    @property
    def defined(self) -> bool:
        return self.epsilon is not None

    def record(self) -> dict:
        """Return the record (keys :data:`RECORD_KEYS`) with JSON-ready values."""
        return {
            "model": self.model,
            "sha256": self.sha256,
            "epsilon": self.epsilon,
            "reason": self.reason,
            "weights": list(self.weights),
            "batch_size": self.batch_size,
            "input": self.input,
            "output": self.output,
            "preset": self.preset,
            "provider": self.provider,
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 4),
        }


# The keys of a score record, in order.
RECORD_KEYS = (
    "model", "sha256", "epsilon", "reason", "weights", "batch_size", "input", "output",
    "preset", "provider", "warnings", "seconds",
)  # fmt: skip


@dataclass(frozen=True)
class ScoreSettings:
    """Everything that changes a score, with presets already applied."""

    weights: tuple[float, float] = DEFAULT_WEIGHTS
    synthetic: str | None = None
    batch_size: int | None = None
    seed: int = DEFAULT_SEED
    output_name: str | None = None
    device: str = "auto"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    timeout: float | None = DEFAULT_TIMEOUT
    strict: bool = False
    collapse: bool = True
    preset: str | None = None
    recurrent_as_weight: bool = False
    threads: int | None = None


def validate_weights(weights) -> tuple[float, float]:
    """Return (w1, w2) as floats, or raise ValueError when they cannot give a score."""
    pair = tuple(float(w) for w in weights)
    if len(pair) != 2:
        raise ValueError(f"weights must be two numbers, got {len(pair)}")
    if not all(np.isfinite(pair)):
        raise ValueError(f"weights must be finite numbers, got {pair[0]:g} and {pair[1]:g}")
    if pair[0] == pair[1]:
        raise ValueError(
            f"the two weights are equal ({pair[0]:g}), so both runs are identical and "
            "epsilon is 0 by construction; pass two different weights"
        )
    return pair


def _apply_preset(settings: dict, preset_name: str | None) -> ScoreSettings:
    """Fill settings left as None from the preset, then from the defaults."""
    preset: Preset | None = None
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise InputError(
                f"unknown preset {preset_name!r}; valid presets: {', '.join(PRESETS)}."
            )
        preset = PRESETS[preset_name]
    merged = {key: value for key, value in settings.items() if value is not None}
    if preset is not None:
        merged.setdefault("weights", preset.weights)
        merged.setdefault("output_name", preset.output_name)
        merged.setdefault("mean", preset.mean)
        merged.setdefault("std", preset.std)
        merged["recurrent_as_weight"] = preset.recurrent_as_weight
    merged["preset"] = preset_name
    if "weights" in merged:
        try:
            merged["weights"] = validate_weights(merged["weights"])
        except ValueError as error:
            raise InputError(f"invalid weights: {error}.") from None
    return ScoreSettings(**{k: v for k, v in merged.items() if v is not None or k == "preset"})


class _Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds
        self.seconds = seconds

    def left(self, stage: str) -> float | None:
        if self.end is None:
            return None
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise ScoreTimeout(
                f"scoring timed out after {self.seconds:g} s ({stage}).",
                "Raise --timeout for large models or batches.",
            )
        return remaining


def _weights_from_inputs(model: onnx.ModelProto) -> list[str]:
    """Describe weight slots that read graph inputs instead of constants."""
    inputs = {value.name for value in model.graph.input}
    weight_roles = (Role.WEIGHT, Role.RECURRENT_WEIGHT)
    found = []
    for node in model.graph.node:
        for slot, rule in SLOT_ROLES.get(node.op_type, {}).items():
            if rule.role in weight_roles and slot < len(node.input) and node.input[slot] in inputs:
                found.append(
                    f"{node.op_type} '{node_label(node)}' reads its "
                    f"{rule.input_name} from graph input '{node.input[slot]}'"
                )
    return found


def _check_plan(plan: Plan, label: str, strict: bool, model: onnx.ModelProto) -> None:
    if plan.quantized:
        shown = ", ".join(plan.quantized[:3])
        more = f" and {len(plan.quantized) - 3} more" if len(plan.quantized) > 3 else ""
        raise PlanError(
            f"{label}: quantized weights ({shown}{more}); onnxeps does not score "
            "quantized models.",
            "Score the float model from before quantization.",
        )
    if strict and plan.unclassified():
        names = ", ".join(f"'{e.tensor}'" for e in plan.unclassified()[:5])
        raise PlanError(
            f"{label}: unclassified float tensors ({names}) and --strict is set.",
            "Run 'onnxeps plan' to see why, or drop --strict to keep them as they are.",
        )
    if not plan.with_action(Action.WEIGHT):
        fed = _weights_from_inputs(model)
        cause = f" ({'; '.join(fed[:3])})" if fed else ""
        raise PlanError(
            f"{label}: the model has no constant weights to set to w{cause}, so epsilon "
            "cannot be computed.",
            "Export the weights as initializers (run 'onnxeps plan' to see every "
            "tensor's role).",
        )


def _make_batch(
    model: onnx.ModelProto, plan: Plan, inputs: InputsArg, s: ScoreSettings, rng
) -> Batch:
    if inputs is None:
        size = s.batch_size or DEFAULT_BATCH_SIZE
        return synthetic_batch(model, plan, s.synthetic, size, s.seq_len, rng)
    if s.synthetic is not None:
        raise InputError("give either an input batch or a synthetic kind, not both.")
    if isinstance(inputs, dict):
        arrays, origin, description = inputs, "input arrays", "arrays"
    elif isinstance(inputs, np.ndarray):
        arrays, origin, description = {"x": inputs}, "input array", "array"
    elif Path(inputs).suffix.lower() in TEXT_SUFFIXES:
        size = s.batch_size or DEFAULT_BATCH_SIZE
        return batch_from_text(model, plan, inputs, size, s.seq_len)
    else:
        return batch_from_file(model, inputs, s.batch_size, s.mean, s.std)
    mean = list(s.mean) if s.mean is not None else None
    std = list(s.std) if s.std is not None else None
    return batch_from_arrays(model, arrays, origin, description, s.batch_size, mean, std)


def _load_remaining_external(model: onnx.ModelProto, base_dir: Path | None) -> None:
    """Read the external data of tensors the rewrite kept, so the model is whole."""
    for ref in iter_graphs(model):
        for tensor in ref.graph.initializer:
            if external_data_helper.uses_external_data(tensor) and base_dir is not None:
                external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]


@dataclass
class _Template:
    """The rewritten model, its weight placeholders and the batch to run it on.

    ``slots`` describes the weights as graph inputs; None when the model has one copy
    per weight value instead (weights inside subgraphs).
    """

    model: onnx.ModelProto
    weights: list[str]
    multipliers: dict[str, np.ndarray]
    batch: Batch
    output: str
    narrow: bool
    cast_warnings: list[str]
    slots: WeightSlots | None = None


def _template(loaded: LoadedModel, plan: Plan, s: ScoreSettings, inputs, rng) -> _Template:
    """Rewrite the model once, leaving the weights as placeholders."""
    model = loaded.proto
    DetachInitializerInputs()(model)
    output = scored_output_name(model, s.output_name)
    batch = _make_batch(model, plan, inputs, s, rng)
    constants = ApplyConstants(plan, rng)
    run_passes(model, [constants, RemoveDropout()])
    # The passes below read kept tensors (e.g. running statistics), so load their data.
    _load_remaining_external(model, loaded.base_dir)
    collapse = CollapseChannels(constants.weight_tensors, output)
    changed = run_passes(model, [collapse] if s.collapse else [])
    batchnorm = BatchNormToBatchStatistics(collapse.batchnorm_types)
    changed += run_passes(model, [batchnorm, ExposeOutput(output), PruneUnused()])
    log.debug("%s: passes that changed the model: %s", loaded.label, ", ".join(changed))
    template = _Template(
        model, collapse.weights, collapse.multipliers, batch, output,
        narrow=collapse.name in changed,
        cast_warnings=weight_cast_warnings(model, collapse.weights, s.weights),
    )  # fmt: skip
    if template.narrow or not _prepacks_weights(model):
        template.slots = weights_as_inputs(model, collapse.weights)
    return template


# Operators whose constant weights ONNX Runtime pre-packs into blocked layouts. A full
# graph of them runs faster with one session per weight value than with weights fed as
# inputs: resnet_bn at batch 64 took 0.16 s against 0.18 s. Narrow graphs and other
# graphs run faster with one session, e.g. an LSTM took 0.034 s against 0.048 s.
_PREPACKED_OPS = frozenset({"Conv", "ConvTranspose"})


def _prepacks_weights(model: onnx.ModelProto) -> bool:
    return any(node.op_type in _PREPACKED_OPS for node in model.graph.node)


def _run_once(session: Session, template: _Template, feeds, deadline) -> np.ndarray:
    try:
        return session.run(template.output, feeds, deadline.left("running"))
    except ScoreTimeout as error:
        raise ScoreTimeout(
            f"scoring timed out after {deadline.seconds:g} s (running).",
            "Raise --timeout for large models or batches.",
        ) from error


def _run_both(template: _Template, s: ScoreSettings, deadline) -> tuple[list, str]:
    """Run the model for both weights: one session fed each weight, or one per weight."""
    level = "none" if template.narrow else "all"
    batch = template.batch.feeds
    if template.slots is not None:
        session = Session(template.model, s.device, level, s.threads)
        outputs = [
            _run_once(
                session, template,
                batch | weight_feeds(template.slots, weight, template.multipliers),
                deadline,
            )  # fmt: skip
            for weight in s.weights
        ]
        return outputs, session.provider
    outputs = []
    for weight in s.weights:
        model = fill_weights(template.model, template.weights, weight, template.multipliers)
        session = Session(model, s.device, level, s.threads)
        outputs.append(_run_once(session, template, batch, deadline))
    return outputs, session.provider


def score(
    model: str | os.PathLike | onnx.ModelProto | LoadedModel,
    inputs: InputsArg = None,
    *,
    weights: tuple[float, float] | None = None,
    synthetic: str | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    output_name: str | None = None,
    device: str | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    seq_len: int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    strict: bool | None = None,
    collapse: bool | None = None,
    preset: str | None = None,
    threads: int | None = None,
    memory_limit: int | str | None = AUTO,
) -> ScoreResult:
    """Score one model with epsilon.

    ``model`` is a path (external data beside it), a ModelProto (never modified) or a
    :class:`~onnxeps.load.LoadedModel`, which scoring rewrites in place.
    ``inputs`` is a .npy/.npz path, an array (one-input models) or a dict of arrays named
    after the model inputs; when None, a synthetic batch of ``synthetic`` kind (grey,
    normal, uniform, tokens; default grey for float and tokens for integer inputs) with
    ``batch_size`` samples (default 256) is made. ``weights`` is (w1, w2), default
    (1e-7, 1). ``preset`` ("nb201", "nb101", "nlp") sets the reference settings;
    explicit arguments override it. ``timeout`` is in seconds (None: no limit).
    ``collapse`` (default True) evaluates the exactly equivalent narrow graph when every
    operator allows it (see :mod:`onnxeps.passes.collapse`). ``threads`` sets the
    runtime's intra-op threads (default: one per core), for callers that run several
    scorings side by side; it never changes the score. ``memory_limit`` caps the peak
    memory that scoring is estimated to need for the weights, in bytes or as text
    ("3GB", "512MiB"); the default "auto" is the memory available, and None means none.

    Returns a :class:`ScoreResult` whose ``epsilon`` is None with a ``reason`` when the
    metric is undefined. Raises :class:`onnxeps.OnnxepsError` when the model cannot be
    scored at all.
    """
    try:
        return _score(model, inputs, timeout, preset, settings=dict(
            weights=weights, synthetic=synthetic, batch_size=batch_size, seed=seed,
            output_name=output_name, device=device, mean=mean, std=std,
            seq_len=seq_len, strict=strict, collapse=collapse, threads=threads,
        ), memory_limit=memory_limit)  # fmt: skip
    except MemoryError as error:
        raise OnnxepsError(
            f"out of memory while scoring ({error}).",
            "Lower --batch-size, or score on a machine with more memory.",
        ) from error


def _score(
    model, inputs, timeout, preset, settings: dict, memory_limit=AUTO
) -> ScoreResult:
    started = time.perf_counter()
    s = _apply_preset(settings, preset)
    if timeout is not None and not timeout > 0:
        raise InputError(f"invalid timeout {timeout!r}: give a positive number of seconds.")
    deadline = _Deadline(timeout)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    plan = build_plan(loaded.proto, s.recurrent_as_weight)
    _check_plan(plan, loaded.label, s.strict, loaded.proto)
    check_weight_memory(loaded, memory_limit, s.collapse)
    rng = np.random.default_rng(s.seed)
    deadline.left("rewriting")
    template = _template(loaded, plan, s, inputs, rng)
    outputs, provider = _run_both(template, s, deadline)
    result = epsilon(outputs[0], outputs[1])
    batch, output = template.batch, template.output
    batch.warnings.extend(template.cast_warnings)
    if batch.batch_size < 3:
        batch.warnings.append(
            f"batch of {batch.batch_size} sample(s): each run's output is one value per "
            "sample up to equal units, so epsilon can only be 0 or undefined; score "
            "at least a few dozen samples"
        )
    return ScoreResult(
        model=loaded.label,
        sha256=loaded.sha256,
        epsilon=result.value if result.defined else None,
        reason=result.reason,
        weights=tuple(s.weights),
        batch_size=batch.batch_size,
        input=batch.description,
        output=output,
        preset=s.preset,
        provider=provider,
        warnings=[*loaded.warnings, *plan.warnings, *batch.warnings],
        seconds=time.perf_counter() - started,
        parameters=parameter_count(plan),
    )
