"""The rectified-flow decoder as the velocity field of the image ODE, and sampling / inversion with it.
Time: 0 = noise, 1 = data (the decoder's convention)."""

from __future__ import annotations

from typing import Any

import jax

from lzn_jax.sampling.ode import EULER, SamplerOptions, Solution, Velocity, invert, sample


def decoder_velocity(decoder, params: Any) -> Velocity:
    """``velocity(x, t, conditioning)`` of a decoder module in evaluation mode (no dropout).

    x: (B, H, W, C); t: (B,); conditioning: ``(latents (B, D) or None, label_onehot (B, K) or None)`` or None.
    Returns (B, H, W, C), the decoder's prediction of ``data - noise``.
    """

    def velocity(x: jax.Array, t: jax.Array, conditioning: Any) -> jax.Array:
        latents, label_onehot = (None, None) if conditioning is None else conditioning
        return decoder.apply({"params": params}, x, t, latents, label_onehot, train=False)

    return velocity


def sample_images(decoder, params: Any, noise: jax.Array, *, latents: jax.Array | None = None,
                  label_onehot: jax.Array | None = None, options: SamplerOptions = EULER) -> Solution:
    """Images (B, H, W, C) float32, nominally in [-1, 1] (not clipped), from ``noise`` (B, H, W, C) placed at time
    ``options.time_eps``, conditioned on ``latents`` (B, D) and ``label_onehot`` (B, K) where the decoder takes
    them. Returns a :class:`Solution` ``(images, nfe (B,))``."""
    return sample(decoder_velocity(decoder, params), noise, (latents, label_onehot), options=options)


def invert_images(decoder, params: Any, images: jax.Array, *, latents: jax.Array | None = None,
                  label_onehot: jax.Array | None = None, options: SamplerOptions = EULER,
                  remove_image_part: bool = False) -> Solution:
    """The noise (B, H, W, C) at time ``options.time_eps`` that :func:`sample_images` maps to ``images``
    (B, H, W, C) in [-1, 1], with the same conditioning as sampling (the reconstruction metric uses the image's own
    latent). ``remove_image_part``: see :func:`lzn_jax.sampling.invert`. Returns ``(noise, nfe (B,))``."""
    return invert(decoder_velocity(decoder, params), images, (latents, label_onehot), options=options,
                  remove_image_part=remove_image_part)


def euler_sample(decoder, params: Any, noise: jax.Array, *, latents: jax.Array | None = None,
                 label_onehot: jax.Array | None = None, num_steps: int = 10, time_eps: float = 1e-3) -> jax.Array:
    """Images (B, H, W, C) of :func:`sample_images` with ``num_steps`` Euler steps (the reference's "euler10" by
    default), without the NFE; the training loop's sample grids use it."""
    options = SamplerOptions(sampler="euler", num_steps=num_steps, time_eps=time_eps)
    return sample_images(decoder, params, noise, latents=latents, label_onehot=label_onehot, options=options).x
