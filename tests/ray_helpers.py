"""Module-level functions that the Ray engine tests run in Ray worker processes.

Ray workers import functions by module name, so these live outside the test module,
in a module that the workers find through PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_initializer_calls = 0


def square(value: int) -> int:
    return value * value


def count_initializer() -> None:
    global _initializer_calls
    _initializer_calls += 1


def initializer_calls(_item) -> tuple[int, int]:
    """Return this worker's process id and how often the initializer ran in it."""
    return os.getpid(), _initializer_calls


def start_time_after_sleep(seconds: float) -> float:
    """Sleep, then return the wall-clock time at which the call started."""
    started = time.time()
    time.sleep(seconds)
    return started


def exit_first_time(item: tuple[int, str | None]) -> int:
    """Return the value, but exit the process when the marker file does not exist yet.

    The exit creates the marker first, so a retry of the same item would return.
    """
    value, marker = item
    if marker is not None and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    return value


def touch_after_sleep(item: tuple[str, float]) -> str:
    """Create the file at ``item[0]`` after ``item[1]`` seconds, so a task cancelled in
    time leaves no file."""
    path, seconds = item
    time.sleep(seconds)
    Path(path).touch()
    return path
