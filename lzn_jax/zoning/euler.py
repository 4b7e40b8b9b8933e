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

    Args:
      start: (B, D) state at ``times[0]``; evaluate: the per-step evaluation (its residual x - D drives the step);
      step: the positive step size; reverse: integrate towards t = 0.
    Returns:
      ``(end (B, D), recorded stacked over the steps, or None)``; entry k is taken before the k-th update.
    """
    dtype = start.dtype
    # x_next = x +- (h / t) (x - D): the residual is formed first, so no large multiple of x cancels.
    scales = (-step if reverse else step) / times

    def euler_step(x, per_step):
        coefficients, scale = per_step
        evaluation = evaluate(x, coefficients)
        return x + scale.astype(dtype) * evaluation.residual, evaluation.recorded

    return jax.lax.scan(euler_step, start, (time_coefficients(times), jnp.asarray(scales)))
