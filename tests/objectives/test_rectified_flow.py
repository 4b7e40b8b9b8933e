"""The image rectified-flow pair and loss (docs/method.md): times in [eps, 1], exact interpolation, plain L2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax.objectives import rectified_flow_loss, rectified_flow_pair


@pytest.mark.parametrize("time_eps", [1e-3, 0.4])
def test_times_lie_in_eps_1_and_cover_it(time_eps):
    images = jnp.zeros((4096, 1, 1, 1), jnp.float32)
    t = np.asarray(rectified_flow_pair(images, jax.random.key(0), time_eps=time_eps).rf_time)
    assert t.shape == (4096,) and t.dtype == np.float32
    assert t.min() >= np.float32(time_eps) and t.max() <= 1.0
    assert t.min() < time_eps + 0.01 and t.max() > 0.99  # uniform over the whole interval
    assert abs(t.mean() - (1.0 + time_eps) / 2) < 0.02


def test_pair_interpolates_noise_and_data_exactly():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (64, 5, 6, 3)), jnp.float32)
    pair = rectified_flow_pair(images, jax.random.key(1), time_eps=1e-3)
    x, t = np.asarray(images), np.asarray(pair.rf_time)
    # x_t = t x + (1 - t) n and target = x - n: n is the same in both.
    noise = x - np.asarray(pair.target_velocity)
    tt = t[:, None, None, None]
    np.testing.assert_allclose(np.asarray(pair.noisy_images), tt * x + (1 - tt) * noise, rtol=0, atol=1e-6)
    assert pair.noisy_images.shape == images.shape and pair.noisy_images.dtype == jnp.float32
    # n is a fresh standard normal image per row, not shared across the batch and independent of t.
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
    assert not np.allclose(noise[0], noise[1])
    assert abs(np.corrcoef(t, noise.reshape(64, -1).mean(axis=1))[0, 1]) < 0.5
    # With eps -> 1 every time is 1 and the noisy image is the data.
    ends = rectified_flow_pair(images[:2], jax.random.key(1), time_eps=1.0 - 1e-7)
    np.testing.assert_allclose(np.asarray(ends.noisy_images), x[:2], atol=1e-5)


def test_pair_is_a_function_of_the_key():
    images = jnp.ones((4, 2, 2, 1), jnp.float32)
    a, b = rectified_flow_pair(images, jax.random.key(5)), rectified_flow_pair(images, jax.random.key(5))
    c = rectified_flow_pair(images, jax.random.key(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a.rf_time, c.rf_time)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_is_the_batch_mean_of_per_image_mean_squared_errors(dtype):
    rng = np.random.default_rng(2)
    predicted = rng.standard_normal((5, 3, 4, 2)) * np.arange(1, 6)[:, None, None, None]  # rows of different scale
    target = rng.standard_normal((5, 3, 4, 2))
    predicted_in = jnp.asarray(predicted, dtype)
    loss = rectified_flow_loss(predicted_in, jnp.asarray(target, jnp.float32))
    predicted_seen = np.asarray(predicted_in.astype(jnp.float32), np.float64)
    expected = np.mean([np.mean((target[b] - predicted_seen[b]) ** 2) for b in range(5)])
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_loss_of_a_perfect_prediction_is_zero_and_gradient_is_the_scaled_error():
    rng = np.random.default_rng(3)
    target = jnp.asarray(rng.standard_normal((3, 2, 2, 1)), jnp.float32)
    assert float(rectified_flow_loss(target, target)) == 0.0
    predicted = jnp.asarray(rng.standard_normal((3, 2, 2, 1)), jnp.float32)
    grad = jax.grad(rectified_flow_loss)(predicted, target)
    # d/dp mean_b mean_pixels (t - p)^2 = -2 (t - p) / (B * pixels)
    np.testing.assert_allclose(grad, -2.0 * (target - predicted) / target.size, rtol=1e-6)
