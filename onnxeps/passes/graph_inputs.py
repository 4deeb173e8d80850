"""Detach initializers from the graph inputs, so that no feed can override a rewrite."""

from __future__ import annotations

import logging

import onnx

__all__ = ["DetachInitializerInputs"]

log = logging.getLogger(__name__)


class DetachInitializerInputs:
    """Remove every main-graph input that is also an initializer.

    ONNX Runtime lets a feed replace such an initializer, which would bypass the constant
    weights; after this pass the initializer is a plain constant.
    """

    name = "detach-initializer-inputs"

    def __call__(self, model: onnx.ModelProto) -> bool:
        graph = model.graph
        initializers = {tensor.name for tensor in graph.initializer}
        kept = [value for value in graph.input if value.name not in initializers]
        removed = len(graph.input) - len(kept)
        if removed == 0:
            return False
        log.info("%d initializers were also graph inputs; they are constants now", removed)
        del graph.input[:]
        graph.input.extend(kept)
        return True
