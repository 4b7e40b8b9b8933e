"""The plain Euler sampler of the rectified-flow decoder, class-conditional latents through the label flow, and
sample grids. Time convention: rf_time 0 = noise, 1 = data (the decoder's); the label flow uses the solver's."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax import zoning

# The label flow that turns a class into a latent (forward Euler over the label anchors, 100 steps, eps 1e-4).
CLASS_LATENT_OPTIONS = zoning.SolverOptions(solver="euler", num_steps=100, eps=1e-4)


def euler_sample(
    decoder,
    params: Any,
    noise: jax.Array,
    *,
    latents: jax.Array | None = None,
    label_onehot: jax.Array | None = None,
    num_steps: int = 10,
    time_eps: float = 1e-3,
) -> jax.Array:
    """Integrates the decoder's velocity from ``noise`` (B, H, W, C) at rf_time ``time_eps`` to 1 in ``num_steps``
    equal Euler steps (the reference's "euler10" with the default). Returns images (B, H, W, C) float32, nominally
    in [-1, 1] (not clipped). The decoder runs in evaluation mode (no dropout).
    """
    step = (1.0 - time_eps) / num_steps

    def body(index, x):
        t = jnp.full((x.shape[0],), time_eps + index * step, jnp.float32)
        velocity = decoder.apply({"params": params}, x, t, latents, label_onehot, train=False)
        return x + step * velocity.astype(x.dtype)

    return jax.lax.fori_loop(0, num_steps, body, noise.astype(jnp.float32))


def class_conditional_latents(
    label_table: jax.Array, labels: jax.Array, noise: jax.Array, *, options: zoning.SolverOptions = CLASS_LATENT_OPTIONS
) -> jax.Array:
    """Latents (B, D) of classes ``labels`` (B,): the forward label flow from each class anchor over all
    ``label_table`` (C, D) rows, uniform weights, started from ``noise`` (B, D) unscaled."""
    return zoning.compute_latents(label_table[labels], noise, context=label_table, options=options)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images -> uint8 in [0, 255] (clipped, rounded)."""
    return np.clip(np.rint((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, *, columns: int) -> np.ndarray:
    """Tiles uint8 images (N, H, W, C) into one (rows * (H + 1) - 1, columns * (W + 1) - 1, C) picture with
    1-pixel white gaps; the last row is padded with white."""
    count, height, width, channels = images.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1, channels), 255, np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        grid[row * (height + 1):row * (height + 1) + height, column * (width + 1):column * (width + 1) + width] = (
            images[index]
        )
    return grid
