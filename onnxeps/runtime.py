"""ONNX Runtime sessions: provider choice, session creation and timed runs."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxeps.errors import RuntimeFailure, ScoreTimeout
from onnxeps.load import PROTO_LIMIT_BYTES

__all__ = ["import_runtime", "providers_for", "Session", "DEVICES"]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
# Rewritten models above this size are handed to the runtime as files with external
# data, because protobuf cannot serialise 2 GiB or more.
_INLINE_LIMIT_BYTES = PROTO_LIMIT_BYTES - (64 << 20)
# threading.Timer overflows on huge intervals; longer limits mean no limit.
_MAX_TIMER_SECONDS = 7 * 24 * 3600.0


def import_runtime():
    """Import onnxruntime, or fail with the extras that provide it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise RuntimeFailure(
            "ONNX Runtime is not installed.",
            "Install one of the extras: pip install 'onnxeps[cpu]' (onnxruntime) or "
            "pip install 'onnxeps[gpu]' (onnxruntime-gpu), not both.",
        ) from error
    # ONNX Runtime logs its own error lines before raising; onnxeps reports the error,
    # so only fatal messages (severity 4) are left to the runtime.
    onnxruntime.set_default_logger_severity(4)
    return onnxruntime


def providers_for(device: str) -> list[str]:
    """Return the execution providers to request for a device choice."""
    ort = import_runtime()
    available = ort.get_available_providers()
    if device == "cpu":
        return [_CPU]
    if device == "cuda":
        if _CUDA not in available:
            raise RuntimeFailure(
                "the CUDA execution provider is not available in this ONNX Runtime "
                f"(available: {', '.join(available)}).",
                "Install onnxeps[gpu] (onnxruntime-gpu) on a machine with CUDA, or use "
                "--device cpu.",
            )
        return [_CUDA, _CPU]
    if device == "auto":
        return [_CUDA, _CPU] if _CUDA in available else [_CPU]
    raise RuntimeFailure(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}.")


def _session_options(ort) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return options


class Session:
    """One ONNX Runtime inference session over a rewritten model."""

    def __init__(self, model: onnx.ModelProto, device: str) -> None:
        ort = import_runtime()
        self._ort = ort
        requested = providers_for(device)
        try:
            self._session = self._create(ort, model, requested)
        except RuntimeFailure:
            raise
        except Exception as error:  # onnxruntime raises its own unexported types
            raise RuntimeFailure(
                f"ONNX Runtime could not build a session: {_first_line(error)}"
            ) from error
        self.provider = self._session.get_providers()[0]
        if device == "cuda" and self.provider != _CUDA:
            raise RuntimeFailure(
                "the CUDA execution provider failed to load, and ONNX Runtime fell back "
                "to the CPU.",
                "Check the CUDA and cuDNN libraries that onnxruntime-gpu needs, or use "
                "--device cpu.",
            )
        log.debug("session on %s", self.provider)

    @staticmethod
    def _create(ort, model: onnx.ModelProto, providers: list[str]):
        options = _session_options(ort)
        if model.ByteSize() < _INLINE_LIMIT_BYTES:
            return ort.InferenceSession(
                model.SerializeToString(), options, providers=providers
            )
        with tempfile.TemporaryDirectory(prefix="onnxeps-") as folder:
            path = Path(folder) / "model.onnx"
            onnx.save_model(
                model, str(path), save_as_external_data=True, location="model.data"
            )
            return ort.InferenceSession(str(path), options, providers=providers)

    def run(self, output: str, feeds: dict[str, np.ndarray], timeout: float | None):
        """Run once and return the named output; stop the run after ``timeout`` s."""
        run_options = self._ort.RunOptions()
        run_options.log_severity_level = 4
        timer = None
        if timeout is not None and timeout < _MAX_TIMER_SECONDS:
            if timeout <= 0:
                raise ScoreTimeout("scoring timed out before the run started.")
            timer = threading.Timer(timeout, _terminate, args=(run_options,))
            timer.start()
        try:
            return self._session.run([output], feeds, run_options)[0]
        except Exception as error:  # onnxruntime raises its own unexported types
            if run_options.terminate:
                raise ScoreTimeout(f"the run timed out after {timeout:g} s.") from error
            raise RuntimeFailure(
                f"ONNX Runtime failed to run the model: {_first_line(error)}"
            ) from error
        finally:
            if timer is not None:
                timer.cancel()


def _terminate(run_options) -> None:
    run_options.terminate = True


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]
