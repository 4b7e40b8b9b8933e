"""The dense posterior kernel: a ``(B, N)`` logits matmul, a log-softmax, and a hand-written backward pass.

The only residual is the ``(B, N)`` posterior, so the backward pass is four matmuls and recomputes nothing.
Both kernels take the context twice: ``context`` (N, D) for the forward products and ``context_t`` (D, N), the
same anchors transposed once per flow outside the step loop, which receives the whole cotangent. The backward
pass's two sums over the batch rows then come out of the products as (D, N) and add up over the steps as they
are; a (N, D) cotangent would cost a strided transpose of each step's sum (4-5 % of the forward flow at
B = N = 1024 on XLA:CPU; docs/numerics.md, "Speed: the two sums over the batch rows").
Two variants share the backward pass:

* :func:`dense_posterior` measures everything from the origin: ``mean = softmax @ context``;
* :func:`dense_pivot_posterior` measures from a per-row pivot point ``r_b`` (the row's own anchor in the forward
  flow): the logits use the offset ``x_b - (1 - t) r_b`` and the exact squared distances ``|a_j - r_b|^2``, and
  the output is the posterior mean *relative to the pivot*, ``sum_j p_bj (a_j - r_b)``. Both are small where the
  row sits inside its own zone, so they keep their own relative precision in float32 instead of being the
  difference of two numbers of the anchors' size. docs/numerics.md, "Logits measured from a pivot point".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

HIGHEST = jax.lax.Precision.HIGHEST


def transposed_product(rows: jax.Array, values: jax.Array) -> jax.Array:
    """``rows.T @ values`` (N, D) for rows (B, N) and values (B, D): a sum over the batch rows.

    Formed as the transpose of ``values.T @ rows`` (D, N). XLA:CPU runs a product whose large operand is
    contracted over its leading axis 1.5-1.7x slower than this form (the difference is about what a copy of
    that (B, N) operand costs); the barrier keeps the compiler from folding the small (D, N) transpose back into
    the product. On GPU and TPU the only cost is that (D, N) transpose. docs/numerics.md, "Speed: the two sums
    over the batch rows"; ``benchmarks/matmul_forms.py`` measures it.
    """
    return jax.lax.optimization_barrier(jnp.matmul(values.T, rows, precision=HIGHEST)).T


def squared_norms(context: jax.Array) -> jax.Array:
    """(N,) squared norms of the rows of ``context`` (N, D)."""
    return jnp.sum(context * context, axis=-1)


def offset_from(x: jax.Array, points: jax.Array, time) -> jax.Array:
    """``x - (1 - t) points`` to full relative precision where ``x`` is near ``(1 - t) points``.

    Written as ``(x - points) + t points``: the first difference is exact for nearby values and the second term
    is small, so the result does not depend on whether the compiler fuses a multiply-add (``x - (1 - t) p``
    rounds differently with and without one, by far more than the result's own precision when t is 1e-4).
    """
    return (x - points) + time * points


def _logits(query, context, offsets, log_weights, inner_scale, norm_scale):
    """(B, N) ``inner_scale <query_b, a_j> - norm_scale offsets + log_weights``; offsets (N,) or (B, N)."""
    return inner_scale * jnp.matmul(query, context.T, precision=HIGHEST) - norm_scale * offsets + log_weights


def _log_posterior(query, context, offsets, log_weights, inner_scale, norm_scale):
    return jax.nn.log_softmax(_logits(query, context, offsets, log_weights, inner_scale, norm_scale), axis=-1)


def _logit_cotangents(context, probs, g_mean, g_log_probs):
    """d(loss)/d(logits) (B, N), the backward of ``logits -> (softmax @ context, log_softmax)``.

    A per-row shift of the probabilities' cotangent ``g_mean @ A.T`` cancels here, so it serves for a mean
    measured from the origin and from per-row pivots alike.
    """
    g_probs = jnp.matmul(g_mean, context.T, precision=HIGHEST)
    # sum_j probs_j g_probs_j equals <g_mean, mean> in exact arithmetic, but when the posterior is one-hot only
    # this form cancels exactly against g_probs; the shortcut leaves rounding noise that the 1/t^2 scale of the
    # logits then amplifies by up to 1e8.
    g_logits = probs * (g_probs - jnp.sum(probs * g_probs, axis=-1, keepdims=True))
    if type(g_log_probs) is not SymbolicZero:  # a flow that records the posterior (the forward flows do not)
        g_logits = g_logits + g_log_probs - probs * jnp.sum(g_log_probs, axis=-1, keepdims=True)
    return g_logits


def row_sum_product(values: jax.Array, rows: jax.Array) -> jax.Array:
    """``values.T @ rows`` (D, N) for values (B, D) and rows (B, N): a sum over the batch rows, in the layout of
    ``context_t``. Both operands are contracted over their leading axis, the form XLA:CPU runs at full speed
    (``benchmarks/matmul_forms.py``)."""
    return jnp.matmul(values.T, rows, precision=HIGHEST)


def _input_cotangents(query, context, offsets, probs, inner_scale, norm_scale, g_mean, g_log_probs):
    """Cotangents of (query, context_t, offsets, log_weights) shared by both kernels; context_t's is (D, N)."""
    g_logits = _logit_cotangents(context, probs, g_mean, g_log_probs)
    g_query = inner_scale * jnp.matmul(g_logits, context, precision=HIGHEST)
    g_context_t = row_sum_product(g_mean, probs) + inner_scale * row_sum_product(query, g_logits)
    g_log_weights = jnp.sum(g_logits, axis=0)
    g_offsets = -norm_scale * (g_log_weights if offsets.ndim == 1 else g_logits)
    return g_query, g_context_t, g_offsets, g_log_weights


# ------------------------------------------------------------------------------------------------ from origin


# Candidates per row whose logits are recomputed from exact differences (see _refine_leading_logits).
REFINED_CANDIDATES = 8


def _refine_leading_logits(logits, context, log_weights, inner_scale, time, best_offset, candidates: int):
    """Row-shifted logits with each row's leading candidates recomputed from differences of anchors.

    The expansion's logits carry errors of size ``|x| |a| / t^2`` times the rounding unit, and so does their
    float32 representation when they are large. That decides little between far-apart anchors but much between
    nearby ones, whose logits differ by less. Each row is shifted so that its best candidate ``a_b`` sits at zero,
    and the few anchors that hold its mass get the exact identity

        logit_j - logit_b = (l_j - l_b) - (1 - t) / t^2 <a_b - a_j, o_b + (1 - t) (a_b - a_j) / 2>,

    with ``o_b = x - (1 - t) a_b``: a product of the small difference of two anchors, formed first, and a
    vector of the size of the row's offset. The others, whose probabilities are negligible, keep the expansion.

    Args:
      logits: (B, N) expansion logits; best_offset: ``best anchors (B, D) -> o_b (B, D)``.
    """
    candidates = min(candidates, logits.shape[1])
    # The barrier keeps XLA's top-k as a partial selection (a TopK custom call): once its result's slice is fused
    # into the consumers below, XLA:CPU falls back to a full stable sort of every (B, N) row, which made the
    # reverse flow about 3x slower (docs/numerics.md, "Speed: the reverse flow's top-k").
    _, index = jax.lax.optimization_barrier(jax.lax.top_k(jax.lax.stop_gradient(logits), candidates))  # (B, k)
    best = context[index[:, 0]]
    gaps = best[:, None, :] - context[index]  # (B, k, D) a_b - a_j
    middle = best_offset(best)[:, None, :] + (0.5 * (1.0 - time)) * gaps
    weights = log_weights[index]
    # A candidate of weight zero keeps its -inf; the best candidate never has one while any weight is positive.
    refined = (weights - weights[:, :1]) - inner_scale * jnp.sum(gaps * middle, axis=-1)
    shifted = logits - jnp.take_along_axis(logits, index[:, :1], axis=1)
    return shifted.at[_rows(index), index].set(refined), Candidates(index, best, gaps)


class Candidates(NamedTuple):
    """Each row's leading anchors: indices (B, k), best first; the best anchor (B, D); gaps a_b - a_j (B, k, D)."""

    index: jax.Array
    best: jax.Array
    gaps: jax.Array


def _zero_where(mask: jax.Array, values: jax.Array) -> jax.Array:
    """``values`` with zeros where ``mask`` holds, for finite ``values``.

    Written as a select against ``0 * values`` rather than ``jnp.where(mask, 0.0, values)``: inside a flow's loop
    XLA:CPU hoists the latter's broadcast zeros out of the loop as a (B, N) array that every step then reads.
    """
    return jax.lax.select(mask, values * 0.0, values)


def _rows(index):
    return jnp.arange(index.shape[0])[:, None]


def _mean_from_best(probs, context, candidates: Candidates):
    """``sum_j p_j (a_j - a_b)`` (B, D): the leading candidates' share from their exact gaps, the rest (with
    negligible mass) from a matmul; no anchor-sized product cancels."""
    leading = jnp.take_along_axis(probs, candidates.index, axis=1)
    rest = probs.at[_rows(candidates.index), candidates.index].set(0.0)
    rest_share = (jnp.matmul(rest, context, precision=HIGHEST)
                  - jnp.sum(rest, axis=-1, keepdims=True) * candidates.best)
    return rest_share - jnp.einsum("bk,bkd->bd", leading, candidates.gaps, precision=HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def dense_posterior(query, context, context_t, offsets, log_weights, inner_scale, norm_scale, time, distance_scale,
                    refine: bool):
    """``(mean (B, D), log_probs (B, N), residual (B, D))`` of the posterior at one time; ``residual = x - mean``.

    Args:
      query: (B, D) the points x; context: (N, D) anchors; context_t: (D, N) ``context.T``, which receives the
      anchors' whole cotangent (see the module docstring); offsets: (N,) their squared norms;
      log_weights: (N,); inner_scale, norm_scale, time, distance_scale: scalars of
      :class:`velocity.TimeCoefficients`; refine: recompute each row's leading logits from exact differences
      (:func:`_refine_leading_logits`) and form the mean and ``x - mean`` from each row's best anchor, as
      ``(x - a_b) - sum_j p_j (a_j - a_b)``, so that neither is the difference of anchor-sized numbers. The
      backward pass is the expansion's either way: the two agree in exact arithmetic, and its errors are
      relative to the cotangents.
    """
    logits = _logits(query, context, offsets, log_weights, inner_scale, norm_scale)
    if not refine:
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        mean = jnp.matmul(jnp.exp(log_probs), context, precision=HIGHEST)
        return mean, log_probs, query - mean
    logits, candidates = _refine_leading_logits(logits, context, log_weights, inner_scale, time,
                                                lambda best: offset_from(query, best, time), REFINED_CANDIDATES)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    mean_from_best = _mean_from_best(jnp.exp(log_probs), context, candidates)
    return candidates.best + mean_from_best, log_probs, (query - candidates.best) - mean_from_best


def _dense_posterior_fwd(query, context, context_t, offsets, log_weights, inner_scale, norm_scale, time,
                         distance_scale, refine):
    outputs = dense_posterior(query, context, context_t, offsets, log_weights, inner_scale, norm_scale, time,
                              distance_scale, refine)
    return outputs, (query, context, offsets, jnp.exp(outputs[1]), inner_scale, norm_scale)


def _dense_posterior_bwd(refine, residuals, cotangents):
    query, context, offsets, probs, inner_scale, norm_scale = residuals
    g_mean, g_log_probs, g_residual = cotangents
    # residual = x - mean: its cotangent reaches the query directly and the mean with the opposite sign.
    g_query, g_context_t, g_offsets, g_log_weights = _input_cotangents(
        query, context, offsets, probs, inner_scale, norm_scale, g_mean - g_residual, g_log_probs)
    # The time grid is static and carries no gradient.
    zero = jnp.zeros_like(inner_scale)
    return g_query + g_residual, None, g_context_t, g_offsets, g_log_weights, zero, zero, zero, zero


dense_posterior.defvjp(_dense_posterior_fwd, _dense_posterior_bwd)


# ------------------------------------------------------------------------------------------------ from pivots


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def dense_pivot_posterior(query, context, context_t, pivots, pivot_distances, own_index, log_weights, inner_scale,
                          norm_scale, time, distance_scale, refine: bool):
    """``(mean_offset (B, D), log_probs (B, N))``: the posterior mean relative to each row's pivot.

    Args:
      query: (B, D) ``x_b - (1 - t) r_b`` (:func:`offset_from`); context: (N, D); context_t: (D, N)
      ``context.T``, which receives the anchors' whole cotangent (module docstring); pivots: (B, D) the ``r_b``;
      pivot_distances: (B, N) ``|a_j - r_b|^2`` from :func:`pivot_squared_distances` of these pivots and this
      context, with its gradient stopped (``_evaluator.pivot_origin``): the backward pass differentiates the
      logits through the distances itself and returns no cotangent for them; own_index: (B,) int or
      None: the column of ``context`` that holds each row's pivot itself, the same differentiable value (the
      forward flow of a batch against its own anchors), which the backward pass then treats as one
      (:func:`_dense_pivot_posterior_bwd`); log_weights: (N,);
      refine: recompute each row's leading logits from exact differences (:func:`_refine_leading_logits`).
    Returns:
      ``sum_j p_bj (a_j - r_b)`` and the normalised log posterior.
    """
    logits = _logits(query, context, pivot_distances, log_weights, inner_scale, norm_scale)
    if refine:
        # x - (1 - t) a_b = q + (1 - t) (r - a_b), with the pivot difference formed exactly first.
        logits, _ = _refine_leading_logits(logits, context, log_weights, inner_scale, time,
                                           lambda best: query + (1.0 - time) * (pivots - best), REFINED_CANDIDATES)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    # Anchors at distance zero from the pivot add exactly nothing to sum_j p_bj (a_j - r_b). Leaving them out
    # of both products below makes each product as small as the result, so neither cancels: the own anchor
    # holds almost all the mass early in the flow, where x - mean is tiny.
    others = _zero_where(pivot_distances == 0, probs)
    mean_offset = jnp.matmul(others, context, precision=HIGHEST) - jnp.sum(others, -1, keepdims=True) * pivots
    return mean_offset, log_probs


def _dense_pivot_posterior_fwd(*primals):
    # With symbolic zeros (see defvjp below) the differentiable inputs arrive wrapped.
    *primals, refine = [getattr(primal, "value", primal) for primal in primals]
    (query, context, context_t, pivots, pivot_distances, own_index, log_weights, inner_scale, norm_scale, time,
     distance_scale) = primals
    outputs = dense_pivot_posterior(query, context, context_t, pivots, pivot_distances, own_index, log_weights,
                                    inner_scale, norm_scale, time, distance_scale, refine)
    residuals = (query, context, context_t, pivots, pivot_distances, own_index, jnp.exp(outputs[1]), inner_scale,
                 norm_scale, time)
    return outputs, residuals


def _dense_pivot_posterior_bwd(refine, residuals, cotangents):
    """The origin kernel's backward pass, for an output measured from the pivots.

    The output is ``sum_j p_bj (a_j - r_b)``. Its term for an anchor ``a_j`` contributes ``p_bj g_b`` to that
    anchor's cotangent and ``-p_bj g_b`` to the pivot's. Where that anchor *is* the row's pivot (``own_index``),
    the two are the same value's, and their sum is exactly zero: both are left out. This matters because early in
    a forward flow the own anchor holds almost all the mass and each of the two is as large as the state's
    cotangent, up to 1e4 times the gradient; summed after the fact, their float32 rounding would be all that
    is left of it (docs/numerics.md, "Conditioning of the flow and gradient cancellation"). Anchors that only
    coincide with the pivot in value keep both contributions, as they are different inputs.
    """
    query, context, context_t, pivots, pivot_distances, own_index, probs, inner_scale, norm_scale, time = residuals
    g_mean, g_log_probs = cotangents
    if type(g_mean) is SymbolicZero:
        g_mean = jnp.zeros(g_mean.shape, g_mean.dtype)
    g_logits = _logit_cotangents(context, probs, g_mean, g_log_probs)
    # g_logits rows sum to zero, so g_logits @ context = sum_j g_bj (a_j - r_b): formed from the anchors that
    # differ from the pivot, as in the forward pass, it is small where the row sits in its own zone instead of
    # a difference of anchor-sized products (which 1/t^2 would then amplify).
    others = _zero_where(pivot_distances == 0, g_logits)
    g_query = inner_scale * (jnp.matmul(others, context, precision=HIGHEST)
                             - jnp.sum(others, axis=-1, keepdims=True) * pivots)
    mean_weights = probs
    if own_index is not None:
        own = jnp.arange(probs.shape[1], dtype=own_index.dtype)[None, :] == own_index[:, None]
        mean_weights = _zero_where(own, probs)
    # The logits reach the anchors and the pivots through the distances too, -n |a_j - r_b|^2, and that
    # derivative is formed here, step by step, so that no (B, N) cotangent of the distances is carried through the
    # flow (the distances come in without one: _evaluator.pivot_origin stops their gradient). Towards the pivots
    # it is 2n sum_j g_bj (a_j - r_b) = (1 - t) g_query, as 2n = (1 - t) s. Towards the anchors it is
    # 2n sum_b g_bj (r_b - a_j), which joins the product of the query: one (D + 1, N) product whose last row is
    # the column sums of g_logits.
    two_n = 2.0 * norm_scale
    weighted = jnp.concatenate([inner_scale * query + two_n * pivots, jnp.ones_like(pivots[:, :1])], axis=1)
    logit_share = row_sum_product(weighted, g_logits)
    g_log_weights = logit_share[-1]
    g_context_t = (row_sum_product(g_mean, mean_weights) + logit_share[:-1]) - two_n * context_t * g_log_weights
    g_pivots = -jnp.sum(mean_weights, axis=-1, keepdims=True) * g_mean + (1.0 - time) * g_query
    zero = jnp.zeros_like(inner_scale)
    return (g_query, None, g_context_t, g_pivots, None, None, g_log_weights, zero, zero, zero, zero)


# Symbolic zeros: the forward flows never use the log posterior, so its cotangent, a (B, N) array of zeros,
# is neither formed nor read (in exact and in float arithmetic, adding it changes nothing).
dense_pivot_posterior.defvjp(_dense_pivot_posterior_fwd, _dense_pivot_posterior_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------------------ exact pivot distances

# Elements of the (B, block, D) difference tensor per block of pivot_squared_distances (64 MB in float32).
_DIFFERENCE_BLOCK_ELEMENTS = 1 << 24


def split_blocks(array: jax.Array, block_size: int, fill) -> jax.Array:
    """Pads the leading axis to a multiple of ``block_size`` and reshapes to (num_blocks, block_size, ...)."""
    n = array.shape[0]
    num_blocks = -(-n // block_size)
    pad = num_blocks * block_size - n
    if pad:
        array = jnp.concatenate([array, jnp.full((pad,) + array.shape[1:], fill, array.dtype)])
    return array.reshape((num_blocks, block_size) + array.shape[1:])


def _difference_block(batch: int, dim: int, num_anchors: int) -> int:
    return max(1, min(num_anchors, _DIFFERENCE_BLOCK_ELEMENTS // max(1, batch * dim)))


def _stack_blocks(per_block: jax.Array, batch: int, num_anchors: int) -> jax.Array:
    """(num_blocks, B, block) -> (B, N)."""
    return jnp.moveaxis(per_block, 0, 1).reshape(batch, -1)[:, :num_anchors]


# Rows and columns of the square blocks of pivot_squared_distances when the pivots are the context.
_SYMMETRIC_BLOCK = 128


def pivot_squared_distances(pivots: jax.Array, context: jax.Array, symmetric: bool = False) -> jax.Array:
    """(B, N) squared distances ``|a_j - r_b|^2`` from exact differences, streamed over anchor blocks.

    Unlike the expansion ``|a|^2 - 2 <a, r> + |r|^2`` it keeps full relative precision for nearby pairs, the
    only ones whose logits matter late in the flow, and it is exactly zero where an anchor equals the pivot.
    Memory O(B * block * D) with ~64 MB blocks; computed once per flow. The flows do not differentiate it: the
    dense pivot kernel forms the logits' derivative through the distances itself (:func:`dense_pivot_posterior`).

    Args:
      pivots: (B, D); context: (N, D); symmetric: the caller guarantees that ``pivots`` and ``context`` hold
        the same values (the forward flow with the rows' own anchors as context): only the blocks on and
        above the diagonal are computed and the others mirrored, bit for bit the same result at about half
        the cost, since ``(a_j - a_b)^2`` and ``(a_b - a_j)^2`` round alike.
    """
    if symmetric:
        return _symmetric_squared_distances(context)
    batch, dim = pivots.shape
    blocks = split_blocks(context, _difference_block(batch, dim, context.shape[0]), 0.0)

    def block_distances(anchors):
        differences = anchors[None, :, :] - pivots[:, None, :]
        return jnp.sum(differences * differences, axis=-1)

    return _stack_blocks(jax.lax.map(block_distances, blocks), batch, context.shape[0])


def _symmetric_squared_distances(context: jax.Array) -> jax.Array:
    """(N, N) ``|a_j - a_b|^2``, computed for the square blocks on and above the diagonal, each summed over D
    exactly as the general case sums it, and mirrored below it."""
    num_anchors = context.shape[0]
    blocks = split_blocks(context, _SYMMETRIC_BLOCK, 0.0)  # (num_blocks, block, D)
    num_blocks = blocks.shape[0]
    rows, cols = np.triu_indices(num_blocks)

    def block_distances(pair):
        differences = blocks[pair[1]][None, :, :] - blocks[pair[0]][:, None, :]
        return jnp.sum(differences * differences, axis=-1)

    upper = jax.lax.map(block_distances, jnp.stack([rows, cols], axis=1))  # (pairs, block, block)
    # Tile (i, j) is computed pair (min, max), transposed below the diagonal. A gather with static indices and a
    # select assemble the tiles in one pass; a scatter into a zero array (``.at[].set``) took three times as long
    # on XLA:CPU.
    pair_of = np.zeros((num_blocks, num_blocks), np.int32)
    pair_of[rows, cols] = pair_of[cols, rows] = np.arange(rows.size, dtype=np.int32)
    below = np.tril(np.ones((num_blocks, num_blocks), bool), -1)[:, :, None, None]
    gathered = upper[pair_of]  # (num_blocks, num_blocks, block, block)
    tiles = jnp.where(below, jnp.swapaxes(gathered, 2, 3), gathered)
    size = num_blocks * _SYMMETRIC_BLOCK
    return jnp.swapaxes(tiles, 1, 2).reshape(size, size)[:num_anchors, :num_anchors]
