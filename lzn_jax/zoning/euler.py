"""Euler latent flows (SPEC.md §1.3, §1.4): forward anchors -> latents and reverse latents -> anchors.

Code time: anchors at t = 0, Gaussian at t = 1. The time grid is static and built in float64 on the host.
Every step runs inside ``lax.scan``; see :func:`velocity.rematerialise` for what the backward pass keeps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax.zoning import velocity as velocity_lib


def forward_grid(num_steps: int, eps: float) -> tuple[np.ndarray, float]:
    """Evaluation times ``eps + k h`` for k = 0..num_steps-1 (float64) and the step ``h = (1 - eps) / num_steps``.

    The flow ends at exactly t = 1; the velocity is never evaluated there.
    """
    step = (1.0 - eps) / num_steps
    return eps + step * np.arange(num_steps, dtype=np.float64), step


def reverse_grid(num_steps: int) -> tuple[np.ndarray, float]:
    """Evaluation times ``1 - k / num_steps`` for k = 0..num_steps-1 (float64) and the step ``1 / num_steps``."""
    return 1.0 - np.arange(num_steps, dtype=np.float64) / num_steps, 1.0 / num_steps


def _per_step_scalars(times: np.ndarray, step: float, dtype) -> tuple[velocity_lib.TimeCoefficients, jax.Array]:
    coefficients = velocity_lib.time_coefficients_array(times, dtype)
    # x_next = x +- (h / t) (x - mean): the difference is formed first, so no large multiple of x cancels.
    return coefficients, jnp.asarray(step / times, dtype)


def forward_start(anchors: jax.Array, noise: jax.Array, eps: float) -> jax.Array:
    """(B, D) start of the forward flow at t = eps: ``eps * noise + (1 - eps) * anchors``."""
    return jnp.asarray(eps, anchors.dtype) * noise + jnp.asarray(1.0 - eps, anchors.dtype) * anchors


def euler_forward(
    anchors: jax.Array,
    noise: jax.Array,
    context: jax.Array,
    *,
    num_steps: int,
    eps: float,
    reference: velocity_lib.ZoneReference | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = velocity_lib.DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
    """Latents of the rows of ``anchors`` under the flow defined by ``context``.

    Args:
      anchors: (B, D) own anchors; noise: (B, D) prior draw already scaled by alpha; context: (N, D).
      num_steps: Euler steps from t = eps to t = 1; eps: start time (1e-4 in the reference).
      reference: per-row reference points for the logits (``velocity.zone_reference(anchors, context)``).
    Returns:
      (B, D) latents at t = 1.
    """
    dtype = anchors.dtype
    times, step = forward_grid(num_steps, eps)
    start = forward_start(anchors, noise, eps)

    evaluate = velocity_lib.posterior_evaluator(
        context, num_steps=num_steps, batch=anchors.shape[0], reference=reference, block_size=block_size,
        memory_budget_bytes=memory_budget_bytes,
    )

    def euler_step(x, scalars):
        coefficients, scale = scalars
        return x + scale * (x - evaluate(x, coefficients)[0]), None

    latents, _ = jax.lax.scan(euler_step, start, _per_step_scalars(times, step, dtype))
    return latents


def euler_reverse(
    latents: jax.Array,
    context: jax.Array,
    *,
    num_steps: int,
    log_weights: jax.Array | None = None,
    targets: jax.Array | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = velocity_lib.DEFAULT_MEMORY_BUDGET_BYTES,
) -> tuple[jax.Array, jax.Array]:
    """Runs latents back from t = 1 to t = 0 (no eps), recording the posterior before every step.

    Args:
      latents: (B, D); context: (N, D); log_weights: (N,) or None (uniform).
      targets: optional (B,) int anchor index per row; then only that column is recorded.
    Returns:
      ``(endpoints (B, D), log_probs)`` with log_probs (num_steps, B, N), or (num_steps, B) given targets;
      entry k is taken at t = 1 - k / num_steps, so entry 0 equals the normalised log weights.
    """
    dtype = latents.dtype
    times, step = reverse_grid(num_steps)

    evaluate = velocity_lib.posterior_evaluator(
        context, num_steps=num_steps, batch=latents.shape[0], log_weights=log_weights, targets=targets,
        record=True, block_size=block_size, memory_budget_bytes=memory_budget_bytes,
    )

    def reverse_step(x, scalars):
        coefficients, scale = scalars
        mean, recorded = evaluate(x, coefficients)
        return x - scale * (x - mean), recorded

    return jax.lax.scan(reverse_step, latents, _per_step_scalars(times, step, dtype))
