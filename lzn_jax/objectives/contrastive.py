"""LZN contrastive representation learning (case study 2): the latents of view 0 must flow back, under the
reverse flow over view 1's anchors, to the anchor of the same image. No negatives, no predictor, no stop-gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.custom_derivatives import SymbolicZero

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
    # Encode the views in this many sequential chunks, twice (encoded_in_chunks): activation memory / chunks.
    encoder_chunks: int = 1

    def __post_init__(self):
        if int(self.encoder_chunks) < 1:
            raise ValueError(f"contrastive.encoder_chunks must be a positive int, got {self.encoder_chunks!r}")

    @classmethod
    def from_config(cls, block: ml_collections.ConfigDict) -> "ContrastiveSettings":
        return cls(
            latent_options=solver_options(block.latent_solver),
            prior_scale=float(block.prior_scale),
            alignment_options=solver_options(block.alignment_solver),
            cut_off=float(block.cut_off),
            prob_loss_weight=float(block.prob_loss_weight),
            log_loss_weight=float(block.log_loss_weight),
            encoder_chunks=int(block.get("encoder_chunks", 1)),
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


def _split_rows(rows: jax.Array, chunks: int) -> jax.Array:
    """(R, ...) -> (R / chunks, chunks, ...): chunk c holds rows c, c + chunks, ...; a free reshape that keeps a
    row-sharded array sharded, so each device's chunk is a slice of its own rows."""
    return rows.reshape(rows.shape[0] // chunks, chunks, *rows.shape[1:])


def _chunk(split: jax.Array, index) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(split, index, axis=1, keepdims=False)


def _chunk_anchors(encoder, params, split: jax.Array, key: jax.Array, index) -> jax.Array:
    """Anchors (R / chunks, D) of chunk ``index``, with the chunk's own dropout key ``fold_in(key, index)``."""
    return encoder_anchors(encoder, params, _chunk(split, index), jax.random.fold_in(key, index))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def encoded_in_chunks(encoder, params, rows: jax.Array, key: jax.Array, chunks: int) -> jax.Array:
    """Anchors (R, D) float32 of ``rows`` (R, ...), encoded in ``chunks`` sequential chunks, keeping only one
    chunk's activations alive, in the forward and in the backward pass.

    Gradient caching: the forward pass encodes every chunk without keeping activations. The backward pass
    encodes each chunk again and pulls its slice of the anchors' cotangent (which the zoning solver computed
    over the whole batch) back into the parameters, summing over chunks. The gradient is the one-pass gradient,
    up to float32 summation order, for one extra forward pass of the encoder. Chunk ``c`` holds rows ``c,
    c + chunks, ...`` and draws its dropout masks from ``fold_in(key, c)``, in both passes. The rows are data:
    differentiating with respect to them is refused, and so is forward-mode differentiation (``jax.jvp``), which
    a custom VJP does not support.
    """
    split = _split_rows(rows, chunks)
    per_chunk = jax.lax.map(lambda index: _chunk_anchors(encoder, params, split, key, index), jnp.arange(chunks))
    return jnp.swapaxes(per_chunk, 0, 1).reshape(rows.shape[0], per_chunk.shape[-1])


def _encoded_in_chunks_fwd(encoder, params, rows, key, chunks):
    # With symbolic zeros, each array arrives wrapped, with whether it is differentiated.
    if getattr(rows, "perturbed", False):
        raise NotImplementedError("encoded_in_chunks differentiates the anchors with respect to the encoder's "
                                  "parameters only, not the images; use contrastive.encoder_chunks=1 for input "
                                  "gradients")
    params, rows, key = jax.tree.map(lambda leaf: getattr(leaf, "value", leaf), (params, rows, key),
                                     is_leaf=lambda leaf: hasattr(leaf, "perturbed"))
    return encoded_in_chunks(encoder, params, rows, key, chunks), (params, rows, key)


def _encoded_in_chunks_bwd(encoder, chunks, residuals, g_anchors):
    params, rows, key = residuals
    if type(g_anchors) is SymbolicZero:
        g_anchors = jnp.zeros(g_anchors.shape, g_anchors.dtype)
    split, g_split = _split_rows(rows, chunks), _split_rows(g_anchors, chunks)

    def accumulate(g_params, index):
        _, pull_back = jax.vjp(lambda p: _chunk_anchors(encoder, p, split, key, index), params)
        return jax.tree.map(lambda total, g: total + g.astype(total.dtype), g_params,
                            pull_back(_chunk(g_split, index))[0]), None

    # Summed in at least float32 whatever the parameters' dtype, then cast back.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    g_params, _ = jax.lax.scan(accumulate, zeros, jnp.arange(chunks))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), g_params, params), None, None


encoded_in_chunks.defvjp(_encoded_in_chunks_fwd, _encoded_in_chunks_bwd, symbolic_zeros=True)


def two_view_anchors(encoder, params, views: jax.Array, key: jax.Array, chunks: int = 1
                     ) -> tuple[jax.Array, jax.Array]:
    """Anchors (B, D) float32 of view 0 and of view 1 of ``views`` (B, 2, S, S, 3), from one encoder pass.

    The (B, 2) leading axes are merged in place into 2B rows (image b's views are rows 2b and 2b + 1), so a batch
    sharded over devices stays sharded: each device encodes the views of its own images. (Moving the view axis to
    the front, or vmapping over it, interleaves it with the sharded batch axis, and XLA then gathers the whole
    global batch onto every device.) One pass with one dropout key draws every row's dropout mask independently,
    as the reference's two passes with two draws do; the encoders normalise per image, so no view sees another.
    With ``chunks > 1`` the rows go through :func:`encoded_in_chunks` (each chunk its own dropout key).
    """
    batch = views.shape[0]
    rows = views.reshape(batch * 2, *views.shape[2:])
    if chunks == 1:
        anchors = encoder_anchors(encoder, params, rows, key)
    else:
        if rows.shape[0] % chunks:
            raise ValueError(f"contrastive.encoder_chunks={chunks} does not divide the {rows.shape[0]} encoder rows "
                             f"(2 views x {batch} images) of this batch")
        anchors = encoded_in_chunks(encoder, params, rows, key, chunks)
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
    anchors_0, anchors_1 = two_view_anchors(modules.encoder, params["encoder"], views, dropout_key,
                                            settings.encoder_chunks)
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
