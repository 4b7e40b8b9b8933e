"""Image samplers of the rectified-flow decoder and the latents they start from (docs/method.md, "Sampling")."""

from lzn_jax.sampling.euler import class_conditional_latents, euler_sample, image_grid, to_uint8

__all__ = ["class_conditional_latents", "euler_sample", "image_grid", "to_uint8"]
