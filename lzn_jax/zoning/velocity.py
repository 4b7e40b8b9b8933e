"""The closed-form posterior over anchors and the latent-flow velocity, in log space.

Code time: anchors at t = 0, the Gaussian at t = 1, ``x_t = (1 - t) a + t eps``. At a point ``x`` and time ``t``
the posterior over the N anchors (log-weights ``log c_j``, uniform by default) is

    log p_j = log c_j + [(1 - t) <x, a_j> - (1 - t)^2 |a_j|^2 / 2] / t^2 - logsumexp_k(...)

(the ``|x|^2`` term is the same for every anchor and cancels), the posterior mean is ``p @ A``, and the velocity
is ``(x - mean) / t``. This needs a ``(B, N)`` logits matrix, never a ``(B, N, D)`` tensor. The kernels that
evaluate it in float32 without losing accuracy live in ``_dense.py`` and ``_blockwise.py``; docs/method.md,
"The posterior over anchors and the velocity", and docs/numerics.md explain them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax.zoning import _dense


class TimeCoefficients(NamedTuple):
    """The scalars that turn products into logits at one time ``t``.

    ``logits = inner_scale <x, a> - norm_scale |a|^2 + log_weights`` with ``inner_scale = (1 - t) / t^2`` and
    ``norm_scale = (1 - t)^2 / (2 t^2)``; equivalently ``-distance_scale |x - (1 - t) a|^2`` plus a per-row
    constant, with ``distance_scale = 1 / (2 t^2)``.
    """

    inner_scale: jax.Array | float
    norm_scale: jax.Array | float
    time: jax.Array | float
    distance_scale: jax.Array | float


def time_coefficients(t: float | np.ndarray) -> TimeCoefficients:
    """Logit coefficients at time(s) ``t`` in (0, 1], computed in float64 on the host.

    Args:
      t: a Python float or a NumPy array of times (any shape). Must be concrete: the time grid is static.
    Returns:
      ``TimeCoefficients`` of float64 NumPy values with the shape of ``t``.
    """
    t = np.asarray(t, dtype=np.float64)
    if np.any(t <= 0) or np.any(t > 1):
        raise ValueError(f"time must lie in (0, 1], got {t}")
    return TimeCoefficients(
        inner_scale=(1.0 - t) / t**2, norm_scale=0.5 * (1.0 - t) ** 2 / t**2, time=t, distance_scale=0.5 / t**2
    )


def cast_coefficients(coefficients: TimeCoefficients, dtype) -> TimeCoefficients:
    """Host float64 coefficients as ``dtype`` arrays (the cast happens only after the float64 arithmetic).

    Values that are already arrays (traced scan inputs) are only cast; host values are put on the device
    explicitly, so that the solver runs under ``jax.transfer_guard("disallow")``.
    """
    def cast(value):
        if isinstance(value, jax.Array):
            return value.astype(dtype)
        return jax.device_put(np.asarray(value, dtype))

    return TimeCoefficients(*(cast(value) for value in coefficients))


def solver_dtype(*arrays) -> jnp.dtype:
    """The dtype the solver computes in: float64 if any input is float64 (x64 runs), else float32.

    bfloat16 / float16 inputs are promoted: the flow is ill-conditioned near t = 0 (docs/numerics.md).
    Reads dtypes only; never moves data.
    """
    dtypes = [np.dtype(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype) for a in arrays if a is not None]
    if jax.config.jax_enable_x64 and any(d == np.float64 for d in dtypes):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def uniform_log_weights(log_weights: jax.Array | None, num_anchors: int, dtype) -> jax.Array:
    """(N,) log-weights in ``dtype``; None means uniform (zeros)."""
    if log_weights is None:
        return jnp.zeros((num_anchors,), dtype)
    return log_weights.astype(dtype)


def posterior(
    x: jax.Array, context: jax.Array, coefficients: TimeCoefficients, *, log_weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(mean (B, D), log_probs (B, N))``: posterior mean of the anchors and the normalised log posterior.

    Args:
      x: (B, D) points at time t; context: (N, D) anchors; coefficients: ``time_coefficients(t)`` (host
      float64) or traced scalars inside a scan; log_weights: (N,) or None (uniform; ``-inf`` excludes an anchor).
    """
    dtype = x.dtype
    scales = cast_coefficients(coefficients, dtype)
    log_weights = uniform_log_weights(log_weights, context.shape[0], dtype)
    mean, log_probs, _ = _dense.dense_posterior(x, context, context.T, _dense.squared_norms(context), log_weights,
                                                scales.inner_scale, scales.norm_scale, scales.time,
                                                scales.distance_scale, True)
    return mean, log_probs


@functools.partial(jax.jit, static_argnames=("t",))
def posterior_log_probs(x: jax.Array, t: float, context: jax.Array, *,
                        log_weights: jax.Array | None = None) -> jax.Array:
    """(B, N) normalised log posterior ``log P(anchor j | x at time t)``; ``t`` in (0, 1] is a static float."""
    dtype = solver_dtype(x, context, log_weights)
    _, log_probs = posterior(x.astype(dtype), context.astype(dtype), time_coefficients(t), log_weights=log_weights)
    return log_probs


@functools.partial(jax.jit, static_argnames=("t",))
def latent_velocity(x: jax.Array, t: float, context: jax.Array, *,
                    log_weights: jax.Array | None = None) -> jax.Array:
    """The latent-flow velocity ``dx/dt = (x - mean) / t`` at static time ``t`` in (0, 1].

    Args:
      x: (B, D) points at time t; context: (N, D) anchors; log_weights: (N,) or None.
    Returns:
      (B, D) velocity, pointing from the anchors (t = 0) towards the Gaussian (t = 1).
    """
    dtype = solver_dtype(x, context, log_weights)
    x = x.astype(dtype)
    mean, _ = posterior(x, context.astype(dtype), time_coefficients(t), log_weights=log_weights)
    return (x - mean) / jnp.asarray(t, dtype)
