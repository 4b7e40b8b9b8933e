"""Latent zoning on the embedded digits, with no training: what the solver does to real data.

A fixed random projection encodes each 16x16 digit to an anchor in R^D. The latent zoning solver maps the batch's
anchors (plus a little Gaussian noise) to latents, sharded over all devices; the latents should look like N(0, I)
samples. The reverse flow then sends each latent back; the zone-assignment accuracy is the fraction of latents
whose reverse flow ends at their own anchor (the paper's disjoint zones, docs/method.md).

An entry point of ``lzn_jax.main``: it jits its own round trip, as a trainer would.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lzn_jax import data, parallel, zoning


def encode(images: jax.Array, latent_dim: int, key: jax.Array) -> jax.Array:
    """A fixed random linear encoder: (B, H, W, C) uint8 -> (B, latent_dim) anchors of unit scale per coordinate.

    The projection is scaled by 1/sqrt(pixels) and the pixels are in [-1, 1], so anchor coordinates are O(1).
    """
    pixels = data.to_float_images(images).reshape(images.shape[0], -1)
    projection = jax.random.normal(key, (pixels.shape[1], latent_dim), jnp.float32)
    return pixels @ projection / jnp.sqrt(pixels.shape[1])


def zoning_round_trip(anchors, noise, *, forward: zoning.SolverOptions, reverse: zoning.SolverOptions):
    """Latents of every row (forward flow against the whole batch) and the reverse flow's assigned anchor, on
    the mesh entered with ``jax.set_mesh``.

    Returns:
      ``(latents (B, D), assigned (B,) int)``: the arg-max of the last reverse-step posterior.
    """
    latents = zoning.compute_latents_sharded(anchors, noise, options=forward)
    _, log_probs = zoning.assign_sharded(latents, anchors, options=reverse)
    return latents, jnp.argmax(log_probs[-1], axis=-1)


def run(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Runs the demo and returns its metrics (also printed)."""
    mesh = parallel.data_mesh()
    forward = zoning.SolverOptions(solver=config.solver, num_steps=config.num_steps)
    reverse = zoning.SolverOptions(solver="euler", num_steps=config.reverse_num_steps)
    encoder_key, noise_key = jax.random.split(jax.random.key(config.seed))
    with jax.set_mesh(mesh):
        batches = data.build_pipeline(config.data, sharding=parallel.batch_sharding(mesh))
        batch = next(batches)
        anchors = jax.jit(encode, static_argnums=1)(batch["image"], config.latent_dim, encoder_key)
        noise = jax.jit(lambda key: config.prior_scale * jax.random.normal(key, anchors.shape),
                        out_shardings=anchors.sharding)(noise_key)
        round_trip = jax.jit(lambda a, n: zoning_round_trip(a, n, forward=forward, reverse=reverse))
        start = time.perf_counter()
        latents, assigned = jax.block_until_ready(round_trip(anchors, noise))
        seconds = time.perf_counter() - start
    latents, assigned = jax.device_get((latents, assigned))
    metrics = {
        "batch_size": float(latents.shape[0]),
        "zone_accuracy": float(np.mean(assigned == np.arange(latents.shape[0]))),
        "latent_mean": float(latents.mean()),
        "latent_std": float(latents.std()),
        "anchor_std": float(np.std(jax.device_get(anchors))),
        "seconds_with_compile": seconds,
    }
    print(f"latent zoning on {latents.shape[0]} real digits (D={config.latent_dim}, {jax.device_count()} devices, "
          f"{config.solver} {config.num_steps} steps, reverse Euler {config.reverse_num_steps} steps)")
    for name, value in metrics.items():
        print(f"  {name:<22} {value:.4f}")
    return metrics
