"""Multi-host start-up: one call that joins the JAX cluster where there is one and does nothing on a laptop."""

from __future__ import annotations

import logging
import os

import jax

_LOG = logging.getLogger(__name__)

# Seconds to wait for the coordinator and every other process, when maybe_initialize is not given a timeout.
TIMEOUT_ENV = "LZN_DISTRIBUTED_TIMEOUT_SECONDS"


def _timeout_from_env() -> int | None:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = int(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} is not a whole number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


def maybe_initialize(*, initialization_timeout: int | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment describes a cluster (Cloud TPU pod slices,
    SLURM, or the coordinator variables JAX reads), so the same command runs on one host and on many.

    Args:
      initialization_timeout: seconds to wait for the coordinator and every other process to join. Default: the
        environment variable ``LZN_DISTRIBUTED_TIMEOUT_SECONDS``, else JAX's default (300 s). When they do not all
        join in time, JAX ends this process with a ``DEADLINE_EXCEEDED`` error naming its coordination service
        (jax 0.12 aborts the process from C++ rather than raising).

    Returns:
      True when this process joined a multi-process cluster.

    Raises:
      RuntimeError: the cluster could not be joined and JAX raised instead of aborting.
      ValueError: ``LZN_DISTRIBUTED_TIMEOUT_SECONDS`` is not a positive whole number.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    timeout = initialization_timeout if initialization_timeout is not None else _timeout_from_env()
    kwargs = {} if timeout is None else {"initialization_timeout": int(timeout)}
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        # Said before JAX blocks: if a peer never comes, this line explains the abort that follows.
        _LOG.warning("joining the JAX cluster of coordinator %s; waiting up to %s s for every process (%s)",
                     coordinator, timeout if timeout is not None else "JAX's default of 300", TIMEOUT_ENV)
    try:
        jax.distributed.initialize(**kwargs)
    except jax.errors.JaxRuntimeError as error:
        # The environment describes a cluster but joining it failed: never fall back to training alone.
        raise RuntimeError(
            f"could not join the JAX cluster (coordinator {coordinator or 'auto-detected'}, timeout "
            f"{timeout if timeout is not None else 300} s): {error}. Start every process of the job, check the "
            f"coordinator address and port, or raise {TIMEOUT_ENV}"
        ) from error
    except (ValueError, RuntimeError) as error:
        # No cluster environment was detected (a single machine): JAX says so with one of these errors.
        _LOG.info("single process (jax.distributed.initialize: %s)", error)
        return False
    return jax.process_count() > 1
