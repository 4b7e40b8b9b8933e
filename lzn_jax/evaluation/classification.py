"""Classification with a joint LZN model (case study 3): image encoder -> latents -> reverse label flow -> the
nearest label anchor. Transductive as in the paper: each image's latent depends on the batch it is solved with,
so every reported accuracy states its batch size and prior scale alpha."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lzn_jax import zoning

# The reference's flows for classification: DPM-Solver++ 20 steps for the image latents, reverse Euler 100 steps
# over the label anchors with uniform weights.
IMAGE_LATENT_OPTIONS = zoning.SolverOptions(solver="dpm_solver++", num_steps=20)
LABEL_FLOW_OPTIONS = zoning.SolverOptions(solver="euler", num_steps=100)


def nearest_label(endpoints: jax.Array, label_table: jax.Array) -> jax.Array:
    """Index (B,) of the label anchor nearest in squared Euclidean distance to each end point (B, D): the
    reference's decoding rule (the paper's text says arg-max inner product; docs/differences.md, item 14)."""
    distances = jnp.sum((endpoints[:, None, :] - label_table[None, :, :]) ** 2, axis=-1)
    return jnp.argmin(distances, axis=-1)


def classify(
    encoder,
    encoder_params,
    label_table: jax.Array,
    images: jax.Array,
    key: jax.Array,
    *,
    prior_scale: float = 1.0,
    latent_options: zoning.SolverOptions = IMAGE_LATENT_OPTIONS,
    label_options: zoning.SolverOptions = LABEL_FLOW_OPTIONS,
) -> jax.Array:
    """Predicted classes (B,) of ``images`` (B, H, W, C) in [-1, 1], solved as one batch.

    The encoder runs in evaluation mode; the image latents are computed against all B anchors with the prior draw
    ``prior_scale * N(0, I)`` from ``key``; the reverse label flow uses uniform class weights (the paper's
    test-time setting).
    """
    anchors = encoder.apply({"params": encoder_params}, images, train=False)
    anchors = (anchors.anchors if hasattr(anchors, "anchors") else anchors).astype(jnp.float32)
    noise = prior_scale * jax.random.normal(key, anchors.shape, jnp.float32)
    latents = zoning.compute_latents(anchors, noise, options=latent_options)
    endpoints = zoning.assign_targets(
        latents, label_table, jnp.zeros(latents.shape[0], jnp.int32), options=label_options
    ).endpoints
    return nearest_label(endpoints, label_table)
