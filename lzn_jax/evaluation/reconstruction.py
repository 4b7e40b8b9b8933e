"""Reconstruction error of the rectified-flow decoder (the paper's "Recon" column): invert each image to noise with
its own LZN latent, regenerate from that noise with the same latent, and measure the per-image L2 distance.

``reconstruction_distances`` is the pure, jittable computation over one batch; ``reconstruction_result`` turns its
output into a number with the protocol that produced it. docs/evaluation.md, "Reconstruction error", states the
protocol; docs/differences.md, item 15, the inversion form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax import sampling, zoning
from lzn_jax.evaluation.classification import IMAGE_LATENT_OPTIONS, eval_anchors
from lzn_jax.evaluation.fid import MetricResult
from lzn_jax.objectives.latents import latents_of


@dataclasses.dataclass(frozen=True)
class ReconstructionOptions:
    """How the reconstruction error is measured; frozen and hashable (a static argument of ``jax.jit``).

    Attributes:
      sampler: the image ODE for both inversion and regeneration (Euler 10 steps, the reference's "euler10", or
        Dormand-Prince, its "rk45", the paper's).
      num_draws: independent prior draws, each giving every image a fresh latent (20 in the reference). A model
        without an encoder has no draw to make: it is measured once.
      latent_options: the forward flow from anchors to latents (DPM-Solver++ 20 steps in the reference).
      prior_scale: alpha, the factor on the prior draw (1 in the reference).
      remove_image_part: None (default) inverts as the reference's sampler of the same kind does: Euler returns the
        ODE state at ``time_eps``, Dormand-Prince returns ``(x_eps - eps * image) / (1 - eps)`` like its RK45.
        True or False forces one form for either sampler (docs/differences.md, item 15).
    """

    sampler: sampling.SamplerOptions = sampling.EULER
    num_draws: int = 20
    latent_options: zoning.SolverOptions = IMAGE_LATENT_OPTIONS  # the classifier's: DPM-Solver++(3M), 20 steps
    prior_scale: float = 1.0
    remove_image_part: bool | None = None

    def __post_init__(self):
        if not isinstance(self.num_draws, (int, np.integer)) or self.num_draws < 1:
            raise ValueError(f"num_draws must be a positive int, got {self.num_draws!r}")
        if float(self.prior_scale) < 0.0:
            raise ValueError(f"prior_scale must be >= 0, got {self.prior_scale!r}")

    @property
    def removes_image_part(self) -> bool:
        """Whether the inversion returns the reference RK45's noise estimate instead of the ODE state."""
        if self.remove_image_part is None:
            return self.sampler.sampler == "dopri5"
        return bool(self.remove_image_part)

    def replace(self, **changes) -> ReconstructionOptions:
        return dataclasses.replace(self, **changes)


class Reconstructions(NamedTuple):
    """What one batch's reconstruction gives, per draw and image.

    distances: (num_draws, B) float32, ``||regenerated - image||_2`` over all H*W*C pixels in [-1, 1] units
      (one row for a model without an encoder).
    nfe: (num_draws, B) int32 decoder evaluations of the inversion plus the regeneration.
    """

    distances: jax.Array
    nfe: jax.Array


def _one_hot(decoder, labels: jax.Array | None) -> jax.Array | None:
    """The class one-hots (B, K) a class-conditional decoder takes, or None for one that takes none."""
    num_classes = getattr(decoder, "num_classes", 0)
    if num_classes <= 0:
        return None
    if labels is None:
        raise ValueError(f"the decoder is class-conditional ({num_classes} classes): pass the images' labels, which "
                         "the reference uses for both inversion and regeneration")
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _round_trip(decoder, decoder_params, images: jax.Array, latents: jax.Array | None,
                label_onehot: jax.Array | None, options: ReconstructionOptions) -> tuple[jax.Array, jax.Array]:
    """Invert ``images`` (B, H, W, C) to noise and regenerate, both with the same conditioning.
    Returns (distances (B,) float32, nfe (B,) int32)."""
    inverted = sampling.invert_images(decoder, decoder_params, images, latents=latents, label_onehot=label_onehot,
                                      options=options.sampler, remove_image_part=options.removes_image_part)
    regenerated = sampling.sample_images(decoder, decoder_params, inverted.x, latents=latents,
                                         label_onehot=label_onehot, options=options.sampler)
    difference = (regenerated.x - images).astype(jnp.float32).reshape(images.shape[0], -1)
    return jnp.sqrt(jnp.sum(difference**2, axis=-1)), inverted.nfe + regenerated.nfe


def reconstruction_distances(
    decoder,
    decoder_params: Any,
    images: jax.Array,
    key: jax.Array,
    *,
    encoder=None,
    encoder_params: Any = None,
    labels: jax.Array | None = None,
    options: ReconstructionOptions = ReconstructionOptions(),
) -> Reconstructions:
    """Per-draw, per-image reconstruction distances of one batch. Pure: callers jit (``options`` static).

    Draw ``d`` takes the prior noise ``prior_scale * N(0, I)`` from ``jax.random.fold_in(key, d)``; the latents of
    that draw are the forward flow of the batch's anchors against all B anchors (under an entered mesh the batch may
    be sharded by rows: every row is still solved against the whole batch). Each image is then inverted and
    regenerated with its own latent (and, for a class-conditional decoder, its true class).

    Args:
      decoder, decoder_params: the rectified-flow decoder (a module with ``latent_dim``; 0 is the RF baseline).
      images: (B, H, W, C) float32 in [-1, 1], the batch whose anchors define the zones.
      key: the draws' key.
      encoder, encoder_params: the image encoder; None for the rectified-flow baseline, which has no latent and so
        no draw: it is measured once (``distances`` has one row).
      labels: (B,) int class labels, needed by a class-conditional decoder.
    Returns:
      :class:`Reconstructions` with (num_draws, B) distances and NFEs.
    """
    label_onehot = _one_hot(decoder, labels)
    if encoder is None:
        if getattr(decoder, "latent_dim", 0) > 0:
            raise ValueError(f"the decoder takes a latent (latent_dim={decoder.latent_dim}); pass the encoder and its "
                             "params, or use a decoder with latent_dim=0 for the rectified-flow baseline")
        distances, nfe = _round_trip(decoder, decoder_params, images, None, label_onehot, options)
        return Reconstructions(distances[None], nfe[None])

    anchors = eval_anchors(encoder, encoder_params, images)

    def one_draw(draw: jax.Array) -> tuple[jax.Array, jax.Array]:
        noise = options.prior_scale * jax.random.normal(jax.random.fold_in(key, draw), anchors.shape, jnp.float32)
        latents = latents_of(anchors, noise, options.latent_options)
        return _round_trip(decoder, decoder_params, images, latents, label_onehot, options)

    # One draw at a time (a scan): 20 simultaneous decoder solves would hold 20 batches of activations.
    distances, nfe = jax.lax.map(one_draw, jnp.arange(options.num_draws, dtype=jnp.uint32))
    return Reconstructions(distances, nfe)


def _sampler_description(options: sampling.SamplerOptions) -> str:
    if options.sampler == "euler":
        return f"Euler, {options.num_steps} steps, t from {options.time_eps} to 1"
    return (f"Dormand-Prince 5(4) (diffrax), rtol {options.rtol}, atol {options.atol}, {options.error_norm} error "
            f"norm, t from {options.time_eps} to 1")


def _latent_description(options: ReconstructionOptions) -> str:
    latent = options.latent_options
    return f"{latent.solver} {latent.num_steps} steps (eps {latent.start_offset}), prior scale {options.prior_scale}"


def reconstruction_result(
    batches: Reconstructions | Sequence[Reconstructions],
    options: ReconstructionOptions,
    *,
    weights: str = "EMA",
    has_latent: bool = True,
    labels: str = "none",
) -> MetricResult:
    """The reconstruction error (mean over draws and images) with its protocol, from one or more batches' outputs.

    Args:
      batches: :func:`reconstruction_distances` of each batch (fetched to the host here).
      weights: which params were measured ("EMA" or "raw"); the function cannot tell.
      has_latent: False for the rectified-flow baseline (no encoder, one pass).
      labels: what the decoder was conditioned on besides the latent ("true class" for case study 3).
    """
    batches = [batches] if isinstance(batches, Reconstructions) else list(batches)
    distances = [np.asarray(jax.device_get(batch.distances), np.float64) for batch in batches]
    nfe = np.concatenate([np.asarray(jax.device_get(batch.nfe)).ravel() for batch in batches])
    # Every image counts once per draw: weight each batch by its size, as one big mean over images and draws.
    value = float(np.mean(np.concatenate([d.ravel() for d in distances])))
    batch_sizes = sorted({d.shape[1] for d in distances})
    inversion = ("(x_eps - eps * image) / (1 - eps), the reference RK45's" if options.removes_image_part
                 else "the ODE state at t = eps")
    protocol = {
        "distance": "per-image L2 over H*W*C pixels in [-1, 1], mean over images and draws",
        "sampler": _sampler_description(options.sampler),
        "inversion": inversion,
        "latent": _latent_description(options) if has_latent else "none (rectified-flow baseline)",
        "draws": distances[0].shape[0],
        "batch_size": batch_sizes[0] if len(batch_sizes) == 1 else batch_sizes,
        "images": int(sum(d.shape[1] for d in distances)),
        "labels": labels,
        "weights": weights,
        "mean_nfe": float(np.mean(nfe)),
    }
    return MetricResult("reconstruction_l2", value, protocol)
