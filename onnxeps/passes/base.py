"""Pass infrastructure: each rewrite is a pass with one job, run in place on a model
that the pipeline already copied from the caller's."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

import onnx

from onnxeps.errors import OnnxepsError, RewriteError
from onnxeps.graphs import iter_graphs

__all__ = ["Pass", "run_passes", "NameScope"]

log = logging.getLogger(__name__)


class Pass(Protocol):
    """A rewrite that edits a model in place and returns whether it changed anything."""

    name: str

    def __call__(self, model: onnx.ModelProto) -> bool: ...


def run_passes(model: onnx.ModelProto, passes: Iterable[Pass]) -> list[str]:
    """Run passes in order; return the names of those that changed the model.

    A failing pass is re-raised as :class:`RewriteError` naming it and the passes before it.
    """
    done: list[str] = []
    changed: list[str] = []
    for rewrite in passes:
        try:
            if rewrite(model):
                changed.append(rewrite.name)
        except (OnnxepsError, MemoryError):
            raise
        except Exception as error:
            after = f" after {', '.join(done)}" if done else ""
            raise RewriteError(
                f"rewrite pass {rewrite.name} failed{after}: "
                f"{type(error).__name__}: {error}"
            ) from error
        log.debug("pass %s done", rewrite.name)
        done.append(rewrite.name)
    return changed


class NameScope:
    """Hands out tensor and node names that do not clash with any name in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken: set[str] = set()
        for ref in iter_graphs(model):
            graph = ref.graph
            self.taken.update(t.name for t in graph.initializer)
            self.taken.update(v.name for v in graph.input)
            self.taken.update(v.name for v in graph.output)
            for node in graph.node:
                self.taken.update(node.output)
                self.taken.add(node.name)

    def fresh(self, stem: str) -> str:
        name = stem
        counter = 1
        while name in self.taken:
            name = f"{stem}_{counter}"
            counter += 1
        self.taken.add(name)
        return name
