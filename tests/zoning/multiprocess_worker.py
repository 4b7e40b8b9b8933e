"""One process of the 2-process test in test_multiprocess.py (run as a script, not collected by pytest).

Usage: python multiprocess_worker.py PROCESS_ID PORT OUT_FILE. Each process owns 2 CPU devices and half of
the global batch; process 0 writes the gathered latents, loss and anchor gradients to OUT_FILE (.npz).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lzn_jax import zoning

GLOBAL_BATCH, DIM = 16, 6


def global_problem():
    rng = np.random.default_rng(0)
    return rng.standard_normal((GLOBAL_BATCH, DIM)), rng.standard_normal((GLOBAL_BATCH, DIM)), \
        rng.standard_normal((GLOBAL_BATCH, DIM))


def main(process_id: int, port: int, out_file: str) -> None:
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    anchors, prior, projection = global_problem()
    local = slice(process_id * GLOBAL_BATCH // 2, (process_id + 1) * GLOBAL_BATCH // 2)
    to_global = lambda a: jax.make_array_from_process_local_data(rows, a[local])  # noqa: E731
    g_anchors, g_prior, g_projection = map(to_global, (anchors, prior, projection))

    forward = zoning.SolverOptions(solver="dpm_solver++", num_steps=6)
    reverse = zoning.SolverOptions(solver="euler", num_steps=10)

    def loss(anchors, prior, projection):
        latents = zoning.compute_latents_sharded(anchors, prior, mesh=mesh, options=forward)
        _, log_probs = zoning.assign_targets_sharded(latents, anchors + 0.1, jnp.arange(GLOBAL_BATCH), mesh=mesh,
                                                     options=reverse)
        value = jnp.mean(jnp.sum(latents * projection, -1)) + zoning.target_alignment_loss(log_probs)
        return value, latents

    (value, latents), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(g_anchors, g_prior, g_projection)
    latents, grads = multihost_utils.process_allgather((latents, grads), tiled=True)
    if process_id == 0:
        np.savez(out_file, loss=np.asarray(value), latents=latents, grads=grads)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
