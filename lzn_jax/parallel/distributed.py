"""Multi-host start-up: one call that joins the JAX cluster where there is one and does nothing on a laptop."""

from __future__ import annotations

import logging
import os

import jax

_LOG = logging.getLogger(__name__)

# Seconds to wait for the coordinator and every other process, when maybe_initialize is not given a timeout.
TIMEOUT_ENV = "LZN_DISTRIBUTED_TIMEOUT_SECONDS"
# Where no cluster manager describes the job (launch/multinode.sh, launch/local.sh), the launcher names the number of
# processes and this process's id here: jax 0.12 reads only the coordinator (JAX_COORDINATOR_ADDRESS) from the
# environment, and finds the other two only on Cloud TPU, SLURM, Open MPI or Kubernetes.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


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


def _whole_number(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number") from None


def _processes_from_env() -> dict[str, int]:
    """``{"num_processes": N, "process_id": i}`` from JAX_NUM_PROCESSES and JAX_PROCESS_ID, or ``{}`` when neither
    is set (JAX then detects the cluster itself, or there is none)."""
    count = os.environ.get(NUM_PROCESSES_ENV, "").strip()
    index = os.environ.get(PROCESS_ID_ENV, "").strip()
    if not count and not index:
        return {}
    if not count or not index:
        given, missing = (NUM_PROCESSES_ENV, PROCESS_ID_ENV) if count else (PROCESS_ID_ENV, NUM_PROCESSES_ENV)
        raise ValueError(f"{given} is set but {missing} is not: set both (with {COORDINATOR_ENV}) or neither")
    num_processes = _whole_number(NUM_PROCESSES_ENV, count)
    process_id = _whole_number(PROCESS_ID_ENV, index)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"{PROCESS_ID_ENV}={process_id} must be in [0, {NUM_PROCESSES_ENV}={num_processes})")
    if not os.environ.get(COORDINATOR_ENV, "").strip():
        # Without it JAX would say "coordinator_address should be defined", which reads as "no cluster here".
        raise ValueError(f"{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} are set but {COORDINATOR_ENV} is not: set it to "
                         "host:port of process 0, the same on every process")
    return {"num_processes": num_processes, "process_id": process_id}


def maybe_initialize(*, initialization_timeout: int | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment describes a cluster (Cloud TPU pod slices,
    SLURM, or JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID, which this function passes on as
    ``num_processes`` and ``process_id``), so the same command runs on one host and on many.

    Args:
      initialization_timeout: seconds to wait for the coordinator and every other process to join. Default: the
        environment variable ``LZN_DISTRIBUTED_TIMEOUT_SECONDS``, else JAX's default (300 s). When they do not all
        join in time, JAX ends this process with a ``DEADLINE_EXCEEDED`` error naming its coordination service
        (jax 0.12 aborts the process from C++ rather than raising).

    Returns:
      True when this process joined a multi-process cluster.

    Raises:
      RuntimeError: the cluster could not be joined and JAX raised instead of aborting.
      ValueError: ``LZN_DISTRIBUTED_TIMEOUT_SECONDS`` is not a positive whole number, or only one of
        JAX_NUM_PROCESSES and JAX_PROCESS_ID is set, or they are set without JAX_COORDINATOR_ADDRESS, or they do not
        name a process id in ``[0, JAX_NUM_PROCESSES)``.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    timeout = initialization_timeout if initialization_timeout is not None else _timeout_from_env()
    kwargs = {} if timeout is None else {"initialization_timeout": int(timeout)}
    kwargs.update(_processes_from_env())
    coordinator = os.environ.get(COORDINATOR_ENV)
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
    if jax.process_count() == 1:
        return False
    if jax.default_backend() == "cpu":
        _connect_cpu_collectives()
    return True


def _connect_cpu_collectives() -> None:
    """Connects the processes' CPU collectives (gloo) now, while they are in step after joining.

    XLA's CPU backend connects the processes at their first collective and gives up ("Gloo context initialization
    failed") when they reach it more than 30 s apart, which unequal compile times on a busy machine exceed; jax 0.12
    has no setting for it. Once connected, later collectives over the same devices wait for a late process (measured:
    45 s). A mesh over only some of the devices connects anew at its first collective.
    """
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("lzn_jax.parallel.maybe_initialize")
