"""Two JAX processes on 127.0.0.1 (2 CPU devices each) compute exactly what one process computes."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import zoning

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_reference():
    rng = np.random.default_rng(0)
    anchors, prior, projection = (jnp.asarray(rng.standard_normal((16, 6))) for _ in range(3))

    def loss(anchors):
        latents = zoning.compute_latents(anchors, prior, solver="dpm_solver++", num_steps=6)
        _, log_probs = zoning.assign_targets(latents, anchors + 0.1, jnp.arange(16), solver="euler", num_steps=10)
        return jnp.mean(jnp.sum(latents * projection, -1)) + zoning.target_alignment_loss(log_probs), latents

    return jax.value_and_grad(loss, has_aux=True)(anchors)


@pytest.mark.multiprocess
def test_two_processes_equal_one_process(x64, tmp_path):
    out_file = tmp_path / "result.npz"
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(out_file)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"multi-process run hung for more than {TIMEOUT_S} s and was killed")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]

    (loss, latents), grads = single_process_reference()
    result = np.load(out_file)
    np.testing.assert_allclose(result["loss"], loss, rtol=1e-10)
    np.testing.assert_allclose(result["latents"], latents, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(result["grads"], grads, rtol=1e-8, atol=1e-8 * float(np.max(np.abs(grads))))
