"""Fixtures of the trainer tests: the subprocess environment, and the background ``driver.py`` run.

The ``loop.train`` runs that several tests compare (driver.py) are a background job of the session
(tests/background.py): they compile and train on the second core while the in-process tests compile theirs; the
tests that need them wait for them (fixtures ``driver_reference`` and ``driver_runs``).
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

from tests import background

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


def compile_cache_dir() -> pathlib.Path:
    """The persistent compilation cache that driver.py and the subprocess tests of this folder share."""
    return background.directory("train_compile_cache")


# Set to the output directory of a finished ``driver.py runs OUT`` to reuse it instead of running the driver again
# (when iterating on the tests that read it).
REUSE_ENV = "LZN_TRAIN_TESTS_DRIVER_OUT"
DRIVER_JOB = "train_driver"


def driver_out() -> pathlib.Path:
    reuse = os.environ.get(REUSE_ENV)
    return pathlib.Path(reuse) if reuse else background.directory(DRIVER_JOB)


def _run_driver(out: pathlib.Path) -> None:
    """The background job: ``driver.py runs OUT`` (tests/background.py), its output in ``OUT/driver.log``."""
    if os.environ.get(REUSE_ENV):
        return
    with open(out / "driver.log", "w") as log:
        process = background.run([sys.executable, str(DRIVER), "runs", str(out)],
                                 env=subprocess_env(compile_cache_dir()), stdout=log, stderr=subprocess.STDOUT,
                                 cwd=REPO, timeout=DRIVER_TIMEOUT_S)
    if process.returncode != 0 or not (out / "results.json").exists():
        log = (out / "driver.log").read_text(errors="replace")
        pytest.fail(f"driver.py failed ({process.returncode}):\n{log[-6000:]}")


# The driver trains the runs that several tests compare; it starts with the session, beside the in-process tests.
background.register(DRIVER_JOB, ("driver_reference", "driver_runs"), _run_driver, priority=2)


@dataclasses.dataclass
class DriverRuns:
    """The driver's output directory and, once it is done, its results."""

    out: pathlib.Path
    results: dict | None = None

    def wait(self) -> DriverRuns:
        background.wait(DRIVER_JOB, timeout=DRIVER_TIMEOUT_S)
        if self.results is None:
            self.results = json.loads((self.out / "results.json").read_text())
        return self

    def wait_for_reference(self) -> DriverRuns:
        """Waits until run B is complete (its checkpoints written, its compiled step in the persistent cache)."""
        background.start(DRIVER_JOB)
        deadline = time.monotonic() + DRIVER_TIMEOUT_S
        while "driver: compiled" not in self.output():
            if not background.is_running(DRIVER_JOB) or time.monotonic() > deadline:
                return self.wait()  # fails with the driver's output unless it finished
            time.sleep(0.5)
        return self

    def output(self) -> str:
        log = self.out / "driver.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def summary(self, name: str) -> dict:
        """The summary of run ``name``; fails the test with the run's error when it raised."""
        run = self.results[name]
        assert "summary" in run, f"run {name} raised {run.get('error')}: {run.get('traceback')}"
        return run["summary"]


@pytest.fixture(scope="session")
def driver_runs() -> DriverRuns:
    """The finished driver.py runs (started in the background at the beginning of the session)."""
    return DriverRuns(driver_out()).wait()


@pytest.fixture(scope="session")
def driver_reference() -> DriverRuns:
    """The driver once its first run (B, the uninterrupted reference) is complete; the others may still be going."""
    return DriverRuns(driver_out()).wait_for_reference()
