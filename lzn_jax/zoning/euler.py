"""Euler latent flows: forward (anchors -> latents, t: eps -> 1) and reverse (latents -> anchors, t: 1 -> 0).

Code time: anchors at t = 0, the Gaussian at t = 1. The time grid is static and built in float64 on the host;
the steps run inside ``lax.scan``. States are relative to a per-row origin (``_evaluator.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax.zoning._evaluator import Evaluate
from lzn_jax.zoning.velocity import time_coefficients


def forward_grid(num_steps: int, eps: float) -> tuple[np.ndarray, float]:
    """Evaluation times ``eps + k h`` for k = 0..num_steps-1 (float64) and the step ``h = (1 - eps) / num_steps``.

    The flow ends at exactly t = 1; the velocity is never evaluated there.
    """
    step = (1.0 - eps) / num_steps
    return eps + step * np.arange(num_steps, dtype=np.float64), step


def reverse_grid(num_steps: int) -> tuple[np.ndarray, float]:
    """Evaluation times ``1 - k / num_steps`` for k = 0..num_steps-1 (float64) and the step ``1 / num_steps``."""
    return 1.0 - np.arange(num_steps, dtype=np.float64) / num_steps, 1.0 / num_steps


def euler_flow(start: jax.Array, evaluate: Evaluate, times: np.ndarray, step: float, *,
               reverse: bool) -> tuple[jax.Array, jax.Array | None]:
    """Integrates ``dx/dt = (x - D(x, t)) / t`` with Euler steps at ``times`` (float64, host).

    The state is carried as an unevaluated sum ``x + c`` of two floats (compensated summation): ``c`` holds what
    rounding each update to the state's precision drops, and is added back at the next update, so the flow does
    not accumulate one rounding of the state per step. Each step evaluates the model at ``x``; with that
    evaluation, the exact Euler update of ``x + c`` is ``x + [s r + (1 + s) c]``, with ``s = +-h/t`` and the
    residual ``r = x - D(x)``. The correction is a constant for differentiation (its exact value is zero), so
    the derivatives are those of the plain Euler step. docs/numerics.md, "Euler steps with a compensated
    state".

    Args:
      start: (B, D) state at ``times[0]``; evaluate: the per-step evaluation (its residual x - D drives the step);
      step: the positive step size; reverse: integrate towards t = 0.
    Returns:
      ``(end (B, D), recorded stacked over the steps, or None)``; entry k is taken before the k-th update.
    """
    dtype = start.dtype
    # x_next = x +- (h / t) (x - D): the residual is formed first, so no large multiple of x cancels.
    scales = (-step if reverse else step) / times

    def euler_step(state, per_step):
        x, correction = state
        coefficients, scale, carried = per_step
        evaluation = evaluate(x, coefficients)
        increment = scale.astype(dtype) * evaluation.residual + carried.astype(dtype) * correction
        updated = x + increment
        # What the addition dropped (exact for |increment| <= |x|, and a good estimate otherwise).
        correction = jax.lax.stop_gradient(increment - (updated - x))
        return (updated, correction), evaluation.recorded

    per_step = (time_coefficients(times), jnp.asarray(scales), jnp.asarray(1.0 + scales))
    (end, correction), recorded = jax.lax.scan(euler_step, (start, jnp.zeros_like(start)), per_step)
    return end + correction, recorded
