"""The dense posterior kernel: a ``(B, N)`` logits matmul, a log-softmax, and a hand-written backward pass.

The only residual is the ``(B, N)`` posterior, so the backward pass is four matmuls and recomputes nothing.
Two variants share the backward pass:

* :func:`dense_posterior` measures everything from the origin: ``mean = softmax @ context``;
* :func:`dense_pivot_posterior` measures from a per-row pivot point ``r_b`` (the row's own anchor in the forward
  flow): the logits use the offset ``x_b - (1 - t) r_b`` and the exact squared distances ``|a_j - r_b|^2``, and
  the output is the posterior mean *relative to the pivot*, ``sum_j p_bj (a_j - r_b)``. Both are small where the
  row sits inside its own zone, so they keep their own relative precision in float32 instead of being the
  difference of two numbers of the anchors' size. docs/numerics.md, "Logits measured from a pivot point".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


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
    """Backward of ``logits -> (softmax @ context, log_softmax)``.

    Returns d(loss)/d(logits) (B, N) and the direct contribution of ``mean = probs @ context`` to
    d(loss)/d(context) (N, D).
    """
    g_probs = jnp.matmul(g_mean, context.T, precision=HIGHEST)
    # sum_j probs_j g_probs_j equals <g_mean, mean> in exact arithmetic, but when the posterior is one-hot only
    # this form cancels exactly against g_probs; the shortcut leaves rounding noise that the 1/t^2 scale of the
    # logits then amplifies by up to 1e8.
    g_logits = probs * (g_probs - jnp.sum(probs * g_probs, axis=-1, keepdims=True))
    g_logits = g_logits + g_log_probs - probs * jnp.sum(g_log_probs, axis=-1, keepdims=True)
    return g_logits, jnp.matmul(probs.T, g_mean, precision=HIGHEST)


def _input_cotangents(query, context, offsets, probs, inner_scale, norm_scale, g_mean, g_log_probs):
    """Cotangents of (query, context, offsets, log_weights) shared by both kernels."""
    g_logits, g_context = _logit_cotangents(context, probs, g_mean, g_log_probs)
    g_query = inner_scale * jnp.matmul(g_logits, context, precision=HIGHEST)
    g_context = g_context + inner_scale * jnp.matmul(g_logits.T, query, precision=HIGHEST)
    g_log_weights = jnp.sum(g_logits, axis=0)
    g_offsets = -norm_scale * (g_log_weights if offsets.ndim == 1 else g_logits)
    return g_query, g_context, g_offsets, g_log_weights


# ------------------------------------------------------------------------------------------------ from origin


@jax.custom_vjp
def dense_posterior(query, context, offsets, log_weights, inner_scale, norm_scale):
    """``(mean (B, D), log_probs (B, N))`` of the posterior at one time.

    Args:
      query: (B, D) the points x; context: (N, D) anchors; offsets: (N,) their squared norms;
      log_weights: (N,); inner_scale, norm_scale: scalars of :class:`velocity.TimeCoefficients`.
    """
    log_probs = _log_posterior(query, context, offsets, log_weights, inner_scale, norm_scale)
    return jnp.matmul(jnp.exp(log_probs), context, precision=HIGHEST), log_probs


def _dense_posterior_fwd(query, context, offsets, log_weights, inner_scale, norm_scale):
    mean, log_probs = dense_posterior(query, context, offsets, log_weights, inner_scale, norm_scale)
    return (mean, log_probs), (query, context, offsets, jnp.exp(log_probs), inner_scale, norm_scale)


def _dense_posterior_bwd(residuals, cotangents):
    query, context, offsets, probs, inner_scale, norm_scale = residuals
    g_mean, g_log_probs = cotangents
    grads = _input_cotangents(query, context, offsets, probs, inner_scale, norm_scale, g_mean, g_log_probs)
    # The time grid is static and carries no gradient.
    return (*grads, jnp.zeros_like(inner_scale), jnp.zeros_like(norm_scale))


dense_posterior.defvjp(_dense_posterior_fwd, _dense_posterior_bwd)


# ------------------------------------------------------------------------------------------------ from pivots


@jax.custom_vjp
def dense_pivot_posterior(query, context, pivots, pivot_distances, log_weights, inner_scale, norm_scale):
    """``(mean_offset (B, D), log_probs (B, N))``: the posterior mean relative to each row's pivot.

    Args:
      query: (B, D) ``x_b - (1 - t) r_b`` (:func:`offset_from`); context: (N, D); pivots: (B, D) the ``r_b``;
      pivot_distances: (B, N) ``|a_j - r_b|^2`` from :func:`pivot_squared_distances`; log_weights: (N,).
    Returns:
      ``sum_j p_bj (a_j - r_b)`` and the normalised log posterior.
    """
    log_probs = _log_posterior(query, context, pivot_distances, log_weights, inner_scale, norm_scale)
    probs = jnp.exp(log_probs)
    # Anchors at distance zero from the pivot add exactly nothing to sum_j p_bj (a_j - r_b). Leaving them out
    # of both products below makes each product as small as the result, so neither cancels: the own anchor
    # holds almost all the mass early in the flow, where x - mean is tiny.
    others = jnp.where(pivot_distances == 0, 0.0, probs)
    mean_offset = jnp.matmul(others, context, precision=HIGHEST) - jnp.sum(others, -1, keepdims=True) * pivots
    return mean_offset, log_probs


def _dense_pivot_posterior_fwd(query, context, pivots, pivot_distances, log_weights, inner_scale, norm_scale):
    outputs = dense_pivot_posterior(query, context, pivots, pivot_distances, log_weights, inner_scale, norm_scale)
    residuals = (query, context, pivots, pivot_distances, jnp.exp(outputs[1]), inner_scale, norm_scale)
    return outputs, residuals


def _dense_pivot_posterior_bwd(residuals, cotangents):
    query, context, pivots, pivot_distances, probs, inner_scale, norm_scale = residuals
    g_mean, g_log_probs = cotangents
    # The output is softmax @ context - pivots as a function of independent inputs (the masked terms are zero
    # only where an anchor coincides with the pivot), so its cotangents are the origin kernel's plus -g for
    # the pivots; the pivots' per-row shift of g_probs cancels in the softmax backward.
    g_logits, g_context = _logit_cotangents(context, probs, g_mean, g_log_probs)
    # g_logits rows sum to zero, so g_logits @ context = sum_j g_bj (a_j - r_b): formed from the anchors that
    # differ from the pivot, as in the forward pass, it is small where the row sits in its own zone instead of
    # a difference of anchor-sized products (which 1/t^2 would then amplify).
    others = jnp.where(pivot_distances == 0, 0.0, g_logits)
    g_query = inner_scale * (jnp.matmul(others, context, precision=HIGHEST)
                             - jnp.sum(others, axis=-1, keepdims=True) * pivots)
    g_context = g_context + inner_scale * jnp.matmul(g_logits.T, query, precision=HIGHEST)
    g_log_weights = jnp.sum(g_logits, axis=0)
    return (g_query, g_context, -g_mean, -norm_scale * g_logits, g_log_weights, jnp.zeros_like(inner_scale),
            jnp.zeros_like(norm_scale))


dense_pivot_posterior.defvjp(_dense_pivot_posterior_fwd, _dense_pivot_posterior_bwd)


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


@jax.custom_vjp
def pivot_squared_distances(pivots: jax.Array, context: jax.Array) -> jax.Array:
    """(B, N) squared distances ``|a_j - r_b|^2`` from exact differences, streamed over anchor blocks.

    Unlike the expansion ``|a|^2 - 2 <a, r> + |r|^2`` it keeps full relative precision for nearby pairs, the
    only ones whose logits matter late in the flow, and it is exactly zero where an anchor equals the pivot.
    The backward pass uses the same exact differences, so a pair's gradient is as accurate as its distance.
    Memory O(B * block * D) with ~64 MB blocks; computed once per flow.

    Args:
      pivots: (B, D); context: (N, D).
    """
    batch, dim = pivots.shape
    blocks = split_blocks(context, _difference_block(batch, dim, context.shape[0]), 0.0)

    def block_distances(anchors):
        differences = anchors[None, :, :] - pivots[:, None, :]
        return jnp.sum(differences * differences, axis=-1)

    return _stack_blocks(jax.lax.map(block_distances, blocks), batch, context.shape[0])


def _pivot_squared_distances_fwd(pivots, context):
    return pivot_squared_distances(pivots, context), (pivots, context)


def _pivot_squared_distances_bwd(residuals, g_distances):
    pivots, context = residuals
    batch, dim = pivots.shape
    num_anchors = context.shape[0]
    block = _difference_block(batch, dim, num_anchors)
    blocks = split_blocks(context, block, 0.0)
    g_blocks = jnp.moveaxis(split_blocks(jnp.moveaxis(g_distances, 1, 0), block, 0.0), 2, 1)  # (blocks, B, block)

    # d/d a_j |a_j - r_b|^2 = 2 (a_j - r_b) = -d/d r_b, weighted by the cotangents.
    def block_cotangents(g_pivots, block_inputs):
        anchors, g_block = block_inputs
        weighted = 2.0 * g_block[:, :, None] * (anchors[None, :, :] - pivots[:, None, :])
        return g_pivots - jnp.sum(weighted, axis=1), jnp.sum(weighted, axis=0)

    g_pivots, g_context = jax.lax.scan(block_cotangents, jnp.zeros_like(pivots), (blocks, g_blocks))
    return g_pivots, g_context.reshape(-1, dim)[:num_anchors]


pivot_squared_distances.defvjp(_pivot_squared_distances_fwd, _pivot_squared_distances_bwd)
