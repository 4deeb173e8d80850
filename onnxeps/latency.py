"""Latency of an unmodified model under ONNX Runtime, and the models known to crash it.

The latency is the median wall time of ``InferenceSession.run`` (host-to-device copies
and all outputs included) over timed runs that follow untimed warm-up runs. Sessions use
ONNX Runtime's default graph optimisations, as a deployment would.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import onnx

from onnxeps.errors import RuntimeFailure, ScoreTimeout
from onnxeps.graphs import iter_graphs, node_label
from onnxeps.runtime import import_runtime, providers_for

__all__ = ["WARMUP_RUNS", "find_runtime_crashers", "open_session", "median_latency_ms"]

log = logging.getLogger(__name__)

WARMUP_RUNS = 3


def _training_bn_with_empty_outputs(node: onnx.NodeProto) -> bool:
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    training = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
    return training == 1 and any(name == "" for name in node.output[1:])


def find_runtime_crashers(model: onnx.ModelProto) -> list[str]:
    """Describe each node that is known to crash ONNX Runtime's process.

    BatchNormalization with training_mode=1 and an empty running_mean or running_var
    output ends ONNX Runtime with a segmentation fault in ``run()``: checked on 1.32.0
    for outputs ['Y', '', ''], ['Y', 'm', ''] and ['Y', '', 'v']. Such a model must
    never reach a session.
    """
    found = []
    for ref in iter_graphs(model):
        for node in ref.graph.node:
            if _training_bn_with_empty_outputs(node):
                found.append(
                    f"BatchNormalization '{node_label(node)}' has "
                    "training_mode=1 with an empty optional output, which crashes ONNX "
                    "Runtime 1.31-1.32 (segmentation fault)"
                )
    return found


def open_session(source: str | bytes, device: str):
    """Build an inference session over a model file path or serialised model bytes.

    A path lets ONNX Runtime read external data beside the file. Returns the session
    and the execution provider that runs it.
    """
    ort = import_runtime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(source, options, providers=providers_for(device))
    except RuntimeFailure:
        raise
    except Exception as error:  # onnxruntime raises its own unexported types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:500]
        raise RuntimeFailure(f"ONNX Runtime could not build a session: {first}") from error
    provider = session.get_providers()[0]
    if device == "cuda" and provider != "CUDAExecutionProvider":
        raise RuntimeFailure(
            "the CUDA execution provider failed to load, and ONNX Runtime fell back to "
            "the CPU; use --device cpu to measure CPU latency."
        )
    return session, provider


def _timed_run(session, feeds: dict[str, np.ndarray], run_options) -> float:
    started = time.perf_counter()
    session.run(None, feeds, run_options)
    return time.perf_counter() - started


def _run_with_deadline(
    ort, deadline: float | None
) -> tuple[object, Callable[[], None]]:
    """Return run options that stop a run at ``deadline`` (monotonic) and a cancel hook."""
    run_options = ort.RunOptions()
    if deadline is None:
        return run_options, lambda: None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ScoreTimeout("latency runs timed out before a run started.")

    def stop() -> None:
        run_options.terminate = True

    timer = threading.Timer(remaining, stop)
    timer.start()
    return run_options, timer.cancel


def median_latency_ms(
    session,
    feeds: dict[str, np.ndarray],
    runs: int,
    warmup: int = WARMUP_RUNS,
    timeout: float | None = None,
) -> float:
    """Run ``warmup`` untimed runs, then ``runs`` timed runs; return the median in ms.

    ``timeout`` limits all runs together, in seconds. Raises ScoreTimeout when it passes
    and RuntimeFailure when a run fails.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    ort = import_runtime()
    deadline = None if timeout is None else time.monotonic() + timeout
    timings = []
    for index in range(warmup + runs):
        run_options, cancel = _run_with_deadline(ort, deadline)
        try:
            seconds = _timed_run(session, feeds, run_options)
        except Exception as error:  # onnxruntime raises its own unexported types
            if run_options.terminate:
                message = f"latency runs timed out after {timeout:g} s."
                raise ScoreTimeout(message) from error
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:500]
            message = f"ONNX Runtime failed to run the model: {first}"
            raise RuntimeFailure(message) from error
        finally:
            cancel()
        if index >= warmup:
            timings.append(seconds)
    return 1000.0 * statistics.median(timings)
