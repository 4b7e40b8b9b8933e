"""DPM-Solver++ multistep (orders 1-3) for the latent flow, forward and reverse (docs/method.md, "DPM-Solver++").

Schedule in code time: alpha_t = 1 - t, sigma_t = t, lambda_t = log(alpha_t / sigma_t). The data prediction
is the posterior mean of the anchors, ``D(x, t) = x - t v = mean`` exactly, so no division by 1 - t is needed.
With the most recent data predictions D1 (at s = t_{k-1}), D2, D3 every update is written in differences,

    x_t = D1 + (sigma_t / sigma_s) (x - D1) + c_a (D1 - D2) + c_b (D2 - D3),

which is the usual DPM-Solver++ update rearranged (its ``-alpha_t expm1(-h)`` equals ``1 - sigma_t / sigma_s``); the
coefficients come from the float64 time grid on the host. The model is evaluated num_steps times, never at the
final time. The update is affine with weights summing to one, so it holds in coordinates relative to any
per-row origin (``_evaluator.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax.zoning._evaluator import Evaluate
from lzn_jax.zoning.velocity import time_coefficients


def time_grid(num_steps: int, eps: float, *, reverse: bool) -> np.ndarray:
    """``time_uniform`` grid of num_steps + 1 float64 times: eps -> 1 - eps (forward) or back (reverse)."""
    start, end = (1.0 - eps, eps) if reverse else (eps, 1.0 - eps)
    return np.linspace(start, end, num_steps + 1, dtype=np.float64)


def step_orders(num_steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Order of each of the num_steps updates: warm-up 1, 2, ..., then ``order``.

    ``lower_order_final`` lowers the last updates only when num_steps < 10 (as in DPM-Solver; inert at 20).
    """
    orders = []
    for k in range(1, num_steps + 1):
        if k < order:
            orders.append(k)
        elif lower_order_final and num_steps < 10:
            orders.append(min(order, num_steps + 1 - k))
        else:
            orders.append(order)
    return orders


def update_coefficients(times: np.ndarray, orders: list[int]) -> np.ndarray:
    """(num_steps, 3) float64 coefficients ``(sigma_t / sigma_s, c_a, c_b)`` of every multistep update."""
    lambdas = np.log((1.0 - times) / times)
    rows = []
    for k, step_order in enumerate(orders, start=1):
        t, s = times[k], times[k - 1]
        h = lambdas[k] - lambdas[k - 1]
        alpha_t = 1.0 - t
        phi_1 = np.expm1(-h)
        c_a = c_b = 0.0
        if step_order == 2:
            r0 = (lambdas[k - 1] - lambdas[k - 2]) / h
            c_a = -0.5 * alpha_t * phi_1 / r0
        elif step_order == 3:
            r0 = (lambdas[k - 1] - lambdas[k - 2]) / h
            r1 = (lambdas[k - 2] - lambdas[k - 3]) / h
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            # E1 = (1 + r0/(r0+r1)) Delta0 - r0/(r0+r1) Delta1 and E2 = (Delta0 - Delta1)/(r0+r1), with
            # Delta0 = (D1 - D2)/r0 and Delta1 = (D2 - D3)/r1, regrouped per difference.
            mix = r0 / (r0 + r1)
            c_a = alpha_t * (phi_2 * (1.0 + mix) - phi_3 / (r0 + r1)) / r0
            c_b = alpha_t * (-phi_2 * mix + phi_3 / (r0 + r1)) / r1
        elif step_order != 1:
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {step_order}")
        rows.append((t / s, c_a, c_b))
    return np.asarray(rows, dtype=np.float64)


def _apply_update(x, history, coefficients):
    ratio, c_a, c_b = coefficients
    d1, d2, d3 = history
    return d1 + ratio * (x - d1) + c_a * (d1 - d2) + c_b * (d2 - d3)


def dpm_solver_flow(start: jax.Array, evaluate: Evaluate, times: np.ndarray, orders: list[int]
                    ) -> tuple[jax.Array, jax.Array | None]:
    """Integrates the latent flow with DPM-Solver++ multistep over ``times`` (num_steps + 1, float64, host).

    Args:
      start: (B, D) state at ``times[0]``; evaluate: the per-step evaluation (data prediction, recorded);
      orders: the order of each of the num_steps updates (:func:`step_orders`).
    Returns:
      ``(end (B, D), recorded at each of the num_steps evaluations, stacked, or None)``.
    """
    dtype = start.dtype
    updates = update_coefficients(times, orders)
    # Every evaluation runs inside one loop: the first one after an update that leaves the state as it is
    # (coefficients (1, 0, 0) on an all-zero history: 0 + 1 (x - 0) + 0 + 0 is x exactly in floating point), so
    # the program holds one copy of the evaluation, and its buffers, instead of a second one before the loop.
    per_step_updates = np.concatenate([[[1.0, 0.0, 0.0]], updates[:-1]])
    coefficients = time_coefficients(times[:-1])

    def multistep(carry, per_step):
        x, history = carry
        update, step_coefficients = per_step
        x = _apply_update(x, history, update)
        evaluation = evaluate(x, step_coefficients)
        return (x, (evaluation.prediction, history[0], history[1])), evaluation.recorded

    zeros = jnp.zeros_like(start)  # unused history slots meet zero coefficients in the warm-up steps
    (x, history), recorded = jax.lax.scan(
        multistep, (start, (zeros, zeros, zeros)),
        (jnp.asarray(per_step_updates, dtype), jax.tree.map(jnp.asarray, coefficients)),
    )
    return _apply_update(x, history, jnp.asarray(updates[-1], dtype)), recorded
