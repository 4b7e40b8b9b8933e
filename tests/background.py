"""Background jobs of a test session: slow subprocess work that starts when the session starts and runs beside the
in-process tests.

The in-process tests keep about one of the two cores busy (tracing and compiling are single-threaded); the jobs
(every config's and every experiment's smoke training, the trainer tests' reference runs, ...) fill the other.
A test module registers a job with the fixtures that wait for it (:func:`register`). After collection the session
(tests/conftest.py) starts every job a selected test needs and moves the tests that wait for one after all the
others, so that the jobs have the whole session to run in.

Each job runs in a thread of the pytest process. Its subprocesses (:func:`run`) run at a lower priority, so the
in-process tests keep the cores when they need both, and at most :data:`LANES` at a time, the jobs of the lowest
``priority`` first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import os
import pathlib
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

# Subprocesses of all jobs running at once: one per core of a 2-core machine.
LANES = max(1, min(2, os.cpu_count() or 1))
# Their niceness: the in-process tests, which the session waits for in order, come first.
NICENESS = 10

_lock = threading.Lock()
_running: set[subprocess.Popen] = set()


class _Lanes:
    """A counting semaphore whose waiters are served by priority (lowest first), then in arrival order, so that the
    longest chains of work get the cores first."""

    def __init__(self, count: int):
        self._free = count
        self._waiting: list[tuple[int, int]] = []
        self._arrivals = itertools.count()
        self._condition = threading.Condition()

    @contextlib.contextmanager
    def held(self, priority: int):
        ticket = (priority, next(self._arrivals))
        with self._condition:
            heapq.heappush(self._waiting, ticket)
            self._condition.wait_for(lambda: self._free > 0 and self._waiting[0] == ticket)
            heapq.heappop(self._waiting)
            self._free -= 1
            self._condition.notify_all()  # the next in line may also find a free lane
        try:
            yield
        finally:
            with self._condition:
                self._free += 1
                self._condition.notify_all()


_lanes = _Lanes(LANES)
_priority = threading.local()  # the priority of the job whose thread this is


@dataclasses.dataclass
class Job:
    """A registered job: ``body(directory)`` returns its result; ``fixtures`` are the fixtures that wait for it."""

    name: str
    fixtures: tuple[str, ...]
    body: Callable[[pathlib.Path], Any]
    priority: int
    thread: threading.Thread | None = None
    result: Any = None
    error: BaseException | None = None


_jobs: dict[str, Job] = {}
_base: list[pathlib.Path] = []


def register(name: str, fixtures: Sequence[str], body: Callable[[pathlib.Path], Any], *, priority: int = 0) -> None:
    """Registers job ``name`` (once: a module imported twice does not register it again). Jobs start in the order
    of their ``priority`` (lowest first), and their subprocesses queue for the lanes in that order: the longest
    chains go first."""
    _jobs.setdefault(name, Job(name, tuple(fixtures), body, priority))


def waits_for_a_job(item: pytest.Item) -> bool:
    """Whether a test uses a fixture that waits for a registered job."""
    names = set(getattr(item, "fixturenames", ()))
    return any(names & set(job.fixtures) for job in _jobs.values())


def set_base(directory: pathlib.Path) -> None:
    """Where the jobs' directories go (``<base>/<job name>``); set once per session."""
    if not _base:
        _base.append(directory)


def directory(name: str) -> pathlib.Path:
    """Job ``name``'s own directory (created on first use)."""
    if not _base:
        raise RuntimeError("background.set_base was not called: tests/conftest.py sets it at the session's start")
    path = _base[0] / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_needed(items: Sequence[pytest.Item]) -> list[str]:
    """Starts every job that one of ``items`` waits for; returns their names."""
    used = set().union(*(set(getattr(item, "fixturenames", ())) for item in items)) if items else set()
    needed = sorted((job for job in _jobs.values() if used & set(job.fixtures)), key=lambda job: job.priority)
    names = [job.name for job in needed]
    for name in names:
        start(name)
    return names


def start(name: str) -> None:
    """Starts job ``name`` in a thread unless it has started already."""
    job = _jobs[name]
    with _lock:
        if job.thread is not None:
            return

        def target():
            _priority.value = job.priority
            try:
                job.result = job.body(directory(name))
            except BaseException as error:  # handed to the test that waits for the job
                job.error = error

        job.thread = threading.Thread(target=target, name=f"background-{name}", daemon=True)
        job.thread.start()


def is_running(name: str) -> bool:
    job = _jobs[name]
    return job.thread is not None and job.thread.is_alive()


def wait(name: str, timeout: float = 3600.0) -> Any:
    """Job ``name``'s result, starting the job if it has not started; fails the test if the job raised or ran out of
    ``timeout`` seconds (a guard against a hang, not a time budget)."""
    start(name)
    job = _jobs[name]
    job.thread.join(timeout)
    if job.thread.is_alive():
        pytest.fail(f"background job {name} did not finish within {timeout:.0f} s")
    if job.error is not None:
        raise job.error
    return job.result


def run(command: Sequence[str], *, timeout: float, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a job: in a lane, at lower priority, killed at ``timeout`` seconds or at the end of
    the session. ``stdout``/``stderr`` as for Popen (PIPE: captured as text in the result)."""
    with _lanes.held(getattr(_priority, "value", 0)):
        process = subprocess.Popen(list(command), stdout=stdout, stderr=stderr, text=True, **kwargs)
        # (Not preexec_fn, which is unsafe in a threaded process; the process is in its first milliseconds here.)
        os.setpriority(os.PRIO_PROCESS, process.pid, NICENESS)
        with _lock:
            _running.add(process)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            err = f"{err or ''}\nkilled after {timeout:.0f} s"
        finally:
            with _lock:
                _running.discard(process)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def stop_all() -> None:
    """Kills every job subprocess still running (the session ends; a test failed before waiting for its job)."""
    with _lock:
        processes = list(_running)
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
