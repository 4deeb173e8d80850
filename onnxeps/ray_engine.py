"""Map a function over items on Ray and stream the results as tasks finish.

:func:`ray_map` is the Ray counterpart of :func:`onnxeps.engine.process_map`. Each item
runs as one Ray task of one CPU. The function and the initializer go to the object store
once per run, and each worker process runs the initializer before its first item of the
run. At most two tasks per worker are in flight, so results stream and the driver's
memory stays flat on long item lists. Worker output stays in Ray's session logs
because stdout carries the records.
"""

from __future__ import annotations

import itertools
import logging
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from onnxeps.errors import OnnxepsError

__all__ = ["RayConnectionError", "RayNotInstalledError", "WorkerLost", "ray_map"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Tasks in flight per worker: the second keeps a worker busy while the driver handles
# the result of the first.
TASKS_PER_WORKER = 2

# Seconds to wait for a TCP connection to a cluster address before giving up.
CONNECT_TIMEOUT_S = 5.0

# Ray errors that mean the process or node running a task is gone, with their cause.
_LOSS_CAUSES = {
    "WorkerCrashedError": "the worker process exited (a native crash, or a kill)",
    "OutOfMemoryError": "Ray's memory monitor killed the worker (node memory ran low)",
    "NodeDiedError": "the node running the task died or became unreachable",
    "LocalRayletDiedError": "the raylet of the node running the task died",
    "ObjectLostError": "the result was lost with the node that stored it",
}

# No dashboard, and worker output stays out of the driver's stdout, which has records.
_INIT_OPTIONS = {
    "include_dashboard": False,
    "log_to_driver": False,
    "logging_level": logging.WARNING,
}

_ADDRESS_HINT = (
    "Check that the cluster is running and give the head node as HOST:PORT "
    "(the GCS port, 6379 by default) or ray://HOST:10001."
)


class RayNotInstalledError(OnnxepsError):
    """The ray package is missing."""


class RayConnectionError(OnnxepsError):
    """A Ray cluster address is invalid or cannot be reached."""


class WorkerLost(OnnxepsError):
    """The outcome of an item whose Ray worker process or node died while running it."""


def ray_map(
    function: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int | None = None,
    address: str | None = None,
    initializer: Callable[[], None] | None = None,
) -> Iterator[tuple[int, R | WorkerLost]]:
    """Yield (index, function(item)) for each item, in completion order, on Ray.

    ``function`` and ``initializer`` must be picklable (module-level functions or
    partials of them), and the Ray workers must be able to import them. Items are drawn
    from ``items`` lazily, ``TASKS_PER_WORKER * workers`` in flight at most.
    ``workers=None`` means every CPU that Ray reports.

    With ``address=None`` a local Ray instance of ``workers`` CPUs starts and stops at
    the end. An address (``HOST:PORT``, ``ray://HOST:PORT``, ``auto``) connects to an
    existing cluster and disconnects at the end, leaving it running. When Ray is already
    initialised in this process, that instance is used and ``address`` is ignored. On an
    existing cluster or instance, ``workers`` only sets how many tasks are in flight,
    and Ray runs as many of them at once as it has free CPUs.

    An item whose worker process or node died yields a :class:`WorkerLost` and is not
    retried. An exception raised by ``function`` propagates. When the caller stops
    early (Ctrl-C, ``close()``), outstanding tasks are cancelled.
    """
    if workers is not None and workers < 1:
        raise OnnxepsError(f"invalid worker count {workers}: give 1 or more.")
    ray = _import_ray()
    initialised_here = _initialise(ray, workers, address)
    try:
        in_flight = TASKS_PER_WORKER * (workers or _cluster_cpus(ray))
        yield from _stream(ray, function, items, initializer, in_flight)
    finally:
        if initialised_here:
            ray.shutdown()


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise RayNotInstalledError(
            f"the Ray engine needs the ray package, which failed to import ({error}).",
            "Install it with: pip install 'onnxeps[ray]'",
        ) from error
    return ray


def _initialise(ray, workers: int | None, address: str | None) -> bool:
    """Start or connect to Ray unless it is initialised, and return whether it did."""
    if ray.is_initialized():
        log.debug("using the Ray instance already initialised in this process")
        return False
    if address is None:
        ray.init(num_cpus=workers, **_INIT_OPTIONS)
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, **_INIT_OPTIONS)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise _connection_error(address, error) from error
    return True


def _connection_error(address: str, error: Exception) -> RayConnectionError:
    # Ray 2.60.0 reports a rejected token as a ConnectionError whose cause's text, a
    # formatted traceback, names InvalidAuthToken.
    if "InvalidAuthToken" in str(error.__cause__):
        return RayConnectionError(
            f"the Ray cluster at {address} rejected the connection because the "
            "authentication token is missing or incorrect.",
            "Set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, to the cluster's token.",
        )
    text = " ".join(str(error).split())
    return RayConnectionError(
        f"failed to connect to the Ray cluster at {address}: {text}.", _ADDRESS_HINT
    )


def _check_reachable(address: str) -> None:
    """Raise RayConnectionError when the TCP port of a HOST:PORT address is closed.

    ray.init (Ray 2.60.0) still retried a closed GCS port after three minutes in a test,
    so a closed port is reported here at once. Other address forms are left to Ray.
    """
    host, separator, port = address.removeprefix("ray://").rpartition(":")
    if not separator or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        raise RayConnectionError(
            f"failed to reach the Ray cluster at {address}: {error}.", _ADDRESS_HINT
        ) from error


def _cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 0)))


def _stream(
    ray, function, items: Iterable, initializer, in_flight: int
) -> Iterator[tuple[int, object]]:
    """Submit items as earlier ones finish, and yield (index, outcome) of each."""
    run_id = uuid.uuid4().hex
    # Ray resolves an object reference given as a task argument, but not one inside a
    # list, so each worker fetches the setup only when it starts the run.
    setup = [ray.put((function, initializer))]
    remote_item = ray.remote(max_retries=0)(_run_item)
    numbered = enumerate(items)
    pending: dict = {}
    log.info("Ray: at most %d tasks in flight", in_flight)
    try:
        while True:
            for index, item in itertools.islice(numbered, in_flight - len(pending)):
                pending[remote_item.remote(run_id, setup, item)] = index
            if not pending:
                return
            [ref], _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(ref), _outcome(ray, ref)
    finally:
        _cancel(ray, pending)


def _outcome(ray, ref):
    """Return the task's result, or a WorkerLost when its process or node died."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        cause = _LOSS_CAUSES.get(type(error).__name__)
        if cause is None:
            raise
        return WorkerLost(
            f"the Ray task running it failed: {cause} ({type(error).__name__}). It was "
            "not retried. Run it alone with --engine local -vv to see where it fails."
        )


def _cancel(ray, pending: dict) -> None:
    if not pending:
        return
    log.info("Ray: cancelling %d outstanding tasks", len(pending))
    for ref in pending:
        ray.cancel(ref, force=True)


# ----- inside a Ray worker process -----

# The id and function of the run this worker process last set up. A worker that
# switches between two interleaved runs sets the new run up again, initializer included.
_active_run: tuple[str, Callable] | None = None


def _run_item(run_id: str, setup: list, item):
    """Run the initializer on this worker's first item of the run, then the function."""
    global _active_run
    if _active_run is None or _active_run[0] != run_id:
        import ray

        function, initializer = ray.get(setup[0])
        if initializer is not None:
            initializer()
        _active_run = (run_id, function)
    return _active_run[1](item)
