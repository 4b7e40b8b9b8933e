"""The blockwise posterior kernel: a streaming log-sum-exp over anchor blocks, flash-attention style.

Its residuals are ``(B,)`` statistics only, so memory does not grow with the number of anchors N: it is
O(B * block_size * D). Its backward pass recomputes each block, and must meet the forward's log-normaliser
exactly; the matmul expansion of the logits cannot promise that in float32 (at t = 1e-4 its terms are ~1e8 and
two compilations of it differ by tens, so exp() overflows). It therefore computes its logits from exact gaps
between anchors. docs/numerics.md, "The blockwise kernel".

Both variants measure each row from a pivot anchor ``r_b``, so that nothing anchor-sized has to cancel where a
row sits in its own zone, which is where the 1/t^2 scale of the logits amplifies every rounding error:

* :func:`blockwise_pivot_posterior` takes the pivots (the rows' own anchors in the forward flow) and the small
  offset ``q_b = x_b - (1 - t) r_b``, computes its logits from the exact pivot gaps ``r_b - a_j``, and returns
  the mean relative to the pivot, ``sum_j p_bj (a_j - r_b)``, and the log posterior of one target anchor per row;
* :func:`blockwise_posterior` (the reverse flows) takes absolute points, picks as each row's pivot its most
  probable anchor (a cheap matmul pass over the blocks) and calls the pivot variant.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax.zoning._dense import HIGHEST, _logits, offset_from, split_blocks, squared_norms, transposed_product


def _finite_or_zero(value):
    # A block (or a whole row) whose anchors all have zero weight has max logit -inf; shifting by it would
    # compute -inf - (-inf) = NaN.
    return jnp.where(jnp.isfinite(value), value, 0.0)


def _sums_over_last_axis(*arrays):
    """Sums arrays of one shape over their last axis in a single variadic reduction. On the CPU XLA fuses it
    with the arrays' producers into one pass over ``(B, block, D)``, where separate sums were measured to take
    twice as long or to hold their products in memory."""
    zeros = tuple(jnp.zeros((), array.dtype) for array in arrays)
    return jax.lax.reduce(arrays, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), (arrays[0].ndim - 1,))


def _pivot_block_reductions(query, pivots, anchors, time, g_mean=None):
    """The inner products of one block's exact pivot gaps that the pivot variant needs, in one pass.

    With ``q = x - (1 - t) r`` and the pivot gap ``g_j = r - a_j``, ``x - (1 - t) a_j = q + (1 - t) g_j`` and

        -|q + (1 - t) g_j|^2 + |q|^2 = -(1 - t) <g_j, 2 q + (1 - t) g_j>,

    a product of the exact gap and a vector of the row's own size, zero at the pivot. The logits are
    ``log_weights - distance_scale (1 - t)`` times these products (:func:`_pivot_logits`): dropping the per-row
    ``|q|^2`` changes no probability, and the logits that decide the posterior then carry no large per-row
    term whose rounding would blur them.

    Returns:
      ``(<g_j, 2 q + (1 - t) g_j>, |g_j|^2)``, each (B, block), and with ``g_mean`` (B, D) also
      ``<g_mean_b, g_j>`` (B, block).
    """
    gaps = pivots[:, None, :] - anchors[None, :, :]
    twice_offset = (query[:, None, :] + (1.0 - time) * gaps) + query[:, None, :]
    products = (gaps * twice_offset, gaps * gaps)
    if g_mean is not None:
        products += (gaps * g_mean[:, None, :],)
    return _sums_over_last_axis(*products)


def _tied(query, pivots):
    """``(query, pivots)`` through an optimisation barrier.

    The pivot gaps ``r_b - a_j`` do not depend on the query. In a flow, where the pivots and the anchors are the
    same at every step, XLA would otherwise hoist every block's gaps out of the loop over the steps and keep all
    of them, a ``(B, N, D)`` array: the kernel's memory would grow with N. Through the barrier the pivots count
    as a new value at each step."""
    return jax.lax.optimization_barrier((query, pivots))


def _pivot_logits(products, block_log_weights, time, distance_scale):
    return block_log_weights - (distance_scale * (1.0 - time)) * products


def _block_starts(num_blocks, block_size):
    return jnp.arange(num_blocks, dtype=jnp.int32) * block_size


def _rescaled(running_max, logits):
    """One step of the online softmax: the new running max, the factor that rescales the old sums to it, and
    the block's probabilities relative to it."""
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    shift = _finite_or_zero(new_max)
    return new_max, jnp.exp(running_max - shift), jnp.exp(logits - shift[:, None])


def _expansion_argmax(x, context, log_weights, time, distance_scale, block_size):
    """(B,) int32 index of each row's most probable anchor by the matmul expansion of the logits, streamed over
    anchor blocks.

    Only a pivot: the expansion's rounding (about ``(1 - t) / t^2 |x| |a|`` times the rounding unit) may pick a
    near-tie instead of the largest logit, which costs nothing, since the pivot kernel streams its own running
    maximum and is exact for any pivot; a pivot near the mass is what keeps its products small.
    """
    blocks = split_blocks(context, block_size, 0.0)
    weight_blocks = split_blocks(log_weights, block_size, -jnp.inf)
    inner_scale = 2.0 * distance_scale * (1.0 - time)
    norm_scale = distance_scale * (1.0 - time) ** 2

    def best_so_far(carry, block):
        best, best_index = carry
        anchors, block_log_weights, start = block
        logits = _logits(x, anchors, squared_norms(anchors), block_log_weights, inner_scale, norm_scale)
        block_best = jnp.max(logits, axis=-1)
        better = block_best > best
        index = jnp.where(better, start + jnp.argmax(logits, axis=-1).astype(jnp.int32), best_index)
        return (jnp.where(better, block_best, best), index), None

    # Built from x so that, inside shard_map, the carries vary over the same mesh axes as the scan's outputs.
    row = x[:, 0]
    init = (jnp.full_like(row, -jnp.inf), jnp.zeros_like(row, jnp.int32))
    starts = _block_starts(blocks.shape[0], block_size)
    (_, index), _ = jax.lax.scan(best_so_far, init, (blocks, weight_blocks, starts))
    return index


def _pivot_statistics(query, context, pivots, log_weights, time, distance_scale, block_size):
    """Streams over anchor blocks, measuring from the pivots.

    Returns:
      ``(sum_j p_bj (a_j - r_b) (B, D), log-sum-exp of the logits (B,))``. The mean offset is
      ``(others @ A - rowsum(others) r) / rowsum(P)`` with ``others`` the unnormalised posterior without the
      anchors at pivot gap exactly zero: they add exactly nothing to the sum, and leaving them out keeps both
      products as small as the result (the dense pivot kernel does the same).
    """
    query, pivots = _tied(query, pivots)
    blocks = split_blocks(context, block_size, 0.0)
    weight_blocks = split_blocks(log_weights, block_size, -jnp.inf)

    def accumulate(carry, block):
        running_max, running_sum, running_others, running_weighted = carry
        anchors, block_log_weights = block
        products, squared_gaps = _pivot_block_reductions(query, pivots, anchors, time)
        new_max, rescale, probs = _rescaled(running_max, _pivot_logits(products, block_log_weights, time,
                                                                       distance_scale))
        others = jnp.where(squared_gaps == 0, 0.0, probs)
        running_sum = running_sum * rescale + jnp.sum(probs, axis=-1)
        running_others = running_others * rescale + jnp.sum(others, axis=-1)
        running_weighted = running_weighted * rescale[:, None] + jnp.matmul(others, anchors, precision=HIGHEST)
        return (new_max, running_sum, running_others, running_weighted), None

    row = query[:, 0]
    init = (jnp.full_like(row, -jnp.inf), jnp.zeros_like(row), jnp.zeros_like(row), jnp.zeros_like(query))
    (row_max, row_sum, others, weighted), _ = jax.lax.scan(accumulate, init, (blocks, weight_blocks))
    mean_offset = (weighted - others[:, None] * pivots) / row_sum[:, None]
    return mean_offset, _finite_or_zero(row_max) + jnp.log(row_sum)


def _unblocked(g_blocks, g_weight_blocks, context):
    n = context.shape[0]
    return g_blocks.reshape((-1, context.shape[1]))[:n], g_weight_blocks.reshape(-1)[:n]


# ------------------------------------------------------------------------------------------------ from pivots


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def blockwise_pivot_posterior(query, context, pivots, log_weights, targets, own_index, time, distance_scale,
                              block_size):
    """``(mean_offset (B, D), log_normaliser (B,), target_log_probs (B,))``, measured from each row's pivot.

    Args:
      query: (B, D) ``x_b - (1 - t) r_b``, formed without cancellation by the caller; context: (N, D);
      pivots: (B, D) the ``r_b``; log_weights: (N,); targets: (B,) int, the anchor whose log posterior each
      row records (any valid index where nothing is recorded); own_index: (B,) int or None, the column of
      ``context`` that holds each row's pivot itself (as for ``_dense.dense_pivot_posterior``); time,
      distance_scale: ``t`` and ``1 / (2 t^2)``; block_size: static int.
    Returns:
      ``sum_j p_bj (a_j - r_b)``; the log-normaliser of the logits measured from the pivot
      (:func:`_pivot_block_reductions`), which is the absolute one at ``x = query + (1 - t) pivots`` plus
      ``|query|^2 / (2 t^2)``; and ``log p_b(targets_b)``. The target's log posterior is an output of the
      kernel, not formed from the log-normaliser by its caller, so that the backward pass can combine its two
      paths (the target's own logit and the normaliser) before they are summed: late in a reverse flow each
      is about ``1 / t^2`` times larger than their sum.
    """
    mean_offset, log_normaliser = _pivot_statistics(query, context, pivots, log_weights, time, distance_scale,
                                                    block_size)
    return mean_offset, log_normaliser, _target_log_probs(query, pivots, context[targets], log_weights[targets],
                                                          time, distance_scale, log_normaliser)


def _blockwise_pivot_posterior_fwd(query, context, pivots, log_weights, targets, own_index, time, distance_scale,
                                   block_size):
    outputs = blockwise_pivot_posterior(query, context, pivots, log_weights, targets, own_index, time,
                                        distance_scale, block_size)
    return outputs, (query, context, pivots, log_weights, targets, own_index, time, distance_scale, outputs[1])


def _blockwise_pivot_posterior_bwd(block_size, residuals, cotangents):
    """Two sweeps over the blocks, each recomputing the posterior from the exact pivot gaps.

    * **Mean cotangent relative to the pivot.** ``<g_mean, a_j - r_b>`` is ``-<g_mean, g_j>`` of the exact
      gaps, formed in the same pass as the logits, and exactly zero at the pivot: a row whose posterior is
      one-hot at its pivot gets exactly zero logit cotangents, however the recomputation rounds.
    * **Normalised by the first sweep's own sum** of ``exp(logit - log_normaliser)``, so that the recomputed
      probabilities sum to one whatever the forward pass's rounding was.
    * **The target's two paths combined first.** The target's own logit adds its cotangent ``g`` to its
      column and the normaliser subtracts ``p_j g`` from every column, so the target's column gets
      ``(1 - p_t) g``, with ``1 - p_t`` formed as the sum of the other columns' probabilities. Summed after the
      fact, each path's share of the query's and the anchors' cotangents is ``~1/t^2`` times larger than their
      sum, which is then rounding noise where the target holds the mass.

    The query enters the logits only through ``-2 distance_scale (1 - t) <q, g_j>``, so its cotangent is
    ``2 distance_scale (1 - t) sum_j G_bj (a_j - r_b)``, and the anchors' share through the logits is
    ``2 distance_scale (1 - t) sum_b G_bj (q_b + (1 - t) (r_b - a_j))``, with ``G`` the logit cotangents. Both
    are computed as products, with ``G'``, the logit cotangents without the entries at pivot gap exactly zero,
    in the terms that hold the gaps: ``G' @ A - rowsum(G') r`` and ``G'.T @ R - colsum(G') a``. The left-out
    entries add exactly nothing to either sum, and without them neither product holds the large own-anchor term
    early in the flow, so neither cancels to a small result (the dense pivot kernel does the same).
    * **Each row's own anchor, where the context holds it** (``own_index``), gets no share of the mean's
      cotangent, and neither does the pivot for it: the two are one value, and their shares ``p g`` and
      ``-p g`` cancel exactly (``_dense._dense_pivot_posterior_bwd`` explains why that matters)."""
    query, context, pivots, log_weights, targets, own_index, time, distance_scale, log_normaliser = residuals
    g_mean, g_log_normaliser, g_target = cotangents
    query, pivots = _tied(query, pivots)
    blocks = split_blocks(context, block_size, 0.0)
    weight_blocks = split_blocks(log_weights, block_size, -jnp.inf)
    starts = _block_starts(blocks.shape[0], block_size)

    def block_posterior(block):
        anchors, block_log_weights, start = block
        products, squared_gaps, gap_g_mean = _pivot_block_reductions(query, pivots, anchors, time, g_mean)
        logits = _pivot_logits(products, block_log_weights, time, distance_scale)
        columns = (start + jnp.arange(anchors.shape[0], dtype=targets.dtype))[None, :]
        is_target = columns == targets[:, None]
        is_own = None if own_index is None else columns == own_index[:, None]
        return jnp.exp(logits - log_normaliser[:, None]), -gap_g_mean, squared_gaps == 0, is_target, is_own

    def mean_weights(unnormalised, is_own):
        """The posterior weights that enter the mean's cotangent: all but each row's own anchor's."""
        return unnormalised if is_own is None else jnp.where(is_own, 0.0, unnormalised)

    def accumulate_sums(carry, block):
        total, others_total, row_dot, not_own_total = carry
        unnormalised, relative_g_probs, _, is_target, is_own = block_posterior(block)
        return (total + jnp.sum(unnormalised, axis=-1),
                others_total + jnp.sum(jnp.where(is_target, 0.0, unnormalised), axis=-1),
                row_dot + jnp.sum(unnormalised * relative_g_probs, axis=-1),
                not_own_total + jnp.sum(mean_weights(unnormalised, is_own), axis=-1)), None

    zeros = jnp.zeros_like(log_normaliser)
    (total, others_total, row_dot, not_own_total), _ = jax.lax.scan(accumulate_sums, (zeros,) * 4,
                                                                    (blocks, weight_blocks, starts))
    # The normaliser's cotangent enters as a constant shift of g_probs (d lse / d logits = probs); the
    # target's own logit adds g_target to its column, and its normaliser path, -g_target, joins the shift.
    shift = (g_log_normaliser - g_target - row_dot / total)[:, None]
    target_share = (g_target * others_total / total)[:, None]  # (1 - p_t) g_target, without cancellation

    def block_cotangents(g_query, block):
        anchors = block[0]
        unnormalised, relative_g_probs, at_pivot, is_target, is_own = block_posterior(block)
        probs = unnormalised / total[:, None]
        at_target = probs * (relative_g_probs + shift + g_target[:, None]) + target_share
        g_logits = jnp.where(is_target, at_target, probs * (relative_g_probs + shift))
        others = jnp.where(at_pivot, 0.0, g_logits)
        g_query = g_query + (jnp.matmul(others, anchors, precision=HIGHEST)
                             - jnp.sum(others, axis=-1, keepdims=True) * pivots)
        # sum_b G_bj (x_b - (1 - t) a_j), the logits' share of the anchors' cotangent (up to its scale).
        logit_share = (transposed_product(g_logits, query)
                       + (1.0 - time) * (transposed_product(others, pivots)
                                         - jnp.sum(others, axis=0)[:, None] * anchors))
        g_anchors = (transposed_product(mean_weights(probs, is_own), g_mean)
                     + (2.0 * distance_scale * (1.0 - time)) * logit_share)
        return g_query, (g_anchors, jnp.sum(g_logits, axis=0))

    g_query, (g_blocks, g_weight_blocks) = jax.lax.scan(block_cotangents, jnp.zeros_like(g_mean),
                                                        (blocks, weight_blocks, starts))
    g_query = (2.0 * distance_scale * (1.0 - time)) * g_query
    g_context, g_log_weights = _unblocked(g_blocks, g_weight_blocks, context)
    # The logits are those at x = q + (1 - t) r plus |q|^2 / (2 t^2), and the output has -r subtracted with
    # the weights of the anchors other than the row's own one (which is left out above).
    g_pivots = ((1.0 - time) * (g_query - (2.0 * distance_scale * g_log_normaliser)[:, None] * query)
                - (not_own_total / total)[:, None] * g_mean)
    g_targets = np.zeros(targets.shape, jax.dtypes.float0)
    return (g_query, g_context, g_pivots, g_log_weights, g_targets, None, jnp.zeros_like(time),
            jnp.zeros_like(distance_scale))


blockwise_pivot_posterior.defvjp(_blockwise_pivot_posterior_fwd, _blockwise_pivot_posterior_bwd)


def _target_log_probs(query, pivots, targets_context, target_log_weights, time, distance_scale, log_normaliser):
    """(B,) log posterior of one given anchor per row (its pivot logit minus the log-normaliser).

    Args:
      query, pivots: as for :func:`blockwise_pivot_posterior`; targets_context: (B, D) each row's target
      anchor; target_log_weights: (B,); log_normaliser: (B,) of the pivot logits. Exactly the target's
      log-weight minus the log-normaliser where the target is the pivot.
    """
    gap = pivots - targets_context
    product = jnp.sum(gap * ((query + (1.0 - time) * gap) + query), axis=-1)
    return _pivot_logits(product, target_log_weights, time, distance_scale) - log_normaliser


# ------------------------------------------------------------------------------------------------ from origin


def blockwise_posterior(x, context, log_weights, targets, time, distance_scale, block_size):
    """``(mean (B, D), residual (B, D), target_log_probs (B,))`` at one time; ``residual = x - mean``.

    Each row is measured from its most probable anchor ``a_p`` (:func:`_expansion_argmax`), a constant for
    differentiation (the posterior does not depend on it): the pivot kernel gets the offset
    ``x - (1 - t) a_p``, and the mean and the residual are formed from its mean offset as
    ``a_p + sum_j p_j (a_j - a_p)`` and ``(x - a_p) - sum_j p_j (a_j - a_p)``, so that neither is the
    difference of anchor-sized numbers where the row's mass sits at ``a_p``.

    Args:
      x: (B, D) points; context: (N, D) anchors; log_weights: (N,); targets: (B,) int (see
      :func:`blockwise_pivot_posterior`); time, distance_scale: ``t`` and ``1 / (2 t^2)``; block_size: static.
    """
    pivots = jax.lax.stop_gradient(
        context[_expansion_argmax(x, context, log_weights, time, distance_scale, block_size)])
    mean_offset, _, recorded = blockwise_pivot_posterior(offset_from(x, pivots, time), context, pivots,
                                                         log_weights, targets, None, time, distance_scale,
                                                         block_size)
    return pivots + mean_offset, (x - pivots) - mean_offset, recorded
