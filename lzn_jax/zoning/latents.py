"""The two public operations of the latent zoning solver: ``compute_latents`` and ``assign`` (DESIGN.md §4.1).

Code time: anchors at t = 0, Gaussian at t = 1. Both are plain, un-jitted, differentiable JAX functions with
respect to anchors, context and latents; jit them in the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax.zoning import dpm_solver as dpm_lib
from lzn_jax.zoning import euler as euler_lib
from lzn_jax.zoning import velocity as velocity_lib

SOLVERS = ("euler", "dpm_solver++")
# The reference's start offsets: Euler starts at t = 1e-4; DPM-Solver++ runs from 1e-3 to 0.999.
DEFAULT_EPS = {"euler": 1e-4, "dpm_solver++": 1e-3}


def _check_solver(solver: str, num_steps: int, eps: float | None) -> float:
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} does not exist; choose one of {SOLVERS}")
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    eps = DEFAULT_EPS[solver] if eps is None else float(eps)
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    return eps


def _check_matrix(name: str, array, dim: int | None = None, rows: int | None = None) -> None:
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, latent_dim) array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} has latent dimension {array.shape[1]}, expected {dim} (shape {array.shape})")
    if rows is not None and array.shape[0] != rows:
        raise ValueError(f"{name} has {array.shape[0]} rows, expected {rows} (shape {array.shape})")


def _check_block_size(block_size) -> None:
    if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
        raise ValueError(f"block_size must be None or a positive int, got {block_size!r}")


def log_weights_from_weights(weights) -> jax.Array:
    """Converts positive mixture weights (N,) to log-weights.

    A weight of zero cannot be told apart from an underflow here; exclude an anchor explicitly with a
    log-weight of ``-inf`` instead.
    """
    if not isinstance(weights, jax.core.Tracer):
        values = np.asarray(weights)
        if not np.all(values > 0):
            raise ValueError(
                "weights must be strictly positive; got a value <= 0 (or NaN). Pass log_weights instead, "
                "with -inf for anchors that must get zero weight."
            )
    return jnp.log(jnp.asarray(weights))


def _resolve_weights(log_weights, weights, num_anchors: int, dtype):
    if log_weights is not None and weights is not None:
        raise ValueError("give either log_weights or weights, not both")
    if weights is not None:
        log_weights = log_weights_from_weights(weights)
    if log_weights is None:
        return None
    log_weights = jnp.asarray(log_weights)
    if log_weights.shape != (num_anchors,):
        raise ValueError(f"log_weights must have shape ({num_anchors},) (one per context anchor), "
                         f"got {log_weights.shape}")
    if not isinstance(log_weights, jax.core.Tracer):
        values = np.asarray(log_weights)
        if np.any(np.isnan(values)) or np.any(values == np.inf) or np.all(values == -np.inf):
            raise ValueError("log_weights must be finite or -inf, with at least one finite entry; "
                             "got NaN, +inf or all -inf")
    return log_weights.astype(dtype)


def compute_latents(
    anchors: jax.Array,
    noise: jax.Array,
    *,
    context: jax.Array | None = None,
    solver: str = "dpm_solver++",
    num_steps: int = 20,
    eps: float | None = None,
    order: int = 3,
    lower_order_final: bool = True,
    block_size: int | None = None,
    memory_budget_bytes: int = velocity_lib.DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
    """Latents of the given anchors: the forward latent flow from ``eps * noise + (1 - eps) * anchor``.

    Args:
      anchors: (B, D) the own samples' anchors (any float dtype; computed in float32, or float64 under x64).
      noise: (B, D) prior draw already scaled by alpha (``prior_data_scale``; 0 gives zone centres).
      context: (N, D) all anchors that define the zones; default ``anchors``.
      solver: "euler" (eps default 1e-4, t: eps -> 1) or "dpm_solver++" (multistep, eps 1e-3, t: eps -> 1 - eps).
      num_steps: velocity evaluations (20 in every released config).
      order, lower_order_final: DPM-Solver++ options (3 and True in the reference).
      block_size: stream over anchor blocks of this size (memory O(B * block_size)); None: dense kernel.
      memory_budget_bytes: per-device memory for saved posteriors before steps are rematerialised.
    Returns:
      (B, D) latents, float32 (float64 under x64 with float64 inputs).
    """
    eps = _check_solver(solver, num_steps, eps)
    _check_block_size(block_size)
    context = anchors if context is None else context
    dtype = velocity_lib.solver_dtype(anchors, noise, context)
    anchors, noise, context = (jnp.asarray(a, dtype) for a in (anchors, noise, context))
    _check_matrix("anchors", anchors)
    _check_matrix("noise", noise, dim=anchors.shape[1], rows=anchors.shape[0])
    _check_matrix("context", context, dim=anchors.shape[1])
    # Logits measured from each row's own anchor (velocity.py); the blockwise kernel is exact without them.
    reference = None if block_size is not None else velocity_lib.zone_reference(anchors, context)
    if solver == "euler":
        return euler_lib.euler_forward(
            anchors, noise, context, num_steps=num_steps, eps=eps, reference=reference, block_size=block_size,
            memory_budget_bytes=memory_budget_bytes,
        )
    latents, _ = dpm_lib.dpm_solver_flow(
        euler_lib.forward_start(anchors, noise, eps), context, num_steps=num_steps, eps=eps, reverse=False,
        order=order, lower_order_final=lower_order_final, reference=reference, block_size=block_size,
        memory_budget_bytes=memory_budget_bytes,
    )
    return latents


def assign(
    latents: jax.Array,
    context: jax.Array,
    *,
    solver: str = "euler",
    num_steps: int = 100,
    log_weights: jax.Array | None = None,
    weights: jax.Array | None = None,
    targets: jax.Array | None = None,
    eps: float | None = None,
    order: int = 3,
    lower_order_final: bool = True,
    block_size: int | None = None,
    memory_budget_bytes: int = velocity_lib.DEFAULT_MEMORY_BUDGET_BYTES,
) -> tuple[jax.Array, jax.Array]:
    """Reverse latent flow: carries latents back to the anchors and records the soft zone assignment.

    Args:
      latents: (B, D) points at the Gaussian end.
      context: (N, D) anchors whose zones are queried.
      solver: "euler" (t: 1 -> 0, no eps; the only reverse flow the reference's configs use) or
        "dpm_solver++" (multistep, t: 1 - eps -> eps, eps default 1e-3).
      log_weights: (N,) log mixture weights inside the log-sum-exp (``-inf`` = weight zero); or
      weights: (N,) strictly positive weights (converted to log-weights). Default uniform.
      targets: optional (B,) int index of each row's target anchor; then only that column is recorded, which
        is all :func:`alignment_loss` needs (memory O(steps * B) instead of O(steps * B * N)).
      block_size: stream over anchor blocks (requires ``targets``, as the full posterior is what it avoids).
    Returns:
      ``(endpoints (B, D), log_probs)``: log_probs (num_steps, B, N) normalised log posteriors (or
      (num_steps, B) given targets); entry k is taken before the k-th update, so for Euler entry 0 (t = 1)
      equals the normalised log weights.
    """
    eps = _check_solver(solver, num_steps, eps)
    _check_block_size(block_size)
    dtype = velocity_lib.solver_dtype(latents, context)
    latents, context = jnp.asarray(latents, dtype), jnp.asarray(context, dtype)
    _check_matrix("latents", latents)
    _check_matrix("context", context, dim=latents.shape[1])
    log_weights = _resolve_weights(log_weights, weights, context.shape[0], dtype)
    if targets is not None:
        targets = jnp.asarray(targets)
        if targets.shape != (latents.shape[0],) or not jnp.issubdtype(targets.dtype, jnp.integer):
            raise ValueError(f"targets must be ({latents.shape[0]},) integers, got {targets.shape} {targets.dtype}")
        if not isinstance(targets, jax.core.Tracer) and (
            np.any(np.asarray(targets) < 0) or np.any(np.asarray(targets) >= context.shape[0])
        ):
            raise ValueError(f"targets must index the {context.shape[0]} context anchors, i.e. lie in "
                             f"[0, {context.shape[0]}); got values from {int(np.min(targets))} to "
                             f"{int(np.max(targets))}")
    elif block_size is not None:
        raise ValueError("block_size needs targets: the blockwise kernel never forms the (B, N) posterior")
    if solver == "euler":
        return euler_lib.euler_reverse(
            latents, context, num_steps=num_steps, log_weights=log_weights, targets=targets,
            block_size=block_size, memory_budget_bytes=memory_budget_bytes,
        )
    return dpm_lib.dpm_solver_flow(
        latents, context, num_steps=num_steps, eps=eps, reverse=True, order=order,
        lower_order_final=lower_order_final, log_weights=log_weights, targets=targets, record=True,
        block_size=block_size, memory_budget_bytes=memory_budget_bytes,
    )
