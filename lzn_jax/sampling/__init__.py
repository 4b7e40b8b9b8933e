"""Image samplers of the rectified-flow decoder (Euler, adaptive Dormand-Prince), inversion, the latents generation
starts from, sample grids and per-host sample files (docs/design.md, "Sampling")."""

from lzn_jax.sampling.decoder import decoder_velocity, euler_sample, invert_images, sample_images
from lzn_jax.sampling.grids import class_grid, image_grid, to_uint8, write_grid
from lzn_jax.sampling.latents import CLASS_LATENT_OPTIONS, class_conditional_latents, unconditional_latents
from lzn_jax.sampling.ode import (
    DOPRI5,
    EULER,
    SamplerOptions,
    Solution,
    Velocity,
    dopri5_evaluations,
    dopri5_solve,
    euler_solve,
    integrate,
    invert,
    sample,
)
from lzn_jax.sampling.sample_files import (
    SampleSetError,
    local_rows,
    read_samples,
    write_sample_part,
    write_samples,
)

__all__ = [
    "CLASS_LATENT_OPTIONS",
    "DOPRI5",
    "EULER",
    "SampleSetError",
    "SamplerOptions",
    "Solution",
    "Velocity",
    "class_conditional_latents",
    "class_grid",
    "decoder_velocity",
    "dopri5_evaluations",
    "dopri5_solve",
    "euler_sample",
    "euler_solve",
    "image_grid",
    "integrate",
    "invert",
    "invert_images",
    "local_rows",
    "read_samples",
    "sample",
    "sample_images",
    "to_uint8",
    "unconditional_latents",
    "write_grid",
    "write_sample_part",
    "write_samples",
]
