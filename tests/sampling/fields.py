"""Velocity fields of the image ODE with closed-form flows, and their exact solutions in float64 NumPy.

``gaussian_rf`` is the exact rectified-flow velocity when the data are N(m, s^2 I) and the noise N(0, I): the
interpolant ``x_t = t x1 + (1 - t) x0`` is N(t m, sigma_t^2 I) with ``sigma_t^2 = t^2 s^2 + (1 - t)^2``, and the flow
maps ``x(t0)`` to ``t1 m + sigma(t1) / sigma(t0) * (x(t0) - t0 m)``. Each row has its own (m, s) through the
conditioning; small s makes the field stiff near t = 1 (many adaptive steps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from lzn_jax import sampling


def _column(values, x):
    return values.reshape((-1,) + (1,) * (x.ndim - 1))


def gaussian_rf(x, t, conditioning):
    """x (B, D), t (B,), conditioning (m (B, D), s (B,)) -> (B, D)."""
    m, s = conditioning
    t, s = _column(t, x), _column(s, x)
    return m + (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2) * (x - t * m)


def gaussian_rf_flow(x, m, s, t0, t1):
    """The exact flow of :func:`gaussian_rf` from time t0 to t1, float64."""
    x, m, s = (np.asarray(a, np.float64) for a in (x, m, s))
    sigma0, sigma1 = (np.sqrt(t**2 * s[:, None] ** 2 + (1 - t) ** 2) for t in (t0, t1))
    return t1 * m + sigma1 / sigma0 * (x - t0 * m)


def gaussian_rf_euler(x, m, s, t0, t1, num_steps):
    """``num_steps`` Euler steps of :func:`gaussian_rf` in float64 NumPy, velocity at each step's start."""
    x, m, s = (np.asarray(a, np.float64) for a in (x, m, s))
    h = (t1 - t0) / num_steps
    for k in range(num_steps):
        t = np.full(len(x), t0 + k * h)
        x = x + h * np.asarray(gaussian_rf(x, t, (m, s)))
    return x


# A rotation with decay (non-normal, mixing the coordinates), so that a transposed matrix or a wrong step shows.
MATRIX = np.array([[-0.5, 2.0, 0.0], [-2.0, -0.5, 0.3], [0.0, 0.0, 1.0]])


def linear(x, t, conditioning):
    """v(x, t) = A x for every row with A = ``MATRIX``: x (B, 3) -> x A^T."""
    return x @ jnp.asarray(MATRIX.T, x.dtype)


def linear_flow(x, t0, t1):
    """x(t1) = expm((t1 - t0) A) x(t0) for every row, float64."""
    return np.asarray(x, np.float64) @ scipy.linalg.expm((t1 - t0) * MATRIX).T


# Row 0 is smooth (s = 1); row 1 is stiff near t = 1 and needs many more adaptive steps than the others.
SCALES = (1.0, 0.02, 0.7, 1.3, 0.4, 0.9, 0.25, 1.1)


def problem(seed=0, dim=5):
    """(x, m, s) float32 for 8 rows (one per fake device): start states, per-row means and ``SCALES``."""
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((len(SCALES), dim)), jnp.float32),
            jnp.asarray(rng.standard_normal((len(SCALES), dim)), jnp.float32), jnp.asarray(SCALES, jnp.float32))


# Every test solve goes through one jitted function with static options, so equal shapes and options compile once
# for the whole session (diffrax's own cache misses on every fresh closure); XLA's fastest compile, same values.
@functools.partial(jax.jit, static_argnames=("velocity", "direction", "options"),
                   compiler_options={"xla_backend_optimization_level": 0})
def solve(x, conditioning, *, options, velocity=gaussian_rf, direction="sample"):
    """``sampling.sample`` (direction "sample") or ``sampling.invert`` ("invert") of ``velocity``, jitted."""
    integrate = sampling.sample if direction == "sample" else sampling.invert
    return integrate(velocity, x, conditioning, options=options)

