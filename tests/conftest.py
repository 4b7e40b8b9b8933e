"""Test-wide set-up: 8 fake CPU devices and no accelerator, fixed before JAX is first imported."""

import os

# Must happen before any test module imports jax: the device count is read once, at backend start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# TensorFlow (imported by tfds/clu) must never grab a GPU or print banners in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Runs a test body with float64 enabled, restoring the previous setting afterwards."""
    import jax

    with jax.enable_x64(True):
        yield
