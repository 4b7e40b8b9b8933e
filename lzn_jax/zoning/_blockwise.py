"""The blockwise posterior kernel: a streaming log-sum-exp over anchor blocks, flash-attention style.

Its residuals are ``(B,)`` statistics only, so memory does not grow with the number of anchors N: it is
O(B * block_size * D). Its backward pass recomputes each block, and must meet the forward's log-normaliser
exactly; the matmul expansion of the logits cannot promise that in float32 (at t = 1e-4 its terms are ~1e8 and
two compilations of it differ by tens, so exp() overflows). It therefore computes the logits
``-|x - (1 - t) a|^2 / (2 t^2)`` from exact differences. docs/numerics.md, "The blockwise kernel".

It comes in two variants, with the same streaming and the same two backward sweeps:

* :func:`blockwise_posterior` measures from the origin (the reverse flows): it takes the absolute points ``x``
  and returns the absolute mean;
* :func:`blockwise_pivot_posterior` measures from a per-row pivot ``r_b`` (the row's own anchor in the forward
  flow): it takes the small offset ``q_b = x_b - (1 - t) r_b``, computes its logits from the exact pivot gaps
  ``r_b - a_j``, and returns the mean relative to the pivot, ``sum_j p_bj (a_j - r_b)``. Nothing anchor-sized
  then has to cancel, in either pass, where a row sits in its own zone, which is where the 1/t^2 scale of the
  logits amplifies every rounding error.
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
        argmax = jnp.where(block_max > running_max, start + jnp.argmax(logits, axis=-1).astype(jnp.int32),
                           running_argmax)
        new_max, rescale, probs = _rescaled(running_max, logits)
        running_sum = running_sum * rescale + jnp.sum(probs, axis=-1)
        running_weighted = running_weighted * rescale[:, None] + jnp.matmul(probs, anchors, precision=HIGHEST)
        return (new_max, running_sum, running_weighted, argmax), None

    # Built from x so that, inside shard_map, the carries vary over the same mesh axes as the scan's outputs.
    row = x[:, 0]
    init = (jnp.full_like(row, -jnp.inf), jnp.zeros_like(row), jnp.zeros_like(x), jnp.zeros_like(row, jnp.int32))
    starts = _block_starts(blocks.shape[0], block_size)
    (row_max, row_sum, weighted, argmax), _ = jax.lax.scan(accumulate, init, (blocks, weight_blocks, starts))
    return weighted / row_sum[:, None], _finite_or_zero(row_max) + jnp.log(row_sum), argmax


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


# ------------------------------------------------------------------------------------------------ from origin


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


# ------------------------------------------------------------------------------------------------ from pivots


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def blockwise_pivot_posterior(query, context, pivots, log_weights, time, distance_scale, block_size):
    """``(mean_offset (B, D), log_normaliser (B,))``: the posterior mean relative to each row's pivot.

    Args:
      query: (B, D) ``x_b - (1 - t) r_b``, formed without cancellation by the caller; context: (N, D);
      pivots: (B, D) the ``r_b``; log_weights: (N,); time, distance_scale: ``t`` and ``1 / (2 t^2)``;
      block_size: static int.
    Returns:
      ``sum_j p_bj (a_j - r_b)`` and the log-normaliser of the logits measured from the pivot
      (:func:`_pivot_block_reductions`), which is :func:`blockwise_posterior`'s at ``x = query + (1 - t) pivots``
      plus ``|query|^2 / (2 t^2)``; :func:`pivot_target_log_probs` takes it.
    """
    return _pivot_statistics(query, context, pivots, log_weights, time, distance_scale, block_size)


def _blockwise_pivot_posterior_fwd(query, context, pivots, log_weights, time, distance_scale, block_size):
    outputs = _pivot_statistics(query, context, pivots, log_weights, time, distance_scale, block_size)
    return outputs, (query, context, pivots, log_weights, time, distance_scale, outputs[1])


def _blockwise_pivot_posterior_bwd(block_size, residuals, cotangents):
    """Two sweeps over the blocks, as in the origin variant, with the row's own pivot in place of its largest
    logit: ``<g_mean, a_j - r_b>`` is ``-<g_mean, g_j>`` of the exact gaps, formed in the same pass as the
    logits, and exactly zero at the pivot.

    The query enters the logits only through ``-2 distance_scale (1 - t) <q, g_j>``, so its cotangent is
    ``2 distance_scale (1 - t) sum_j G_bj (a_j - r_b)``, and the anchors' share through the logits is
    ``2 distance_scale (1 - t) sum_b G_bj (q_b + (1 - t) (r_b - a_j))``, with ``G`` the logit cotangents. Both
    are computed as products, with ``G'``, the logit cotangents without the entries at pivot gap exactly zero,
    in the terms that hold the gaps: ``G' @ A - rowsum(G') r`` and ``G'.T @ R - colsum(G') a``. The left-out
    entries add exactly nothing to either sum, and without them neither product holds the large own-anchor term
    early in the flow, so neither cancels to a small result (the dense pivot kernel does the same)."""
    query, context, pivots, log_weights, time, distance_scale, log_normaliser = residuals
    g_mean, g_log_normaliser = cotangents
    query, pivots = _tied(query, pivots)
    blocks = split_blocks(context, block_size, 0.0)
    weight_blocks = split_blocks(log_weights, block_size, -jnp.inf)

    def block_posterior(block):
        anchors, block_log_weights = block
        products, squared_gaps, gap_g_mean = _pivot_block_reductions(query, pivots, anchors, time, g_mean)
        logits = _pivot_logits(products, block_log_weights, time, distance_scale)
        return jnp.exp(logits - log_normaliser[:, None]), -gap_g_mean, squared_gaps == 0

    def accumulate_row_dot(row_dot, block):
        probs, relative_g_probs, _ = block_posterior(block)
        return row_dot + jnp.sum(probs * relative_g_probs, axis=-1), None

    row_dot, _ = jax.lax.scan(accumulate_row_dot, jnp.zeros_like(log_normaliser), (blocks, weight_blocks))
    # d lse / d logits = probs, so the log-normaliser's cotangent enters as a constant shift of g_probs.
    shift = (g_log_normaliser - row_dot)[:, None]

    def block_cotangents(g_query, block):
        anchors = block[0]
        probs, relative_g_probs, at_pivot = block_posterior(block)
        g_logits = probs * (relative_g_probs + shift)
        others = jnp.where(at_pivot, 0.0, g_logits)
        g_query = g_query + (jnp.matmul(others, anchors, precision=HIGHEST)
                             - jnp.sum(others, axis=-1, keepdims=True) * pivots)
        # sum_b G_bj (x_b - (1 - t) a_j), the logits' share of the anchors' cotangent (up to its scale).
        logit_share = (jnp.matmul(g_logits.T, query, precision=HIGHEST)
                       + (1.0 - time) * (jnp.matmul(others.T, pivots, precision=HIGHEST)
                                         - jnp.sum(others, axis=0)[:, None] * anchors))
        g_anchors = (jnp.matmul(probs.T, g_mean, precision=HIGHEST)
                     + (2.0 * distance_scale * (1.0 - time)) * logit_share)
        return g_query, (g_anchors, jnp.sum(g_logits, axis=0))

    g_query, (g_blocks, g_weight_blocks) = jax.lax.scan(block_cotangents, jnp.zeros_like(g_mean),
                                                        (blocks, weight_blocks))
    g_query = (2.0 * distance_scale * (1.0 - time)) * g_query
    g_context, g_log_weights = _unblocked(g_blocks, g_weight_blocks, context)
    # The logits are those at x = q + (1 - t) r plus |q|^2 / (2 t^2), and the output has -r subtracted (its
    # weights sum to one). The forward flow's pivots are constants, so this is discarded there.
    g_pivots = ((1.0 - time) * (g_query - (2.0 * distance_scale * g_log_normaliser)[:, None] * query)
                - g_mean)
    return (g_query, g_context, g_pivots, g_log_weights, jnp.zeros_like(time), jnp.zeros_like(distance_scale))


blockwise_pivot_posterior.defvjp(_blockwise_pivot_posterior_fwd, _blockwise_pivot_posterior_bwd)


def pivot_target_log_probs(query, pivots, targets_context, target_log_weights, time, distance_scale,
                           log_normaliser):
    """(B,) log posterior of one given anchor per row, from :func:`blockwise_pivot_posterior`'s log normaliser.

    Args:
      query, pivots: as for :func:`blockwise_pivot_posterior`; targets_context: (B, D) each row's target
      anchor; target_log_weights: (B,); log_normaliser: (B,) from :func:`blockwise_pivot_posterior`.
    """
    gap = pivots - targets_context
    product = jnp.sum(gap * ((query + (1.0 - time) * gap) + query), axis=-1)
    return _pivot_logits(product, target_log_weights, time, distance_scale) - log_normaliser


def target_log_probs(x, targets_context, target_log_weights, time, distance_scale, log_normaliser):
    """(B,) log posterior of one given anchor per row, from the row's log normaliser.

    Args:
      x: (B, D) points; targets_context: (B, D) each row's target anchor; target_log_weights: (B,) their log
      weights; time, distance_scale: as in :func:`blockwise_posterior`; log_normaliser: (B,) from it.
    """
    difference = offset_from(x, targets_context, time)
    return target_log_weights - distance_scale * jnp.sum(difference * difference, axis=-1) - log_normaliser
