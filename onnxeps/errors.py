"""Exceptions raised by onnxeps.

Every error meant for a user is an :class:`OnnxepsError`: one sentence saying what failed
on which file, tensor or node, and an optional hint saying what to do next. The CLI prints
it as one line and exits with :attr:`OnnxepsError.exit_code`.
"""

from __future__ import annotations


class OnnxepsError(Exception):
    """A user-facing failure with a one-line message and an optional next step."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} {self.hint}"
        return self.message


class ModelLoadError(OnnxepsError):
    """The model file is missing, unreadable or not a valid ONNX model."""


class PlanError(OnnxepsError):
    """The model's tensors cannot be classified as the metric requires."""


class InputError(OnnxepsError):
    """An input batch does not fit the model, or cannot be made for it."""


class RewriteError(OnnxepsError):
    """A rewrite pass failed on the model."""


class RuntimeFailure(OnnxepsError):
    """ONNX Runtime is missing, failed to build a session, or failed to run."""


class ScoreTimeout(OnnxepsError):
    """Scoring one model took longer than the configured timeout."""


class MemoryLimitError(OnnxepsError):
    """Scoring the model would need more memory than the memory limit allows."""
