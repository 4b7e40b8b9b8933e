"""Test-wide set-up: 8 fake CPU devices and no accelerator, fixed before JAX is first imported."""

import os

# Must happen before any test module imports jax: the device count is read once, at backend start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# Compiling dominates this suite on the CPU, and XLA's lowest backend optimisation level compiles about a third
# faster (CPU time of tests/models 113 -> 79 s, tests/zoning 236 -> 146 s). It changes the generated code's float32
# rounding, not its semantics; the modules marked ``production_compiler`` assert about that rounding, so they run
# in a child process at the default level (``production_compiler_child``). LZN_TESTS_FULL_OPTIMISATION=1 runs the
# whole suite at the default level.
FULL_OPTIMISATION = os.environ.get("LZN_TESTS_FULL_OPTIMISATION") == "1"
REDUCED_OPTIMISATION_FLAG = "--xla_backend_optimization_level=0"
if not FULL_OPTIMISATION and "xla_backend_optimization_level" not in _flags:
    _flags += " " + REDUCED_OPTIMISATION_FLAG
os.environ["XLA_FLAGS"] = _flags.strip()
# TensorFlow (imported by tfds/clu) must never grab a GPU or print banners in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import functools  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from tests import background  # noqa: E402

CHILD_TEST = "test_module_under_the_production_compiler"


def _reduced_optimisation() -> bool:
    return "xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", "")


def pytest_configure(config):
    config.addinivalue_line("markers", "production_compiler: asserts about the float32 rounding of XLA's default "
                                       "code generation; runs in a child process at that level")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Orders the tests (``_position``), after any other plugin's reordering. At the reduced level, a
    ``production_compiler`` module's tests run only inside its child process (its
    ``test_module_under_the_production_compiler``), so they are skipped here, never dropped."""
    if _reduced_optimisation():
        for item in items:
            if not item.get_closest_marker("production_compiler"):
                continue
            if item.originalname == CHILD_TEST:
                test_file = _resolved(item.fspath)
                background.register(_child_job(test_file), ("production_compiler_child",),
                                    functools.partial(_run_child, test_file), priority=7)
            else:
                item.add_marker(pytest.mark.skip(reason=f"runs at XLA's default optimisation in {CHILD_TEST}"))
    items[:] = sorted(items, key=_position)  # stable: the order within each group is the collected one


def _position(item) -> int:
    """0: the in-process tests; 1: those that wait for a background job; 2: the multi-process ones, which must not
    compete with the jobs for the cores (two JAX processes must reach their first collective within 30 s of each
    other, or gloo gives up), unless marked ``multiprocess(timing_sensitive=False)``."""
    marker = item.get_closest_marker("multiprocess")
    if marker is not None and marker.kwargs.get("timing_sensitive", True):
        return 2
    return 1 if background.waits_for_a_job(item) else 0


@pytest.fixture(scope="session", autouse=True)
def _background_jobs(request, tmp_path_factory):
    """Starts, before the first test, every background job (tests/background.py) a selected test waits for; kills
    what is still running at the end (a test failed before waiting for its job)."""
    background.set_base(tmp_path_factory.mktemp("background"))
    background.start_needed(request.session.items)
    yield
    background.stop_all()


def _resolved(path) -> str:
    return str(pathlib.Path(str(path)).resolve())


def _child_job(test_file: str) -> str:
    return f"production_compiler_{pathlib.Path(test_file).stem}"


def _run_child(test_file: str, _directory) -> subprocess.CompletedProcess:
    """The background job of a ``production_compiler`` module: its tests in a fresh pytest at XLA's default
    backend optimisation."""
    flags = " ".join(flag for flag in os.environ["XLA_FLAGS"].split() if "xla_backend_optimization_level" not in flag)
    env = {**os.environ, "XLA_FLAGS": flags, "LZN_TESTS_FULL_OPTIMISATION": "1"}
    root = pathlib.Path(__file__).resolve().parents[1]
    return background.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file], cwd=root,
                          env=env, timeout=1800)


@pytest.fixture
def production_compiler_child():
    """``run(test_file)``: the module's tests in a fresh pytest at XLA's default backend optimisation (a background
    job that started with the session); fails the calling test with the child's output if any of them fails. A
    no-op skip where this process is already at that level (then the module's tests ran here)."""

    def run(test_file: str) -> None:
        if not _reduced_optimisation():
            pytest.skip("this process compiles at XLA's default optimisation: the module's tests ran here")
        child = background.wait(_child_job(test_file))
        assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-3000:]

    return run


@pytest.fixture
def x64():
    """Runs a test body with float64 enabled, restoring the previous setting afterwards."""
    import jax

    with jax.enable_x64(True):
        yield
