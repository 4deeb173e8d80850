"""Score many models in worker processes, with the result cache.

A :class:`Job` names one model: a file, or a benchmark space and an encoding that the
worker builds. :func:`run_jobs` maps the jobs over worker processes (:func:`process_map`
here, or ``onnxeps.ray_engine.ray_map``) and yields one :class:`Outcome` per job as it
completes. Each worker imports ONNX Runtime once and lives for the whole run. A job
that fails comes back as a one-line error and never stops the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import forkserver
from typing import TypeVar

import onnx

from onnxeps.cache import (
    ResultCache,
    cache_key,
    default_cache_dir,
    input_identity,
    model_sha256,
)
from onnxeps.errors import OnnxepsError
from onnxeps.limits import AUTO, available_memory
from onnxeps.load import adopt_built_model
from onnxeps.runtime import import_runtime
from onnxeps.score import RECORD_KEYS, ScoreResult, score

__all__ = [
    "ENGINES",
    "Job",
    "Outcome",
    "ScoreFailure",
    "Task",
    "WorkerDied",
    "default_jobs",
    "error_line",
    "make_task",
    "process_map",
    "run_jobs",
    "score_many",
    "worker_threads",
]

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
T = TypeVar("T")
R = TypeVar("R")

# Pool restarts allowed in a row without one item completing. After that, every item
# not yet run is reported as not scored.
_MAX_CRASHES_IN_A_ROW = 3
# How often a worker checks that the process that started the pool still exists.
_PARENT_POLL_SECONDS = 1.0
_COST_KEYS = ("params", "macs")
# Modules that the fork server imports once, so that no worker imports them again. The
# server skips any that are not installed.
_WORKER_MODULES = [
    __name__,
    "onnxruntime",
    "onnxeps.bench",
    "onnxeps.converters.nb201",
    "onnxeps.converters.nb101",
    "onnxeps.converters.nlp",
]


class WorkerDied(OnnxepsError):
    """A worker process exited while it ran an item (a native crash or a kill)."""


class ScoreFailure(OnnxepsError):
    """A model of :func:`score_many` that could not be scored, named by ``model``."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


@dataclass(frozen=True)
class Job:
    """One model to score: a file, or a benchmark space and an encoding to build.

    ``label`` becomes the record's ``model``: the path as given, or ``SPACE:LABEL``.
    """

    label: str
    path: str | None = None
    space: str | None = None
    encoding: object = None

    @classmethod
    def file(cls, path: str | os.PathLike) -> Job:
        return cls(label=os.fspath(path), path=os.fspath(path))

    @classmethod
    def encoded(cls, label: str, space: str, encoding) -> Job:
        return cls(label=label, space=space, encoding=encoding)


@dataclass(frozen=True)
class Task:
    """Settings and data shared by every job of a run.

    ``options`` are the keyword arguments of :func:`onnxeps.score`. ``cache_dir`` is
    None when the cache is off. ``setup`` runs once in each worker process (for
    example to configure logging) and must be picklable.
    """

    inputs: object = None
    options: dict = field(default_factory=dict)
    cache_dir: str | None = None
    input_identity: dict | None = None
    setup: Callable[[], None] | None = None


@dataclass
class Outcome:
    """The result of one job: a record, or a one-line error.

    ``index`` is the job's position in the list given to :func:`run_jobs`.
    ``traceback`` is set for unexpected exceptions. ``cache_key`` is set when the
    record was scored in this run, so the caller may cache it.
    """

    label: str
    record: dict | None = None
    error: str | None = None
    traceback: str | None = None
    cached: bool = False
    cache_key: str | None = None
    index: int = -1


def default_jobs() -> int:
    """Return the number of CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def error_line(label: str, error: Exception) -> str:
    """Return the one-line message of a model that could not be scored."""
    text = str(error)
    if isinstance(error, OnnxepsError):
        return text if text.startswith(label) else f"{label}: {text}"
    return (
        f"{label}: internal error ({type(error).__name__}: {text}); rerun with -vv for "
        "the traceback"
    )


def make_task(inputs, options: dict, *, cache: bool, setup=None) -> Task:
    """Return the task of a run, with the cache off when the input batch cannot be read."""
    if not cache:
        return Task(inputs, options, setup=setup)
    try:
        identity = input_identity(inputs)
    except OSError as error:
        log.debug("result cache off: cannot read the input %s (%s)", inputs, error)
        return Task(inputs, options, setup=setup)
    return Task(inputs, options, str(default_cache_dir()), identity, setup)


# ----- inside a worker -----

_task: Task | None = None


def start_worker(task: Task) -> None:
    """Keep the run's task in this process, run its setup and import ONNX Runtime."""
    global _task
    _task = task
    if task.setup is not None:
        task.setup()
    try:
        import_runtime()
    except OnnxepsError as error:
        log.debug("worker %d: %s", os.getpid(), error)  # each job reports it


def run_job(job: Job) -> Outcome:
    """Score one job in this worker, turning any exception into the outcome's error."""
    try:
        return _score_job(job, _task)
    except Exception as error:  # one failing model must not stop the others
        details = None if isinstance(error, OnnxepsError) else traceback.format_exc()
        return Outcome(job.label, error=error_line(job.label, error), traceback=details)


def _model_of(job: Job, task: Task) -> str | onnx.ModelProto:
    if job.space is None:
        return job.path
    from onnxeps.bench import build_encoded

    return build_encoded(job.space, job.encoding, task.options)


def _key_of(job: Job, model, task: Task) -> tuple[str, str] | None:
    """Return the job's cache key and the model hash it was made from, or None when the
    cache is off or the model unreadable."""
    if task.cache_dir is None:
        return None
    if job.space is not None:
        sha = hashlib.sha256(model.SerializeToString()).hexdigest()
        return cache_key("bench", sha, task.options, task.input_identity), sha
    try:
        sha = model_sha256(model)
    except OSError as error:  # scoring reports the missing or unreadable file
        log.debug("%s: not looked up in the result cache: %s", job.label, error)
        return None
    return cache_key("score", sha, task.options, task.input_identity), sha


def _required_keys(job: Job) -> tuple[str, ...]:
    return RECORD_KEYS if job.space is None else RECORD_KEYS + _COST_KEYS


def _score_built(model: onnx.ModelProto, sha: str | None, task: Task) -> dict:
    """Score a model built from an encoding and add the cost columns to its record."""
    from onnxeps.bench import macs_per_sample

    # Scoring rewrites the built model in place, so its MACs are counted first.
    macs = macs_per_sample(model)
    result = score(adopt_built_model(model, sha), task.inputs, **task.options)
    return result.record() | {"params": result.parameters, "macs": macs}


def _score_job(job: Job, task: Task) -> Outcome:
    model = _model_of(job, task)
    key, sha = _key_of(job, model, task) or (None, None)
    if key is not None:
        stored = ResultCache(task.cache_dir).load(key, _required_keys(job))
        if stored is not None and stored["sha256"] == sha:
            return Outcome(job.label, record=stored | {"model": job.label}, cached=True)
    if job.space is None:
        record = score(model, task.inputs, **task.options).record()
    else:
        record = _score_built(model, sha, task)
    record |= {"model": job.label}
    # A file replaced between hashing and scoring must not be cached under the old hash.
    keep = key if record["sha256"] == sha else None
    return Outcome(job.label, record=record, cache_key=keep)


# ----- mapping over workers -----


def _map_in_process(function, items, initializer) -> Iterator[tuple[int, R]]:
    if initializer is not None:
        initializer()
    for index, item in enumerate(items):
        yield index, function(item)


def _start_pool_worker(initializer, parent: int) -> None:
    # The parent stops the workers on Ctrl-C, so a worker never dies of it mid-item.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if initializer is not None:
        initializer()


def _exit_with_parent(parent: int) -> None:
    """End this worker once the process that started the pool is gone (killed by a
    signal it cannot handle), so that no worker outlives its run."""
    while True:
        time.sleep(_PARENT_POLL_SECONDS)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid now belongs to another user's process
            os._exit(1)


def _raise_terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _new_executor(workers: int, initializer) -> ProcessPoolExecutor:
    """Start a pool whose workers fork from a server that imported this module once.

    NOTE: the workers see the environment variables and ``sys.path`` of the moment the
    server started (the first pool of this process), not later changes.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_WORKER_MODULES)
        _start_fork_server()
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_pool_worker,
        initargs=(initializer, os.getpid()),
    )  # fmt: skip


def _start_fork_server() -> None:
    """Start the fork server, if it is not running, without the current folder on its
    module path.

    The server runs ``python -c``, which puts the current folder first on ``sys.path``,
    and Python 3.11 imports the preloaded modules there before it applies this
    process's path. Started in a source checkout, the server would import the
    ``onnxeps`` folder of the checkout instead of the installed package, and every
    worker would fail. PYTHONSAFEPATH (Python 3.11 and later) keeps the folder off.
    """
    previous = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONSAFEPATH"]
        else:
            os.environ["PYTHONSAFEPATH"] = previous


def _terminate(executor: ProcessPoolExecutor) -> None:
    # NOTE: Python 3.14 adds ProcessPoolExecutor.terminate_workers(). Before it, the
    # worker processes are reachable only through the private _processes map.
    for process in list((executor._processes or {}).values()):
        process.terminate()
    executor.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _terminate_as_exit():
    """Turn SIGTERM into SystemExit while a pool runs, so that the pool is stopped as on
    Ctrl-C instead of leaving its workers behind (only the main thread can do this)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _PoolMap:
    """Map items over a process pool and recover from workers that die.

    At most ``workers`` items are in flight. When a worker dies, the pool breaks and
    every item in flight is lost. A lone lost item is the one that killed it. Several
    lost items are rerun one at a time in a new pool, so the next break names it.
    """

    def __init__(self, function, items: list, workers: int, initializer) -> None:
        self.function = function
        self.items = items
        self.workers = workers
        self.initializer = initializer
        self.waiting = deque(range(len(items)))
        self.suspects: deque[int] = deque()
        self.crashes_in_a_row = 0

    def results(self) -> Iterator[tuple[int, object]]:
        with _terminate_as_exit():
            yield from self._results()

    def _results(self) -> Iterator[tuple[int, object]]:
        while self.waiting or self.suspects:
            if self.crashes_in_a_row >= _MAX_CRASHES_IN_A_ROW:
                yield from self._abandon()
                return
            executor = _new_executor(self.workers, self.initializer)
            try:
                yield from self._drain(executor)
            except BaseException:  # Ctrl-C, or the consumer stopped early
                _terminate(executor)
                raise
            executor.shutdown(wait=True)

    def _submit_more(self, executor, running: dict[Future, int]) -> None:
        if self.suspects:
            if not running:
                index = self.suspects.popleft()
                running[executor.submit(self.function, self.items[index])] = index
            return
        while self.waiting and len(running) < self.workers:
            index = self.waiting.popleft()
            running[executor.submit(self.function, self.items[index])] = index

    def _drain(self, executor) -> Iterator[tuple[int, object]]:
        """Yield results until every item ran or the pool broke."""
        running: dict[Future, int] = {}
        while True:
            self._submit_more(executor, running)
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                yield from self._recover(running)
                return
            for future in done:
                self.crashes_in_a_row = 0
                yield running.pop(future), future.result()

    def _recover(self, running: dict[Future, int]) -> Iterator[tuple[int, object]]:
        wait(running)
        lost = []
        for future, index in running.items():
            if isinstance(future.exception(), BrokenProcessPool):
                lost.append(index)
            else:
                yield index, future.result()
        self.crashes_in_a_row += 1
        log.warning(
            "a worker process exited unexpectedly (%d item(s) in flight); restarting "
            "the pool", len(lost),
        )  # fmt: skip
        if len(lost) == 1:
            yield lost[0], WorkerDied(
                "the worker process exited while scoring it (a crash in native code, "
                "or a kill by the out-of-memory killer).",
                "Score it alone with -vv to see where it fails.",
            )
        else:
            self.suspects.extend(sorted(lost))

    def _abandon(self) -> Iterator[tuple[int, object]]:
        remaining = [*self.suspects, *self.waiting]
        self.suspects.clear()
        self.waiting.clear()
        for index in remaining:
            yield index, WorkerDied(
                f"not scored: worker processes exited {self.crashes_in_a_row} times "
                "in a row, so the run stopped.",
                "Check the memory limit, or lower --jobs.",
            )


def process_map(
    function: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    address: str | None = None,
    initializer: Callable[[], None] | None = None,
) -> Iterator[tuple[int, R | WorkerDied]]:
    """Yield (index of the item, function(item)) as results complete.

    ``workers`` processes each run ``initializer`` once and live for the whole map.
    With one worker or one item, everything runs in this process, in order.
    ``function`` and ``initializer`` must be picklable (module-level or partials of
    them). An item whose worker process died yields a :class:`WorkerDied` in place of
    its result; an exception raised by ``function`` propagates. ``address`` exists for
    the signature of ``ray_map`` and must be None.
    """
    if address is not None:
        raise ValueError(f"the local engine takes no address, got {address!r}")
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return _map_in_process(function, items, initializer)
    return _PoolMap(function, items, workers, initializer).results()


def _mapper(engine: str):
    if engine == "local":
        return process_map
    if engine == "ray":
        from onnxeps.ray_engine import ray_map

        return ray_map
    raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")


def worker_threads(engine: str, workers: int | None) -> int | None:
    """Return the ONNX Runtime intra-op threads of one worker, so workers share the cores.

    None keeps the runtime's default of one thread per physical core.
    """
    if engine == "ray":
        return 1  # ray_map runs each item as a task of one CPU
    if workers == 1:
        return None
    return max(1, default_jobs() // workers)


def _share_machine(task: Task, engine: str, workers: int | None) -> Task:
    """Share the cores, and on this machine the memory, among the workers."""
    options = dict(task.options)
    if options.get("threads") is None:
        options["threads"] = worker_threads(engine, workers)
    if engine == "local" and workers > 1 and options.get("memory_limit", AUTO) == AUTO:
        available = available_memory()
        options["memory_limit"] = None if available is None else available // workers
    return dataclasses.replace(task, options=options)


def run_jobs(
    jobs: Sequence[Job],
    task: Task,
    *,
    workers: int | None,
    engine: str = "local",
    address: str | None = None,
) -> Iterator[Outcome]:
    """Score the jobs on ``workers`` workers and yield each outcome as it completes.

    ``workers`` None means one per CPU core here, or with the Ray engine one per CPU
    of the cluster. With one local worker the jobs run in this process, in order.
    Unless the task sets ``threads``, each worker's ONNX Runtime gets
    :func:`worker_threads` threads.
    Records scored in this run are written to the cache here, in the calling process;
    workers only read it.
    """
    if workers is None and engine == "local":
        workers = default_jobs()
    if workers is not None:
        workers = max(1, min(workers, len(jobs)))
    task = _share_machine(task, engine, workers)
    cache = ResultCache(task.cache_dir) if task.cache_dir is not None else None
    hits = 0
    results = _mapper(engine)(
        run_job, jobs, workers=workers, address=address,
        initializer=partial(start_worker, task),
    )  # fmt: skip
    for index, outcome in results:
        if isinstance(outcome, BaseException):
            outcome = Outcome(jobs[index].label, error=error_line(jobs[index].label, outcome))
        outcome.index = index
        hits += outcome.cached
        if cache is not None and outcome.cache_key is not None and outcome.record:
            cache.store(outcome.cache_key, outcome.record)
        yield outcome
    if cache is not None:
        log.info("%d of %d results came from the cache in %s", hits, len(jobs), cache.folder)


def score_many(
    models: Sequence[str | os.PathLike],
    inputs=None,
    *,
    jobs: int | None = None,
    cache: bool = True,
    engine: str = "local",
    address: str | None = None,
    **score_options,
) -> Iterator[ScoreResult | ScoreFailure]:
    """Score model files in parallel and yield each result as it completes.

    ``jobs`` worker processes (default: one per CPU core, or per CPU of the Ray
    cluster) score the models with
    ``inputs`` and ``score_options`` as :func:`onnxeps.score` takes them. Each worker
    receives ``inputs`` once. A model that cannot be scored yields a
    :class:`ScoreFailure` naming it. ``cache`` reads and writes the result cache
    (see :mod:`onnxeps.cache`). ``engine`` "ray" runs on a Ray cluster at ``address``.
    Worker processes start as :mod:`multiprocessing` starts them, so a script must
    call this under ``if __name__ == "__main__":``.
    """
    job_list = [Job.file(model) for model in models]
    task = make_task(inputs, score_options, cache=cache)
    for outcome in run_jobs(job_list, task, workers=jobs, engine=engine, address=address):
        if outcome.error is not None:
            yield ScoreFailure(outcome.label, outcome.error)
        else:
            record = outcome.record
            yield ScoreResult(**(record | {"weights": tuple(record["weights"])}))
