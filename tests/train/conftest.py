"""Fixtures of the trainer tests: the subprocess environment, and the background ``driver.py`` run.

The ``loop.train`` runs that several tests compare (driver.py) start in a background process as soon as the session
has a test that needs them, so that they compile and train on the second core while the in-process tests compile
theirs; the tests that need them wait for them (fixture ``driver_runs``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DRIVER = pathlib.Path(__file__).with_name("driver.py")
# A guard against a hang, not a time budget: a heavily shared machine can be several times slower than 2 idle cores.
DRIVER_TIMEOUT_S = 2400
# Fake CPU devices of every single-machine subprocess: the same everywhere, so that they share compiled steps.
SUBPROCESS_DEVICES = 8


def subprocess_env(cache_dir: pathlib.Path | None, *, devices: int = SUBPROCESS_DEVICES, **extra) -> dict[str, str]:
    """Environment of a JAX subprocess: CPU only, ``devices`` fake devices, XLA's fastest compile, and (with
    ``cache_dir``) a persistent compilation cache that every subprocess with the same flags shares."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_backend_optimization_level=0 --xla_force_host_platform_device_count={devices}")
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("compile_cache")


@dataclasses.dataclass
class DriverRuns:
    """The background driver process (None when reusing a finished run) and, once it is done, its results."""

    out: pathlib.Path
    process: subprocess.Popen | None
    log: pathlib.Path
    started: float
    results: dict | None = None

    def wait(self) -> DriverRuns:
        if self.results is None and self.process is not None:
            try:
                self.process.wait(timeout=max(1.0, DRIVER_TIMEOUT_S - (time.monotonic() - self.started)))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"driver.py ran for more than {DRIVER_TIMEOUT_S} s:\n{self.output()[-4000:]}")
            if self.process.returncode != 0 or not (self.out / "results.json").exists():
                pytest.fail(f"driver.py failed ({self.process.returncode}):\n{self.output()[-6000:]}")
        if self.results is None:
            self.results = json.loads((self.out / "results.json").read_text())
        return self

    def wait_for_reference(self) -> DriverRuns:
        """Waits until run B is complete (its checkpoints written, its compiled step in the persistent cache)."""
        deadline = self.started + DRIVER_TIMEOUT_S
        while self.process is not None and "driver: compiled" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                return self.wait()  # fails with the driver's output unless it finished
            time.sleep(0.5)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def summary(self, name: str) -> dict:
        """The summary of run ``name``; fails the test with the run's error when it raised."""
        run = self.results[name]
        assert "summary" in run, f"run {name} raised {run.get('error')}: {run.get('traceback')}"
        return run["summary"]


_DRIVER: dict = {}
# Set to the output directory of a finished ``driver.py runs OUT`` to reuse it instead of running the driver again
# (when iterating on the tests that read it).
REUSE_ENV = "LZN_TRAIN_TESTS_DRIVER_OUT"


def _start_driver(tmp_path_factory, cache_dir: pathlib.Path) -> DriverRuns:
    reuse = os.environ.get(REUSE_ENV)
    if reuse and "runs" not in _DRIVER:
        out = pathlib.Path(reuse)
        _DRIVER["runs"] = DriverRuns(out, None, out / "driver.log", time.monotonic())
    if "runs" not in _DRIVER:
        out = tmp_path_factory.mktemp("driver")
        log = out / "driver.log"
        with open(log, "w") as handle:
            process = subprocess.Popen([sys.executable, str(DRIVER), "runs", str(out)], env=subprocess_env(cache_dir),
                                       stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        _DRIVER["runs"] = DriverRuns(out, process, log, time.monotonic())
    return _DRIVER["runs"]


DRIVER_FIXTURES = ("driver_reference", "driver_runs")


def _uses(item, names) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in names)


def pytest_collection_modifyitems(session, config, items):
    """Orders this folder's tests (a stable reordering inside the folder only): first those that need neither the
    driver nor a multi-process training run, so that the background driver trains while they compile; then those
    that need only the driver's first run, then those that wait for all of it; last the multi-process training, which
    then does not compete with the driver for the cores (two JAX processes must reach their first collective within
    30 s of each other, or gloo gives up)."""
    here = pathlib.Path(__file__).parent
    positions = [i for i, item in enumerate(items) if here in pathlib.Path(str(item.fspath)).parents]

    def group(item) -> int:
        if item.get_closest_marker("multiprocess") is not None and item.get_closest_marker("slow") is not None:
            return 3
        if _uses(item, ("driver_runs",)):
            return 2
        return 1 if _uses(item, ("driver_reference",)) else 0

    reordered = sorted((items[i] for i in positions), key=group)
    for position, item in zip(positions, reordered):
        items[position] = item


@pytest.fixture(scope="session", autouse=True)
def _driver_in_background(request, tmp_path_factory, compile_cache):
    """Starts driver.py at the beginning of the session when a selected test uses ``driver_runs`` or
    ``driver_reference``; stops it at the end if it is still running (a test failed before waiting for it)."""
    if any(_uses(item, DRIVER_FIXTURES) for item in request.session.items):
        _start_driver(tmp_path_factory, compile_cache)
    yield
    runs = _DRIVER.get("runs")
    if runs is not None and runs.process is not None and runs.process.poll() is None:
        runs.process.kill()
        runs.process.wait()


@pytest.fixture(scope="session")
def driver_runs(tmp_path_factory, compile_cache) -> DriverRuns:
    """The finished driver.py runs (started in the background at the beginning of the session)."""
    return _start_driver(tmp_path_factory, compile_cache).wait()


@pytest.fixture(scope="session")
def driver_reference(tmp_path_factory, compile_cache) -> DriverRuns:
    """The driver once its first run (B, the uninterrupted reference) is complete; the others may still be going."""
    return _start_driver(tmp_path_factory, compile_cache).wait_for_reference()
