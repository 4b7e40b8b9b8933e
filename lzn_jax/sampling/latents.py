"""The latents the image decoder is conditioned on when generating: Gaussian draws for unconditional samples, the
forward label flow from a class's anchor for class-conditional ones (docs/method.md, "Where each flow is used")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lzn_jax import zoning

# The label flow that turns a class into a latent: forward Euler over all label anchors, 100 steps, eps 1e-4,
# uniform weights, unscaled prior noise (the reference's setting for class-conditional generation).
CLASS_LATENT_OPTIONS = zoning.SolverOptions(solver="euler", num_steps=100, eps=1e-4)


def unconditional_latents(rng: jax.Array, count: int, latent_dim: int) -> jax.Array:
    """Latents (count, latent_dim) float32 ~ N(0, I): generation needs no encoder and no flow, since the latent
    space is the Gaussian prior itself."""
    return jax.random.normal(rng, (count, latent_dim), jnp.float32)


def class_conditional_latents(
    label_table: jax.Array, labels: jax.Array, noise: jax.Array, *, options: zoning.SolverOptions = CLASS_LATENT_OPTIONS
) -> jax.Array:
    """Latents (B, D) of classes ``labels`` (B,) int: the forward label flow from each class's anchor over all
    ``label_table`` (C, D) rows (the zones of the C classes), uniform weights, started from ``noise`` (B, D)
    ~ N(0, I) unscaled. The decoder then also takes ``one_hot(labels)``."""
    return zoning.compute_latents(label_table[labels], noise, context=label_table, options=options)
