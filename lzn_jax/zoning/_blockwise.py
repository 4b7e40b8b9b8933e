"""The blockwise posterior kernel: a streaming log-sum-exp over anchor blocks, flash-attention style.

Its residuals are ``(B,)`` statistics only, so memory does not grow with the number of anchors N: it is
O(B * block_size * D). Its backward pass recomputes each block, and must meet the forward's log-normaliser
exactly; the matmul expansion of the logits cannot promise that in float32 (at t = 1e-4 its terms are ~1e8 and
two compilations of it differ by tens, so exp() overflows). It therefore computes the logits
``-|x - (1 - t) a|^2 / (2 t^2)`` from exact differences. docs/numerics.md, "The blockwise kernel".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lzn_jax.zoning._dense import HIGHEST, offset_from, split_blocks


def _finite_or_zero(value):
    # A block (or a whole row) whose anchors all have zero weight has max logit -inf; shifting by it would
    # compute -inf - (-inf) = NaN.
    return jnp.where(jnp.isfinite(value), value, 0.0)


def _block_logits(x, anchors, block_log_weights, time, distance_scale):
    """Exact-difference logits of one block: (B, block) and the differences ``x - (1 - t) a`` (B, block, D)."""
    differences = offset_from(x[:, None, :], anchors[None, :, :], time)
    return block_log_weights - distance_scale * jnp.sum(differences * differences, axis=-1), differences


def _block_starts(num_blocks, block_size):
    return jnp.arange(num_blocks, dtype=jnp.int32) * block_size


def _blockwise_statistics(x, context, log_weights, time, distance_scale, block_size):
    """Streams over anchor blocks.

    Returns:
      ``(mean (B, D), log-sum-exp of the logits (B,), index of each row's largest logit (B,) int32)``.
    """
    blocks = split_blocks(context, block_size, 0.0)
    weight_blocks = split_blocks(log_weights, block_size, -jnp.inf)

    def accumulate(carry, block):
        running_max, running_sum, running_weighted, running_argmax = carry
        anchors, block_log_weights, start = block
        logits, _ = _block_logits(x, anchors, block_log_weights, time, distance_scale)
        block_max = jnp.max(logits, axis=-1)
        new_max = jnp.maximum(running_max, block_max)
        argmax = jnp.where(block_max > running_max, start + jnp.argmax(logits, axis=-1).astype(jnp.int32),
                           running_argmax)
        shift = _finite_or_zero(new_max)
        rescale = jnp.exp(running_max - shift)
        probs = jnp.exp(logits - shift[:, None])
        running_sum = running_sum * rescale + jnp.sum(probs, axis=-1)
        running_weighted = running_weighted * rescale[:, None] + jnp.matmul(probs, anchors, precision=HIGHEST)
        return (new_max, running_sum, running_weighted, argmax), None

    # Built from x so that, inside shard_map, the carries vary over the same mesh axes as the scan's outputs.
    row = x[:, 0]
    init = (jnp.full_like(row, -jnp.inf), jnp.zeros_like(row), jnp.zeros_like(x), jnp.zeros_like(row, jnp.int32))
    starts = _block_starts(blocks.shape[0], block_size)
    (row_max, row_sum, weighted, argmax), _ = jax.lax.scan(accumulate, init, (blocks, weight_blocks, starts))
    return weighted / row_sum[:, None], _finite_or_zero(row_max) + jnp.log(row_sum), argmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def blockwise_posterior(x, context, log_weights, time, distance_scale, block_size):
    """``(mean (B, D), log_normaliser (B,))`` of the posterior at one time, over anchor blocks of ``block_size``.

    Args:
      x: (B, D) points; context: (N, D) anchors; log_weights: (N,); time, distance_scale: scalars
      ``t`` and ``1 / (2 t^2)``; block_size: static int.
    Returns:
      the posterior mean and ``logsumexp_j logits_bj``, from which one anchor's log posterior follows
      (:func:`target_log_probs`).
    """
    return _blockwise_statistics(x, context, log_weights, time, distance_scale, block_size)[:2]


def _blockwise_posterior_fwd(x, context, log_weights, time, distance_scale, block_size):
    mean, log_normaliser, pivot = _blockwise_statistics(x, context, log_weights, time, distance_scale, block_size)
    return (mean, log_normaliser), (x, context, log_weights, time, distance_scale, log_normaliser, pivot)


def _blockwise_posterior_bwd(block_size, residuals, cotangents):
    """Recomputes each block twice. The recomputed posterior may differ from the forward's by rounding, and
    near t = 0 the 1/t^2 scale amplifies any mismatch in ``g_probs_j - sum_k probs_k g_probs_k`` by ~1e8. So
    the products are taken relative to each row's pivot (its largest forward logit) from exact differences,
    ``<g_mean, a_j - a_pivot>``, which is exactly zero at the pivot: a one-hot row then gets exactly zero
    logit cotangents, however the recomputation rounds."""
    x, context, log_weights, time, distance_scale, log_normaliser, pivot = residuals
    g_mean, g_log_normaliser = cotangents
    n = context.shape[0]
    blocks = split_blocks(context, block_size, 0.0)
    weight_blocks = split_blocks(log_weights, block_size, -jnp.inf)
    pivot_anchors = context[pivot]

    def block_posterior(block):
        anchors, block_log_weights = block
        logits, differences = _block_logits(x, anchors, block_log_weights, time, distance_scale)
        probs = jnp.exp(logits - log_normaliser[:, None])
        relative_g_probs = jnp.einsum("bd,bjd->bj", g_mean, anchors[None, :, :] - pivot_anchors[:, None, :],
                                      precision=HIGHEST)
        return probs, relative_g_probs, differences

    def accumulate_row_dot(row_dot, block):
        probs, relative_g_probs, _ = block_posterior(block)
        return row_dot + jnp.sum(probs * relative_g_probs, axis=-1), None

    row_dot, _ = jax.lax.scan(accumulate_row_dot, jnp.zeros_like(log_normaliser), (blocks, weight_blocks))
    # d lse / d logits = probs, so the log-normaliser's cotangent enters as a constant shift of g_probs.
    shift = (g_log_normaliser - row_dot)[:, None]

    def block_cotangents(g_x, block):
        probs, relative_g_probs, differences = block_posterior(block)
        g_logits = probs * (relative_g_probs + shift)
        # logits = -distance_scale |x - (1 - t) a|^2: d/dx = -2 distance_scale (...), d/da = +2 distance_scale (1 - t) (...).
        weighted_differences = (2.0 * distance_scale) * g_logits[:, :, None] * differences
        g_anchors = (jnp.matmul(probs.T, g_mean, precision=HIGHEST)
                     + (1.0 - time) * jnp.sum(weighted_differences, axis=0))
        return g_x - jnp.sum(weighted_differences, axis=1), (g_anchors, jnp.sum(g_logits, axis=0))

    g_x, (g_blocks, g_weight_blocks) = jax.lax.scan(block_cotangents, jnp.zeros_like(x), (blocks, weight_blocks))
    g_context = g_blocks.reshape((-1, context.shape[1]))[:n]
    g_log_weights = g_weight_blocks.reshape(-1)[:n]
    return g_x, g_context, g_log_weights, jnp.zeros_like(time), jnp.zeros_like(distance_scale)


blockwise_posterior.defvjp(_blockwise_posterior_fwd, _blockwise_posterior_bwd)


def target_log_probs(x, targets_context, target_log_weights, time, distance_scale, log_normaliser):
    """(B,) log posterior of one given anchor per row, from the row's log normaliser.

    Args:
      x: (B, D) points; targets_context: (B, D) each row's target anchor; target_log_weights: (B,) their log
      weights; time, distance_scale: as in :func:`blockwise_posterior`; log_normaliser: (B,) from it.
    """
    difference = offset_from(x, targets_context, time)
    return target_log_weights - distance_scale * jnp.sum(difference * difference, axis=-1) - log_normaliser
