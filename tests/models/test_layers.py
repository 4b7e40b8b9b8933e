"""NCSN++ building blocks against closed forms and an independent float64 NumPy implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax.models import layers
from tests.models import numpy_reference as ref


def _uniform_bound(scale, fan):
    return math.sqrt(3.0 * scale / fan)


@pytest.mark.parametrize("scale", [1.0, 0.1, 0.0])
def test_ddpm_init_is_fan_avg_uniform_with_zero_replaced(scale):
    shape = (3, 3, 64, 32)
    w = np.asarray(layers.ddpm_init(scale)(jax.random.key(0), shape))
    fan_avg = 9 * (64 + 32) / 2
    bound = _uniform_bound(1e-10 if scale == 0 else scale, fan_avg)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.99 * bound  # uniform, not normal or truncated
    np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.05)  # variance of U(-a, a) is a^2 / 3
    assert np.any(w != 0)


def test_torch_linear_matches_pytorch_default_init_and_affine_map():
    module = layers.TorchLinear(300)
    x = jax.random.normal(jax.random.key(1), (4, 50))
    params = module.init(jax.random.key(0), x)["params"]
    bound = 1 / math.sqrt(50)
    for name in ("kernel", "bias"):
        values = np.asarray(params[name])
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.95 * bound
    np.testing.assert_allclose(module.apply({"params": params}, x), x @ params["kernel"] + params["bias"], rtol=1e-5)


def test_group_norm_uses_min_quarter_channels_and_32_groups():
    assert layers.group_norm(8).num_groups == 2
    assert layers.group_norm(64).num_groups == 16
    assert layers.group_norm(256).num_groups == 32
    assert layers.group_norm(64).epsilon == 1e-6


@pytest.mark.parametrize("kernel_1d", [(1, 3, 3, 1), (1, 2, 4, 3)])
def test_fir_resampling_matches_literal_upfirdn(kernel_1d):
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 6, 8, 3)))
    k = np.outer(kernel_1d, kernel_1d).astype(np.float64)
    k /= k.sum()
    # Up: gain factor^2 = 4, pads ((p + 1) // 2 + factor - 1, p // 2) with p = 4 - 2.
    expected_up = ref.upfirdn2d(x, 4 * k, up=2, pad=(2, 1))
    np.testing.assert_allclose(layers.fir_upsample_2d(jnp.asarray(x), kernel_1d), expected_up, atol=1e-5)
    expected_down = ref.upfirdn2d(x, k, down=2, pad=(1, 1))
    np.testing.assert_allclose(layers.fir_downsample_2d(jnp.asarray(x), kernel_1d), expected_down, atol=1e-5)
    assert expected_up.shape == (2, 12, 16, 3) and expected_down.shape == (2, 3, 4, 3)


def test_naive_resampling_closed_forms():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    up = np.asarray(layers.naive_upsample_2d(x))
    np.testing.assert_array_equal(up[:, 2 * 1 + 1, 2 * 3, :], x[:, 1, 3, :])
    down = np.asarray(layers.naive_downsample_2d(x))
    np.testing.assert_allclose(down[:, 1, 0, :], x[:, 2:4, 0:2, :].mean(axis=(1, 2)))
    np.testing.assert_allclose(layers.naive_downsample_2d(layers.naive_upsample_2d(x)), x)


def test_sinusoidal_embedding_closed_form():
    t = np.array([0.0, 1.0, 37.5, 998.0])
    dim = 16
    emb = np.asarray(layers.sinusoidal_embedding(jnp.asarray(t), dim))
    k = np.arange(dim // 2)
    freqs = 10000.0 ** (-k / (dim // 2 - 1))  # first frequency 1, last 1/10000
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb, expected, atol=2e-4)  # float32 arguments up to ~1e3 radians
    assert layers.sinusoidal_embedding(jnp.asarray(t), 7).shape == (4, 7)


def test_gaussian_fourier_projection_closed_form_and_frozen_frequencies():
    module = layers.GaussianFourierProjection(embedding_size=2048, scale=16.0)
    x = jnp.asarray([-1.5, 0.0, 2.0, 6.9])
    params = module.init(jax.random.key(0), x)["params"]
    w = np.asarray(params["frequencies"], np.float64)
    assert w.shape == (2048,)
    np.testing.assert_allclose(w.std(), 16.0, rtol=0.06)
    proj = 2 * np.pi * np.asarray(x, np.float64)[:, None] * w[None]
    expected = np.concatenate([np.sin(proj), np.cos(proj)], axis=-1)
    np.testing.assert_allclose(module.apply({"params": params}, x), expected, atol=5e-4)
    grad = jax.grad(lambda p: module.apply({"params": p}, x).sum())(params)
    assert not np.any(np.asarray(grad["frequencies"]))


@pytest.mark.parametrize(
    "channels_out, resample, fir, with_temb",
    [(8, None, False, True), (12, None, False, False), (8, "down", False, True), (12, "down", True, True),
     (8, "up", False, False), (12, "up", True, True)],
)
def test_resnet_block_matches_numpy(channels_out, resample, fir, with_temb):
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 8))
    temb = jax.random.normal(jax.random.key(4), (2, 5)) if with_temb else None
    # init_scale 1 so the second conv is not ~0 and really enters the comparison.
    block = layers.ResnetBlockBigGAN(
        out_ch=channels_out, up=resample == "up", down=resample == "down", fir=fir, init_scale=1.0
    )
    # Random params (norm affines included) so the comparison also checks scale/bias placement.
    params = ref.random_params(block, x, temb)["params"]
    out = block.apply({"params": params}, x, temb)
    expected = ref.resnet_block_biggan(
        ref.to_numpy(params), np.asarray(x), None if temb is None else np.asarray(temb), resample=resample, fir=fir
    )
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


def test_resnet_block_starts_as_scaled_identity_with_zero_init_scale():
    x = jax.random.normal(jax.random.key(6), (2, 8, 8, 8))
    block = layers.ResnetBlockBigGAN(init_scale=0.0)
    params = block.init(jax.random.key(7), x)
    # conv_1 weights are ~1e-6 (scale 1e-10), so the residual branch adds only ~1e-5.
    np.testing.assert_allclose(block.apply(params, x), x / np.sqrt(2), atol=1e-4)


def test_attention_block_matches_numpy():
    x = jax.random.normal(jax.random.key(8), (2, 4, 4, 16))
    block = layers.AttnBlock(init_scale=1.0)
    params = ref.random_params(block, x)["params"]
    np.testing.assert_allclose(block.apply({"params": params}, x), ref.attn_block(ref.to_numpy(params), np.asarray(x)),
                               rtol=2e-4, atol=2e-4)


def test_combine_is_conv1x1_plus_h():
    pyramid = jax.random.normal(jax.random.key(10), (1, 4, 4, 3))
    h = jax.random.normal(jax.random.key(11), (1, 4, 4, 8))
    module = layers.Combine()
    params = ref.random_params(module, pyramid, h)["params"]
    expected = ref.conv2d(pyramid, params["conv"]["kernel"], params["conv"]["bias"]) + np.asarray(h)
    np.testing.assert_allclose(module.apply({"params": params}, pyramid, h), expected, rtol=1e-5, atol=1e-5)
