"""Generation latents: Gaussian draws, and class latents by the forward Euler label flow (uniform weights over the
label anchors, eps 1e-4, 100 steps) against a float64 NumPy flow written from the method's formulas."""

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax import sampling


def numpy_label_flow(table, labels, noise, *, num_steps=100, eps=1e-4):
    """x = eps * noise + (1 - eps) * a_k at t = eps, then x += h (x - posterior mean) / t up to t = 1, where the
    posterior over the C anchors is N(x; (1 - t) a_j, t^2 I) with equal weights."""
    x = eps * noise + (1 - eps) * table[labels]
    h = (1 - eps) / num_steps
    for k in range(num_steps):
        t = eps + k * h
        logits = -0.5 * np.sum((x[:, None, :] - (1 - t) * table[None]) ** 2, -1) / t**2
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        mean = (weights / weights.sum(-1, keepdims=True)) @ table
        x = x + h * (x - mean) / t
    return x


def test_class_latents_follow_the_uniform_label_flow(x64):
    rng = np.random.default_rng(0)
    table = 2.0 * rng.standard_normal((10, 4))
    labels = np.arange(20) % 10
    noise = rng.standard_normal((20, 4))
    latents = sampling.class_conditional_latents(jnp.asarray(table), jnp.asarray(labels), jnp.asarray(noise))
    np.testing.assert_allclose(latents, numpy_label_flow(table, labels, noise), rtol=1e-9, atol=1e-9)
    assert np.abs(np.asarray(latents) - noise).max() > 0.1  # the anchors moved the latents off the noise


def test_unconditional_latents_are_standard_normal():
    latents = np.asarray(sampling.unconditional_latents(jax.random.key(0), 4096, 8))
    assert latents.shape == (4096, 8) and latents.dtype == np.float32
    assert np.abs(latents.mean(0)).max() < 0.06 and np.abs(latents.std(0) - 1).max() < 0.05
    np.testing.assert_allclose(np.corrcoef(latents.T), np.eye(8), atol=0.06)
