"""Element types and shapes of a model's tensors, by ONNX shape inference."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import onnx

from onnxeps.graphs import iter_graphs

__all__ = ["TensorType", "infer_types", "skeleton"]

log = logging.getLogger(__name__)

# Float tensors larger than this lose their data in the skeleton used for inference.
_KEEP_DATA_BYTES = 4096


@dataclass(frozen=True)
class TensorType:
    """Element type and shape (an int, a symbolic name, or None per axis)."""

    elem_type: int
    shape: tuple[int | str | None, ...] | None


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy the model without the data of large float tensors (dims and types kept).

    Shape inference needs only the dims of weights, so the copy stays far below the 2 GB
    protobuf limit and is cheap to serialise.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for ref in iter_graphs(copy):
        for tensor in ref.graph.initializer:
            if tensor.data_type == onnx.TensorProto.INT64:
                continue
            if len(tensor.raw_data) > _KEEP_DATA_BYTES:
                tensor.ClearField("raw_data")
            for field in ("float_data", "double_data", "int32_data"):
                if len(getattr(tensor, field)) * 4 > _KEEP_DATA_BYTES:
                    tensor.ClearField(field)
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                tensor.ClearField("external_data")
                tensor.data_location = onnx.TensorProto.DEFAULT
    return copy


def _type_of(value: onnx.ValueInfoProto) -> TensorType | None:
    if not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return TensorType(tensor_type.elem_type, None)
    dims: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorType(tensor_type.elem_type, tuple(dims))


class _InferredTypes(Mapping[str, TensorType]):
    """Types by tensor name, each converted from its value info when first read.

    Callers read the types of a few tensors only, so converting every value info of a
    model up front would cost more than the inference itself.
    """

    def __init__(self, graphs: list[onnx.GraphProto]) -> None:
        self._values: dict[str, onnx.ValueInfoProto | onnx.TensorProto] = {}
        for graph in graphs:
            for value in [*graph.input, *graph.output, *graph.value_info]:
                if value.type.HasField("tensor_type"):
                    self._values[value.name] = value
            for tensor in graph.initializer:
                self._values[tensor.name] = tensor
        self._types: dict[str, TensorType | None] = {}

    def _convert(self, name: str) -> TensorType | None:
        if name not in self._types:
            value = self._values.get(name)
            if isinstance(value, onnx.TensorProto):
                self._types[name] = TensorType(value.data_type, tuple(value.dims))
            else:
                self._types[name] = None if value is None else _type_of(value)
        return self._types[name]

    def __getitem__(self, name: str) -> TensorType:
        found = self._convert(name)
        if found is None:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._values if self._convert(name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def infer_types(
    model: onnx.ModelProto, data_prop: bool = False, *, bare: bool = False
) -> Mapping[str, TensorType]:
    """Return the inferred type of every tensor that inference could type.

    ``data_prop`` also propagates the values of shape computations (Shape, Gather,
    Concat, ...), so a tensor shaped from them, e.g. by ConstantOfShape, gets a shape.
    ``bare`` says that the model is a :func:`skeleton` already, which saves a copy.
    Inference failures are logged and leave the affected tensors untyped.
    """
    if not bare:
        model = skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            model, strict_mode=False, data_prop=data_prop
        )
    except Exception as error:  # onnx raises several unrelated types here
        log.info("shape inference failed (%s); using declared types only", error)
        inferred = model
    return _InferredTypes([ref.graph for ref in iter_graphs(inferred)])
