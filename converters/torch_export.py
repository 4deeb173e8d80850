"""Export PyTorch modules to ONNX so that onnxeps scores them as PyTorch would.

The metric sets every parameter of the module to a constant, normalises with batch
statistics and turns dropout off. The exported graph must therefore keep each
normalisation layer as a normalisation operator: torch.onnx folds BatchNorm into the
preceding Conv in eval mode unless constant folding is off (torch 2.13). The export:

- runs on an eval-mode deep copy, so the caller's module keeps its parameters, buffers
  and training flag (exporting in train mode would update BatchNorm running statistics);
- uses the TorchScript exporter with ``do_constant_folding=False``, or the dynamo
  exporter with ``optimize=False`` (``exporter="auto"`` tries TorchScript first and
  falls back to dynamo, which exports modules such as ``nn.TransformerEncoderLayer``
  that TorchScript tracing rejects in torch 2.13);
- makes the axes in ``dynamic_axes`` symbolic (default: axis 0, named ``batch``);
- marks float constants that the exporter created, such as the unit scale of a
  normalisation layer without affine parameters, as ``keep`` in the ``onnxeps.roles``
  metadata, because only the module's parameters take the metric's constants;
- records the converter, exporter, settings and what became of BatchNorm layers in
  ``metadata_props``.

PyTorch is imported when :func:`export` runs; without it the call raises
:class:`MissingExtraError` naming the ``onnxeps[torch]`` extra.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from onnxeps.graphs import iter_graphs
from onnxeps.plan import NORMALISATION_KEY, build_plan
from onnxeps.roles import Action, Role

from ._builder import (
    CONVERTER_KEY,
    EXPORT_SETTINGS_KEY,
    EXPORTER_KEY,
    ROLES_KEY,
    save_model_atomic,
    update_metadata,
)
from ._extras import MissingExtraError, import_extra

__all__ = ["EXPORTERS", "DEFAULT_OPSET", "export", "MissingExtraError"]

log = logging.getLogger(__name__)

CONVERTER_ID = "onnxeps.converters.torch_export 1"
DEFAULT_OPSET = 17
EXPORTERS = ("auto", "torchscript", "dynamo")
DEFAULT_DYNAMIC_AXES = {0: "batch"}
_TORCHSCRIPT_DEPRECATION = (
    "You are using the legacy TorchScript-based ONNX export|The feature will be removed"
)

# Roles whose rewrite changes a tensor. An exporter-made constant in one of them gets a
# "keep" hint. Recurrent biases and initial states are left out, because the NLP preset
# sets them to w whether the module or the exporter made them.
_REWRITTEN_ROLES = frozenset(
    {
        Role.WEIGHT,
        Role.BIAS,
        Role.NORM_SCALE,
        Role.NORM_SHIFT,
        Role.EMBEDDING,
        Role.RECURRENT_WEIGHT,
    }
)


def export(
    module: Any,
    example_input: Any,
    path: str | os.PathLike[str] | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[int, str] | None = None,
    exporter: str = "auto",
) -> onnx.ModelProto:
    """Export an eval-mode deep copy of ``module`` to a checked ONNX model.

    ``example_input`` is a tensor or a tuple of tensors, one per positional argument of
    ``forward``; only shapes and dtypes matter. ``dynamic_axes`` maps axis index to
    axis name and applies to every input and output of high enough rank. Names default
    to ``input`` and ``output`` (``input_0``, ... when there are several). ``path``, if
    given, receives the model atomically. Raises MissingExtraError without PyTorch,
    TypeError for a module or input of the wrong type, ValueError for an invalid
    ``exporter``, RuntimeError when both exporters fail (``exporter="auto"``), and the
    exporter's own error when the one requested fails.
    """
    torch = import_extra("torch", "PyTorch", "torch")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"module must be a torch.nn.Module, got {type(module).__name__}"
        )
    if exporter not in EXPORTERS:
        raise ValueError(f"invalid exporter {exporter!r}; expected one of {EXPORTERS}")
    args = _as_tuple(example_input, torch)
    axes = dict(DEFAULT_DYNAMIC_AXES if dynamic_axes is None else dynamic_axes)
    copied = copy.deepcopy(module).eval()
    output_ranks, batch_norm_calls = _probe(copied, args, torch)
    inputs = _names(input_names, len(args), "input")
    outputs = _names(output_names, len(output_ranks), "output")
    request = _ExportRequest(copied, args, opset, inputs, outputs, axes, output_ranks)
    model, used, fallback_reason = _run_exporter(request, exporter, torch)
    _annotate(model, copied, request, used, fallback_reason, batch_norm_calls, torch)
    onnx.checker.check_model(model)
    if path is not None:
        save_model_atomic(model, path)
    return model


@dataclass
class _ExportRequest:
    """The deep-copied module and the settings of one export."""

    module: Any
    args: tuple
    opset: int
    input_names: list[str]
    output_names: list[str]
    axes: dict[int, str]
    output_ranks: list[int]

    @property
    def input_ranks(self) -> list[int]:
        return [arg.dim() for arg in self.args]

    def axes_for(self, rank: int) -> dict[int, str]:
        """Return the dynamic axes that a tensor of this rank has."""
        return {axis: name for axis, name in self.axes.items() if axis < rank}


def _as_tuple(example_input: Any, torch) -> tuple:
    if isinstance(example_input, list | tuple):
        args = tuple(example_input)
    else:
        args = (example_input,)
    for index, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(
                f"example_input[{index}] must be a torch.Tensor, got "
                f"{type(arg).__name__}"
            )
    return args


def _flatten(value: Any) -> list:
    if isinstance(value, list | tuple):
        return [tensor for item in value for tensor in _flatten(item)]
    if isinstance(value, Mapping):
        return [tensor for item in value.values() for tensor in _flatten(item)]
    return [value]


def _probe(module, args: tuple, torch) -> tuple[list[int], int]:
    """Run the copy once and return the rank of each output tensor, in export order,
    and how many BatchNorm calls the forward pass made."""
    calls = []
    hooks = [
        sub.register_forward_hook(lambda *_: calls.append(1))
        for sub in module.modules()
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm)
    ]
    try:
        with torch.no_grad():
            result = module(*args)
    finally:
        for hook in hooks:
            hook.remove()
    tensors = [item for item in _flatten(result) if isinstance(item, torch.Tensor)]
    if not tensors:
        raise TypeError(
            f"{type(module).__name__}.forward returned no tensor, so there is nothing "
            "to export"
        )
    return [tensor.dim() for tensor in tensors], len(calls)


def _names(given: Sequence[str] | None, count: int, stem: str) -> list[str]:
    if given is not None:
        return list(given)
    return [stem] if count == 1 else [f"{stem}_{index}" for index in range(count)]


def _run_exporter(request: _ExportRequest, exporter: str, torch):
    """Return (model, exporter used, why TorchScript was skipped or None)."""
    if exporter == "dynamo":
        return _export_dynamo(request, torch), "dynamo", None
    try:
        return _export_torchscript(request, torch), "torchscript", None
    except Exception as error:  # the tracer raises many types, and dynamo may work
        if exporter == "torchscript":
            raise
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0] if lines else 'no message'}"
        log.warning("TorchScript export failed (%s); retrying with dynamo", reason)
    try:
        return _export_dynamo(request, torch), "dynamo", reason
    except MissingExtraError as error:
        raise MissingExtraError(
            f"TorchScript export failed ({reason}), and {error}"
        ) from None
    except Exception as error:
        raise RuntimeError(
            f"both torch.onnx exporters failed: TorchScript with {reason}; dynamo with "
            f"{type(error).__name__}: {error}"
        ) from error


def _export_torchscript(request: _ExportRequest, torch) -> onnx.ModelProto:
    dynamic = {}
    for name, rank in zip(request.input_names, request.input_ranks):
        dynamic[name] = request.axes_for(rank)
    for name, rank in zip(request.output_names, request.output_ranks):
        dynamic[name] = request.axes_for(rank)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.13 warns on every call that the TorchScript exporter is deprecated.
        warnings.filterwarnings("ignore", _TORCHSCRIPT_DEPRECATION, DeprecationWarning)
        torch.onnx.export(
            request.module,
            request.args,
            buffer,
            dynamo=False,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            opset_version=request.opset,
            input_names=request.input_names,
            output_names=request.output_names,
            dynamic_axes=dynamic,
        )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(request: _ExportRequest, torch) -> onnx.ModelProto:
    import_extra("onnxscript", "onnxscript (needed by the dynamo exporter)", "torch")
    dims: dict[str, Any] = {}
    shapes = []
    for rank in request.input_ranks:
        shape = {}
        for axis, name in request.axes_for(rank).items():
            # One Dim per name, so inputs that share an axis name share its size.
            shape[axis] = dims.setdefault(name, torch.export.Dim(name))
        shapes.append(shape)
    # The dynamo exporter prints its progress to stdout, where the CLI writes results.
    with contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(
            request.module,
            request.args,
            dynamo=True,
            optimize=False,
            opset_version=request.opset,
            input_names=request.input_names,
            output_names=request.output_names,
            dynamic_shapes=tuple(shapes),
            verbose=False,
        )
    return program.model_proto


def _annotate(
    model, module, request, exporter: str, fallback_reason, batch_norm_calls, torch
) -> None:
    """Record the export in the metadata and mark exporter-made constants as keep."""
    settings = {
        "opset": request.opset,
        "eval_mode": True,
        "dynamic_axes": {str(axis): name for axis, name in request.axes.items()},
    }
    if exporter == "torchscript":
        settings["do_constant_folding"] = False
        description = (
            f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}"
        )
    else:
        settings["optimize"] = False
        description = f"torch.onnx.export (dynamo=True), torch {torch.__version__}"
    if fallback_reason is not None:
        settings["torchscript_error"] = fallback_reason
    entries = {
        CONVERTER_KEY: CONVERTER_ID,
        EXPORTER_KEY: description,
        EXPORT_SETTINGS_KEY: json.dumps(settings),
        NORMALISATION_KEY: _normalisation_state(model, batch_norm_calls),
    }
    hints = _exporter_constant_hints(model, module)
    if hints:
        entries[ROLES_KEY] = json.dumps(hints)
    update_metadata(model, entries)


def _normalisation_state(model: onnx.ModelProto, batch_norm_calls: int) -> str:
    """Return "kept", "folded" or "absent" for the metadata (see onnxeps.plan)."""
    if any(node.op_type == "BatchNormalization" for node in _all_nodes(model)):
        return "kept"
    return "folded" if batch_norm_calls else "absent"


def _all_nodes(model: onnx.ModelProto):
    for ref in iter_graphs(model):
        yield from ref.graph.node


def _exporter_constant_hints(model: onnx.ModelProto, module) -> dict[str, str]:
    """Return a "keep" hint for each float constant the exporter made that the plan
    would rewrite.

    Such a constant is no parameter of the module, so the PyTorch-native metric leaves
    it alone: for example the unit scale and zero shift that torch.onnx writes for
    ``BatchNorm2d(affine=False)`` or ``LayerNorm(elementwise_affine=False)``. A tensor
    counts as the module's when its name, or the name of an Identity alias of it, is a
    state_dict key, because TorchScript shares equal parameters through Identity.
    """
    # NOTE: a registered buffer that a MatMul or Conv reads is owned, so it gets no
    # hint and the plan sets it to w, while the native metric leaves buffers alone.
    owned = set(module.state_dict().keys())
    for node in _all_nodes(model):
        if node.op_type == "Identity" and node.output[0] in owned:
            owned.add(node.input[0])
    hints = {}
    for entry in build_plan(model).entries:
        if entry.tensor in owned or entry.role not in _REWRITTEN_ROLES:
            continue
        if entry.action in (Action.KEEP, Action.UNUSED):
            continue
        hints[entry.tensor] = str(Role.KEEP)
    return hints

