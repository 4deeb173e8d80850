"""Element types and shapes of a model's tensors, by ONNX shape inference."""

from __future__ import annotations

import logging
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


def infer_types(model: onnx.ModelProto, data_prop: bool = False) -> dict[str, TensorType]:
    """Return the inferred type of every tensor that inference could type.

    ``data_prop`` also propagates the values of shape computations (Shape, Gather,
    Concat, ...), so a tensor shaped from them, e.g. by ConstantOfShape, gets a shape.
    Inference failures are logged and leave the affected tensors untyped.
    """
    bare = skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            bare, strict_mode=False, data_prop=data_prop
        )
    except Exception as error:  # onnx raises several unrelated types here
        log.info("shape inference failed (%s); using declared types only", error)
        inferred = bare
    types: dict[str, TensorType] = {}
    for ref in iter_graphs(inferred):
        graph = ref.graph
        for value in [*graph.input, *graph.output, *graph.value_info]:
            found = _type_of(value)
            if found is not None:
                types[value.name] = found
        for tensor in graph.initializer:
            types[tensor.name] = TensorType(tensor.data_type, tuple(tensor.dims))
    return types
