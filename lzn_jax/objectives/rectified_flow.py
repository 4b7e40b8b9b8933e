"""The rectified-flow objective of the image decoder. Time convention here: rf_time 0 = noise, 1 = data (the
opposite of the zoning solver's, where 0 is the anchor)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RectifiedFlowPair(NamedTuple):
    """One training example per row: the noisy images, their rf_time and the velocity the decoder should predict."""

    noisy_images: jax.Array  # (B, H, W, C): rf_time * images + (1 - rf_time) * noise
    rf_time: jax.Array  # (B,) uniform in [time_eps, 1]
    target_velocity: jax.Array  # (B, H, W, C): images - noise


def rectified_flow_pair(images: jax.Array, key: jax.Array, *, time_eps: float = 1e-3) -> RectifiedFlowPair:
    """Draws rf_time ~ U[time_eps, 1] per image and Gaussian noise images; images (B, H, W, C) in [-1, 1]."""
    time_key, noise_key = jax.random.split(key)
    batch = images.shape[0]
    rf_time = jax.random.uniform(time_key, (batch,), jnp.float32) * (1.0 - time_eps) + time_eps
    noise = jax.random.normal(noise_key, images.shape, jnp.float32)
    t = rf_time[:, None, None, None]
    return RectifiedFlowPair(t * images + (1.0 - t) * noise, rf_time, images - noise)


def rectified_flow_loss(predicted_velocity: jax.Array, target_velocity: jax.Array) -> jax.Array:
    """Plain L2: the batch mean of each image's mean squared error over pixels and channels. Scalar float32."""
    error = (target_velocity.astype(jnp.float32) - predicted_velocity.astype(jnp.float32)) ** 2
    return jnp.mean(jnp.mean(error, axis=tuple(range(1, error.ndim))))
