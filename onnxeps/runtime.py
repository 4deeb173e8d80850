"""ONNX Runtime sessions: provider choice, session creation and timed runs."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
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
# Waiting on a condition overflows on huge intervals; longer limits mean no limit.
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


# Graph optimisation levels by name. The one-channel graphs of the collapse run about
# as fast without optimisation, which saves a third of the session's start-up.
_LEVELS = {"all": "ORT_ENABLE_ALL", "none": "ORT_DISABLE_ALL"}


def _session_options(ort, level: str, threads: int | None) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


class Session:
    """One ONNX Runtime inference session over a rewritten model."""

    def __init__(
        self,
        model: onnx.ModelProto,
        device: str,
        level: str = "all",
        threads: int | None = None,
    ) -> None:
        """``level`` names the graph optimisation level ("all" or "none");
        ``threads`` sets ONNX Runtime's intra-op threads (None: one per core)."""
        ort = import_runtime()
        self._ort = ort
        requested = providers_for(device)
        options = _session_options(ort, level, threads)
        try:
            self._session = self._create(ort, model, requested, options)
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
    def _create(ort, model: onnx.ModelProto, providers: list[str], options):
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
        limited = timeout is not None and timeout < _MAX_TIMER_SECONDS
        if limited:
            if timeout <= 0:
                raise ScoreTimeout("scoring timed out before the run started.")
            _WATCHDOG.watch(run_options, timeout)
        try:
            return self._session.run([output], feeds, run_options)[0]
        except Exception as error:  # onnxruntime raises its own unexported types
            if run_options.terminate:
                raise ScoreTimeout(f"the run timed out after {timeout:g} s.") from error
            raise RuntimeFailure(
                f"ONNX Runtime failed to run the model: {_first_line(error)}"
            ) from error
        finally:
            if limited:
                _WATCHDOG.release(run_options)


class _Watchdog:
    """A daemon thread, one per process, that terminates runs past their deadline.

    Starting a timer thread per run costs about a millisecond (measured), and scoring
    runs twice per model. So the thread is started once and reused.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._deadlines: dict[int, tuple[float, Any]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, run_options, seconds: float) -> None:
        with self._lock:
            self._deadlines[id(run_options)] = (time.monotonic() + seconds, run_options)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="onnxeps-timeout", daemon=True)
                self._thread.start()
            self._lock.notify()

    def release(self, run_options) -> None:
        with self._lock:
            self._deadlines.pop(id(run_options), None)

    def _loop(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for key, (deadline, run_options) in list(self._deadlines.items()):
                    if deadline <= now:
                        run_options.terminate = True
                        del self._deadlines[key]
                upcoming = [deadline for deadline, _ in self._deadlines.values()]
                self._lock.wait(min(upcoming) - now if upcoming else None)


_WATCHDOG = _Watchdog()


def _new_watchdog() -> None:
    """Give a forked child its own watchdog: the parent's thread does not exist there."""
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


os.register_at_fork(after_in_child=_new_watchdog)


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]
