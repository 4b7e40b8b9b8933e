"""LZN generation (case studies 1 and 3): encoder -> anchors -> latents through the zoning solver -> the
rectified-flow loss of the latent-conditioned decoder, plus, with label anchors, the label alignment loss.

Time conventions: the zoning solver's (0 = anchor, 1 = Gaussian) and the decoder's rf_time (0 = noise, 1 = data).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from lzn_jax import zoning
from lzn_jax.objectives.latents import latents_of, target_log_probs_of
from lzn_jax.objectives.rectified_flow import rectified_flow_loss, rectified_flow_pair


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The generation objective's settings (``config.generation``), frozen so a jitted step can close over them."""

    latent_options: zoning.SolverOptions
    prior_scale: float = 1.0
    rf_time_eps: float = 1e-3
    rf_loss_weight: float = 1.0
    label_options: zoning.SolverOptions = zoning.SolverOptions(solver="euler", num_steps=100)
    label_cut_off: float = 0.2
    label_loss_weight: float = 1.0
    label_use_log: bool = False

    @classmethod
    def from_config(cls, block: ml_collections.ConfigDict) -> "GenerationSettings":
        return cls(
            latent_options=solver_options(block.latent_solver),
            prior_scale=float(block.prior_scale),
            rf_time_eps=float(block.rf_time_eps),
            rf_loss_weight=float(block.rf_loss_weight),
            label_options=solver_options(block.label_solver),
            label_cut_off=float(block.label_cut_off),
            label_loss_weight=float(block.label_loss_weight),
            label_use_log=bool(block.label_use_log),
        )


def solver_options(block: ml_collections.ConfigDict) -> zoning.SolverOptions:
    """``zoning.SolverOptions`` from a config solver block (``configs/common.py``'s ``solver_block``).

    The kernel keys (``block_size``, ``remat``, ``memory_budget_bytes``) take the library's defaults where a block
    leaves them unset or lacks them: the config of a run written before they existed still loads.
    """
    defaults = zoning.SolverOptions()
    block_size, budget = block.get("block_size"), block.get("memory_budget_bytes")
    return zoning.SolverOptions(
        solver=block.solver, num_steps=int(block.num_steps), eps=block.eps,
        block_size=None if block_size is None else int(block_size),
        remat=block.get("remat", defaults.remat),
        memory_budget_bytes=defaults.memory_budget_bytes if budget is None else int(budget),
    )


class GenerationOutputs(NamedTuple):
    """The objective's value and what a trainer logs of it (all scalars)."""

    loss: jax.Array
    rf_loss: jax.Array
    label_loss: jax.Array
    anchor_norm: jax.Array  # mean L2 norm of the anchors (0 without an encoder)
    latent_std: jax.Array  # standard deviation of the latents' entries (0 without an encoder)


def _one_hot_labels(decoder, labels):
    if getattr(decoder, "num_classes", 0) <= 0:
        return None
    if labels is None:
        raise ValueError(f"the decoder is class-conditional ({decoder.num_classes} classes); the batch needs labels")
    return jax.nn.one_hot(labels, decoder.num_classes, dtype=jnp.float32)


def generation_loss(
    params: dict[str, Any],
    images: jax.Array,
    labels: jax.Array | None,
    key: jax.Array,
    *,
    modules,
    settings: GenerationSettings,
    enabled: dict[str, jax.Array] | None = None,
) -> GenerationOutputs:
    """The LZN generation loss of one global batch.

    Args:
      params: ``{"decoder": ..., ["encoder": ..., "label_anchors": ...]}``.
      images: (B, H, W, C) float32 in [-1, 1]; labels: (B,) int32, needed with label anchors or a class-
        conditional decoder.
      key: this step's key; split into prior, rectified-flow and dropout keys.
      modules: ``lzn_jax.train.Modules`` (encoder and label_anchors may be None: the rectified-flow baseline).
      enabled: ``{module: bool scalar}`` of the modules still training; a loss term is kept while a module it
        trains is enabled, as the reference computes it (default: all enabled).
    Returns:
      GenerationOutputs; ``loss = rf_loss_weight * rf_loss + label_loss_weight * label_loss``.
    """
    enabled = enabled or {name: jnp.bool_(True) for name in params}
    on = lambda name: enabled.get(name, jnp.bool_(False))  # noqa: E731
    prior_key, rf_key, encoder_dropout, decoder_dropout = jax.random.split(key, 4)
    zero = jnp.zeros((), jnp.float32)

    latents, anchor_norm, latent_std = None, zero, zero
    if modules.encoder is not None:
        anchors = modules.encoder.apply(
            {"params": params["encoder"]}, images, train=True, rngs={"dropout": encoder_dropout}
        ).astype(jnp.float32)
        noise = settings.prior_scale * jax.random.normal(prior_key, anchors.shape, jnp.float32)
        latents = latents_of(anchors, noise, settings.latent_options)
        anchor_norm = jnp.mean(jnp.linalg.norm(anchors, axis=-1))
        latent_std = jnp.std(latents)

    pair = rectified_flow_pair(images, rf_key, time_eps=settings.rf_time_eps)
    velocity = modules.decoder.apply(
        {"params": params["decoder"]}, pair.noisy_images, pair.rf_time, latents,
        _one_hot_labels(modules.decoder, labels), train=True, rngs={"dropout": decoder_dropout},
    )
    rf_loss = rectified_flow_loss(velocity, pair.target_velocity)
    rf_loss = jnp.where(on("decoder") | on("encoder"), rf_loss, zero)

    label_loss = zero
    if modules.label_anchors is not None:
        if labels is None:
            raise ValueError("the label alignment needs labels in the batch")
        table = modules.label_anchors.apply({"params": params["label_anchors"]})
        log_weights = zoning.class_log_weights(labels, table.shape[0])
        assignment = target_log_probs_of(
            latents, table, labels, settings.label_options, log_weights=log_weights, context_is_batch=False
        )
        label_loss = zoning.target_alignment_loss(
            assignment.target_log_probs, cut_off=settings.label_cut_off, use_log=settings.label_use_log
        )
        label_loss = jnp.where(on("encoder") | on("label_anchors"), label_loss, zero)

    loss = settings.rf_loss_weight * rf_loss + settings.label_loss_weight * label_loss
    return GenerationOutputs(loss, rf_loss, label_loss, anchor_norm, latent_std)
