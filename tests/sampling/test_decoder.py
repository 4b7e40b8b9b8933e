"""The samplers with a small NCSN++ rectified-flow decoder: the Euler sampler of the training loop is the plain Euler
loop over the decoder, and Dormand-Prince inversion per sample (vmap over the Flax module) is undone by sampling."""

import functools

import jax
import numpy as np
import pytest

from lzn_jax import models, sampling
from tests.objectives import tiny

FAST = {"xla_backend_optimization_level": 0}
BATCH, SIZE, LATENT_DIM, NUM_CLASSES = 4, 8, 4, 10
# One level, no attention: the smallest decoder with every input the samplers pass (latent, one-hot, time).
DECODER = dict(name="ncsnpp_decoder", latent_dim=LATENT_DIM, num_classes=NUM_CLASSES, nf=8, ch_mult=(1,),
               num_res_blocks=1, attn_resolutions=(), dropout=0.0, fir=False, progressive_input="none",
               embedding_type="positional", progressive="none", scale_by_sigma=False)


@pytest.fixture(scope="module")
def decoder_problem():
    """(decoder, params, images (4, 8, 8, 1), latents (4, 4), one-hot labels (4, 10)), built once."""
    decoder = models.build(DECODER)
    init = jax.jit(decoder.init, compiler_options=FAST)
    params = init(jax.random.key(0), *decoder.example_inputs(1, SIZE, 1))["params"]
    # The output convolution starts at zero; small noise on every weight makes the velocity field non-zero.
    params = tiny.perturbed(params, 0, scale=0.02)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((BATCH, LATENT_DIM)).astype(np.float32)
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, BATCH)]
    images = rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 1)).astype(np.float32)
    return decoder, params, images, latents, onehot


def test_euler_sample_is_the_euler_loop_over_the_decoder(decoder_problem):
    decoder, params, noise, latents, onehot = decoder_problem
    sample = jax.jit(functools.partial(sampling.euler_sample, decoder), compiler_options=FAST)
    images = sample(params, noise, latents=latents, label_onehot=onehot)

    apply = jax.jit(lambda x, t, z, y: decoder.apply({"params": params}, x, t, z, y, train=False),
                    compiler_options=FAST)
    x, h = noise, (1.0 - 1e-3) / 10
    for k in range(10):
        x = x + h * np.asarray(apply(x, np.full(len(x), 1e-3 + k * h, np.float32), latents, onehot))
    np.testing.assert_allclose(images, x, rtol=1e-5, atol=1e-5)
    assert np.abs(x - noise).max() > 0.1  # the decoder moved the noise

    other = sample(params, noise, latents=latents[::-1], label_onehot=onehot)
    assert np.abs(np.asarray(other) - np.asarray(images)).max() > 1e-3  # the latents reach the decoder


def test_dopri5_inversion_of_the_decoder_is_undone_by_sampling(decoder_problem):
    decoder, params, images, latents, onehot = decoder_problem
    images, latents, onehot = images[:2], latents[:2], onehot[:2]  # two rows: ~150 evaluations per solve
    options = sampling.DOPRI5.replace(error_norm="per_sample")

    @functools.partial(jax.jit, compiler_options=FAST)
    def round_trip(params, images, latents, onehot):
        noise = sampling.invert_images(decoder, params, images, latents=latents, label_onehot=onehot, options=options)
        again = sampling.sample_images(decoder, params, noise.x, latents=latents, label_onehot=onehot,
                                       options=options)
        return noise, again

    noise, again = round_trip(params, images, latents, onehot)
    assert np.abs(np.asarray(noise.x) - images).max() > 0.1
    # The round trip is off by the tolerance times the flow's amplification (a random decoder is a rough field).
    np.testing.assert_allclose(again.x, images, atol=1e-2)
    assert (np.asarray(noise.nfe) > 13).all() and (np.asarray(again.nfe) > 13).all()
