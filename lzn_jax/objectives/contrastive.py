"""LZN contrastive representation learning (case study 2): the latents of view 0 must flow back, under the
reverse flow over view 1's anchors, to the anchor of the same image. No negatives, no predictor, no stop-gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from lzn_jax import zoning
from lzn_jax.objectives.generation import solver_options
from lzn_jax.objectives.latents import latents_of, target_log_probs_of


@dataclasses.dataclass(frozen=True)
class ContrastiveSettings:
    """The contrastive objective's settings (``config.contrastive``)."""

    latent_options: zoning.SolverOptions = zoning.SolverOptions(solver="euler", num_steps=20, eps=1e-4)
    prior_scale: float = 0.45
    alignment_options: zoning.SolverOptions = zoning.SolverOptions(solver="euler", num_steps=20)
    cut_off: float = 0.2
    prob_loss_weight: float = 0.0
    log_loss_weight: float = 1.0

    @classmethod
    def from_config(cls, block: ml_collections.ConfigDict) -> "ContrastiveSettings":
        return cls(
            latent_options=solver_options(block.latent_solver),
            prior_scale=float(block.prior_scale),
            alignment_options=solver_options(block.alignment_solver),
            cut_off=float(block.cut_off),
            prob_loss_weight=float(block.prob_loss_weight),
            log_loss_weight=float(block.log_loss_weight),
        )


class ContrastiveOutputs(NamedTuple):
    """The objective's value and its diagnostics (scalars; the diagnostics carry no gradient)."""

    loss: jax.Array
    prob_loss: jax.Array  # -mean_b max_{s >= u} P[s, b, b]
    log_loss: jax.Array  # -mean_b log max_{s >= u} P[s, b, b]
    assignment_acc: jax.Array  # mean_b P[last step, b, b]: a mean probability, as the reference logs it
    ode_error: jax.Array  # mean_b |a1[j_b] - end_b| / |a1[j_b]|, j_b the view-1 anchor nearest to end_b


def encoder_anchors(encoder, params, images: jax.Array, key: jax.Array) -> jax.Array:
    """Anchors (B, D) float32 of ``images``; ResNet encoders return (anchors, features), NCSN++ ones an array."""
    output = encoder.apply({"params": params}, images, train=True, rngs={"dropout": key})
    anchors = output.anchors if hasattr(output, "anchors") else output
    return anchors.astype(jnp.float32)


def two_view_anchors(encoder, params, views: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Anchors (B, D) float32 of view 0 and of view 1 of ``views`` (B, 2, S, S, 3), from one encoder pass.

    The (B, 2) leading axes are merged in place into 2B rows (image b's views are rows 2b and 2b + 1), so a batch
    sharded over devices stays sharded: each device encodes the views of its own images. (Moving the view axis to
    the front, or vmapping over it, interleaves it with the sharded batch axis, and XLA then gathers the whole
    global batch onto every device.) One pass with one dropout key draws every row's dropout mask independently,
    as the reference's two passes with two draws do; the encoders normalise per image, so no view sees another.
    """
    batch = views.shape[0]
    anchors = encoder_anchors(encoder, params, views.reshape(batch * 2, *views.shape[2:]), key)
    anchors = anchors.reshape(batch, 2, anchors.shape[-1])
    return anchors[:, 0], anchors[:, 1]


def _ode_error(anchors: jax.Array, endpoints: jax.Array) -> jax.Array:
    """Relative distance from each reverse-flow end point to its nearest anchor.

    The reference measures it to the arg-max of the last recorded posterior (at t = 1/S); the final Euler step
    lands on that posterior's mean, so the nearest anchor is the same one whenever the zones are resolved.
    """
    anchors, endpoints = jax.lax.stop_gradient((anchors, endpoints))
    distances = (jnp.sum(endpoints**2, -1)[:, None] - 2.0 * endpoints @ anchors.T + jnp.sum(anchors**2, -1)[None])
    nearest = anchors[jnp.argmin(distances, axis=-1)]
    return jnp.mean(jnp.linalg.norm(nearest - endpoints, axis=-1) / jnp.linalg.norm(nearest, axis=-1))


def contrastive_loss(
    params: dict[str, Any],
    views: jax.Array,
    key: jax.Array,
    *,
    modules,
    settings: ContrastiveSettings,
) -> ContrastiveOutputs:
    """The LZN contrastive loss of one global batch of two-view images.

    Args:
      params: ``{"encoder": ...}``.
      views: (B, 2, S, S, 3) float32 in [-1, 1], two augmentations of each image.
      key: this step's key (prior draw and dropout).
    Returns:
      ContrastiveOutputs; ``loss = prob_loss_weight * prob_loss + log_loss_weight * log_loss``.
    """
    prior_key, dropout_key = jax.random.split(key)
    anchors_0, anchors_1 = two_view_anchors(modules.encoder, params["encoder"], views, dropout_key)
    noise = settings.prior_scale * jax.random.normal(prior_key, anchors_0.shape, jnp.float32)
    latents = latents_of(anchors_0, noise, settings.latent_options)
    targets = jnp.arange(anchors_1.shape[0], dtype=jnp.int32)
    assignment = target_log_probs_of(
        latents, anchors_1, targets, settings.alignment_options, context_is_batch=True
    )
    log_probs = assignment.target_log_probs
    prob_loss = zoning.target_alignment_loss(log_probs, cut_off=settings.cut_off, use_log=False)
    log_loss = zoning.target_alignment_loss(log_probs, cut_off=settings.cut_off, use_log=True)
    loss = settings.prob_loss_weight * prob_loss + settings.log_loss_weight * log_loss
    assignment_acc = jax.lax.stop_gradient(jnp.mean(jnp.exp(log_probs[-1])))
    return ContrastiveOutputs(loss, prob_loss, log_loss, assignment_acc, _ode_error(anchors_1, assignment.endpoints))
