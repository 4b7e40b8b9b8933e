"""Multi-host start-up: one call that joins the JAX cluster where there is one and does nothing on a laptop."""

from __future__ import annotations

import logging

import jax

_LOG = logging.getLogger(__name__)


def maybe_initialize() -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment describes a cluster (Cloud TPU pod slices,
    SLURM, or the coordinator variables JAX reads), so the same command runs on one host and on many.

    Returns:
      True when this process joined a multi-process cluster.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as error:
        # No cluster environment was detected (a single machine): JAX says so with one of these errors.
        _LOG.info("single process (jax.distributed.initialize: %s)", error)
        return False
    return jax.process_count() > 1
