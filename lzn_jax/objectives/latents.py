"""The one place the objectives call the zoning solver: under ``shard_map`` over the batch axis when a mesh is
entered (``jax.set_mesh``), the plain solver otherwise (a notebook on one device). Either way every row is solved
against the whole global batch, so the results and gradients are those of the unsharded computation."""

from __future__ import annotations

import jax

from lzn_jax import zoning

# The batch axis of the project's mesh (lzn_jax.parallel.mesh).
BATCH_AXIS = "data"


def _sharded() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and BATCH_AXIS in mesh.shape


def latents_of(anchors: jax.Array, noise: jax.Array, options: zoning.SolverOptions) -> jax.Array:
    """Latents (B, D) of the batch's anchors (B, D) started from ``noise`` (B, D, already scaled by alpha)."""
    if _sharded():
        return zoning.compute_latents_sharded(anchors, noise, options=options, axis_name=BATCH_AXIS)
    return zoning.compute_latents(anchors, noise, options=options)


def target_log_probs_of(
    latents: jax.Array,
    context: jax.Array,
    targets: jax.Array,
    options: zoning.SolverOptions,
    *,
    log_weights: jax.Array | None = None,
    context_is_batch: bool,
) -> zoning.TargetAssignment:
    """Reverse flow of ``latents`` (B, D) over ``context`` (N, D), recording each row's target log posterior.

    ``context_is_batch``: the context rows are the batch's own (sharded like the latents, gathered inside), as in
    the contrastive objective; otherwise the context is a small replicated table (the label anchors).
    Returns ``TargetAssignment(endpoints (B, D), target_log_probs (S, B))``.
    """
    if _sharded():
        return zoning.assign_targets_sharded(
            latents, context, targets, context_sharded=context_is_batch, log_weights=log_weights, options=options,
            axis_name=BATCH_AXIS,
        )
    return zoning.assign_targets(latents, context, targets, log_weights=log_weights, options=options)
