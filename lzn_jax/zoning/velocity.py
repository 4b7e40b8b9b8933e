"""Closed-form posterior over anchors and the latent-flow velocity (SPEC.md §1.2), in log space.

Code time convention throughout: anchors at t = 0, the Gaussian at t = 1, ``x_t = (1 - t) a + t eps``.
For a point ``x`` at time ``t`` the posterior over the N anchors is

    log pi_j = log c_j + [(1 - t) <x, a_j> - 1/2 (1 - t)^2 |a_j|^2] / t^2 - logsumexp(...)

(the ``|x|^2`` term is common to all anchors and cancels), the posterior mean is ``pi @ A`` and the velocity
is ``(x - mean) / t``. This needs a ``(B, N)`` logits matrix, never the reference's ``(B, N, D)`` broadcast.

Two interchangeable kernels compute ``(mean, log_probs)``, each with a hand-written backward pass:
* dense: keeps the ``(B, N)`` posterior as the only residual, so the backward pass costs four matmuls and
  recomputes nothing;
* blockwise (``block_size=``): streams a log-sum-exp over blocks of anchors, flash-attention style, keeping
  only ``(B,)`` statistics as residuals; memory O(B * block_size) in both passes.

Float32 and nearby anchors (SPEC.md §8 M5). The expansion cancels: its terms are of size |x||a| / t^2 while
the logits that decide between two nearby anchors differ by far less. The forward flow therefore measures the
logits from a reference point per row, its own anchor r_b (any point gives the same posterior):

    logits_bj = [(1 - t) <x_b - (1 - t) r_b, a_j> - 1/2 (1 - t)^2 |a_j - r_b|^2] / t^2  (+ a per-row constant)

with the small offset ``x_b - (1 - t) r_b`` formed first and the time-independent squared distances
``|a_j - r_b|^2`` computed once per flow from exact differences (:func:`reference_squared_distances`).

The per-step time coefficients are static: :func:`time_coefficients` computes them in float64 on the host.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


class TimeCoefficients(NamedTuple):
    """Scalars that turn inner products into logits at one time ``t``.

    ``logits = signal * (x @ A.T) - quadratic * |a|^2 + log_weights`` with ``signal = (1 - t) / t^2``,
    ``quadratic = (1 - t)^2 / (2 t^2)``; ``decay = 1 - t`` scales the reference point (module docstring).
    """

    signal: jax.Array | float
    quadratic: jax.Array | float
    decay: jax.Array | float


class ZoneReference(NamedTuple):
    """Per-row reference points for the logits (module docstring): points (B, D) and their squared distances
    to every context anchor (B, N), from :func:`reference_squared_distances`."""

    points: jax.Array
    squared_distances: jax.Array


def time_coefficients(t: float | np.ndarray) -> TimeCoefficients:
    """Logit coefficients at time(s) ``t`` in (0, 1], computed in float64 on the host.

    Args:
      t: a Python float or a NumPy array of times (any shape). Must be concrete: the time grid is static.
    Returns:
      ``TimeCoefficients`` of float64 NumPy values with the shape of ``t``.
    """
    t = np.asarray(t, dtype=np.float64)
    if np.any(t <= 0) or np.any(t > 1):
        raise ValueError(f"time must lie in (0, 1], got {t}")
    return TimeCoefficients(signal=(1.0 - t) / t**2, quadratic=0.5 * (1.0 - t) ** 2 / t**2, decay=1.0 - t)


def solver_dtype(*arrays: jax.Array) -> jnp.dtype:
    """The dtype the solver computes in: float64 if any input is float64 (x64 runs), else float32.

    bfloat16 / float16 inputs are promoted: the latent flow is ill-conditioned near t = 0 (SPEC.md §8 item 4).
    """
    if any(jnp.asarray(a).dtype == jnp.float64 for a in arrays if a is not None):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _logits(query, context, offsets, log_weights, signal, quadratic):
    """``(B, N)`` logits ``signal <query, a_j> - quadratic offsets + log_weights``.

    query (B, D) is x, or its offset from the row's reference point; offsets are the anchors' squared norms (N,)
    or their squared distances to the reference points (B, N); log_weights (N,).
    """
    return signal * jnp.matmul(query, context.T, precision=HIGHEST) - quadratic * offsets + log_weights


def _squared_norms(context):
    return jnp.sum(context * context, axis=-1)


# --------------------------------------------------------------------------------------------------------------
# Dense kernel: residual = the (B, N) posterior.
# --------------------------------------------------------------------------------------------------------------


@jax.custom_vjp
def _dense_posterior(query, context, offsets, log_weights, signal, quadratic):
    """(mean (B, D), log_probs (B, N)) of the posterior at one time; see :func:`_logits` for the inputs."""
    log_probs = jax.nn.log_softmax(_logits(query, context, offsets, log_weights, signal, quadratic), axis=-1)
    mean = jnp.matmul(jnp.exp(log_probs), context, precision=HIGHEST)
    return mean, log_probs


def _dense_posterior_fwd(query, context, offsets, log_weights, signal, quadratic):
    mean, log_probs = _dense_posterior(query, context, offsets, log_weights, signal, quadratic)
    return (mean, log_probs), (query, context, offsets, jnp.exp(log_probs), signal, quadratic)


def _logit_cotangents(context, probs, g_mean, g_log_probs):
    """Backward of ``logits -> (softmax @ context, log_softmax)``.

    Returns d(loss)/d(logits) (B, N) and the direct contribution of ``mean = probs @ context`` to
    d(loss)/d(context) (N, D).
    """
    g_probs = jnp.matmul(g_mean, context.T, precision=HIGHEST)
    # sum_j probs_j g_probs_j equals <g_mean, mean> in exact arithmetic, but when the posterior is one-hot only
    # this form cancels exactly against g_probs; the shortcut leaves rounding noise that the 1/t^2 scale of the
    # logits then amplifies by up to 1e8 (measured: 5e-10 relative noise in float64 anchor gradients).
    g_logits = probs * (g_probs - jnp.sum(probs * g_probs, axis=-1, keepdims=True))
    g_logits = g_logits + g_log_probs - probs * jnp.sum(g_log_probs, axis=-1, keepdims=True)
    return g_logits, jnp.matmul(probs.T, g_mean, precision=HIGHEST)


def _inner_product_cotangents(query, context, signal, g_logits, g_context):
    """Backward of ``signal * query @ context.T``: cotangents of query (B, D) and context (N, D), and the
    column sums of g_logits (N,) (the log-weights' cotangent)."""
    g_query = signal * jnp.matmul(g_logits, context, precision=HIGHEST)
    g_context = g_context + signal * jnp.matmul(g_logits.T, query, precision=HIGHEST)
    return g_query, g_context, jnp.sum(g_logits, axis=0)


def _dense_posterior_bwd(residuals, cotangents):
    query, context, offsets, probs, signal, quadratic = residuals
    g_mean, g_log_probs = cotangents
    g_logits, g_context = _logit_cotangents(context, probs, g_mean, g_log_probs)
    g_query, g_context, g_log_weights = _inner_product_cotangents(query, context, signal, g_logits, g_context)
    g_offsets = -quadratic * (g_log_weights if offsets.ndim == 1 else g_logits)
    # The time grid is static and carries no gradient (SPEC.md §1.8).
    return g_query, g_context, g_offsets, g_log_weights, jnp.zeros_like(signal), jnp.zeros_like(quadratic)


_dense_posterior.defvjp(_dense_posterior_fwd, _dense_posterior_bwd)


# --------------------------------------------------------------------------------------------------------------
# Blockwise kernel: streaming log-sum-exp over anchor blocks; residuals are O(B) statistics only.
# --------------------------------------------------------------------------------------------------------------


def _split_blocks(array, block_size, fill):
    """Pads the leading axis to a multiple of ``block_size`` and reshapes to (num_blocks, block_size, ...)."""
    n = array.shape[0]
    num_blocks = -(-n // block_size)
    pad = num_blocks * block_size - n
    if pad:
        array = jnp.concatenate([array, jnp.full((pad,) + array.shape[1:], fill, array.dtype)])
    return array.reshape((num_blocks, block_size) + array.shape[1:])


def _finite_or_zero(value):
    # A block (or a whole row) whose anchors all have zero weight has max logit -inf; shifting by it would
    # compute -inf - (-inf) = NaN.
    return jnp.where(jnp.isfinite(value), value, 0.0)


def _blockwise_statistics(x, context, log_weights, signal, quadratic, block_size):
    """Streams over anchor blocks; returns mean (B, D) and the row log-sum-exp of the logits (B,)."""
    batch, dim = x.shape
    blocks = _split_blocks(context, block_size, 0.0)
    weight_blocks = _split_blocks(log_weights, block_size, -jnp.inf)

    def accumulate(carry, block):
        running_max, running_sum, running_weighted = carry
        anchors, block_log_weights = block
        logits = _logits(x, anchors, _squared_norms(anchors), block_log_weights, signal, quadratic)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        shift = _finite_or_zero(new_max)
        rescale = jnp.exp(running_max - shift)
        probs = jnp.exp(logits - shift[:, None])
        running_sum = running_sum * rescale + jnp.sum(probs, axis=-1)
        running_weighted = running_weighted * rescale[:, None] + jnp.matmul(probs, anchors, precision=HIGHEST)
        return (new_max, running_sum, running_weighted), None

    init = (
        jnp.full((batch,), -jnp.inf, x.dtype),
        jnp.zeros((batch,), x.dtype),
        jnp.zeros((batch, dim), x.dtype),
    )
    (row_max, row_sum, weighted), _ = jax.lax.scan(accumulate, init, (blocks, weight_blocks))
    return weighted / row_sum[:, None], _finite_or_zero(row_max) + jnp.log(row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise_posterior(x, context, log_weights, signal, quadratic, block_size):
    """(mean (B, D), log-sum-exp (B,)) computed over anchor blocks of ``block_size``."""
    return _blockwise_statistics(x, context, log_weights, signal, quadratic, block_size)


def _blockwise_posterior_fwd(x, context, log_weights, signal, quadratic, block_size):
    mean, log_normaliser = _blockwise_statistics(x, context, log_weights, signal, quadratic, block_size)
    return (mean, log_normaliser), (x, context, log_weights, signal, quadratic, log_normaliser)


def _blockwise_posterior_bwd(block_size, residuals, cotangents):
    x, context, log_weights, signal, quadratic, log_normaliser = residuals
    g_mean, g_log_normaliser = cotangents
    n = context.shape[0]
    blocks = _split_blocks(context, block_size, 0.0)
    weight_blocks = _split_blocks(log_weights, block_size, -jnp.inf)

    def block_posterior(block):
        anchors, block_log_weights = block
        logits = _logits(x, anchors, _squared_norms(anchors), block_log_weights, signal, quadratic)
        return jnp.exp(logits - log_normaliser[:, None]), jnp.matmul(g_mean, anchors.T, precision=HIGHEST)

    # First pass: sum_j probs_j g_probs_j from the same products the second pass subtracts it from, so that a
    # one-hot posterior cancels exactly (see _logit_cotangents); the flash-attention shortcut <g_mean, mean>
    # would leave rounding noise amplified by the 1/t^2 logit scale.
    def accumulate_row_dot(row_dot, block):
        probs, g_probs = block_posterior(block)
        return row_dot + jnp.sum(probs * g_probs, axis=-1), None

    row_dot, _ = jax.lax.scan(accumulate_row_dot, jnp.zeros_like(log_normaliser), (blocks, weight_blocks))
    shift = (g_log_normaliser - row_dot)[:, None]

    def block_cotangents(g_x, block):
        probs, g_probs = block_posterior(block)
        # d lse / d logits = probs, so the log-normaliser's cotangent enters as a constant shift of g_probs.
        g_logits = probs * (g_probs + shift)
        anchors = block[0]
        g_anchors = jnp.matmul(probs.T, g_mean, precision=HIGHEST)
        g_x_block, g_anchors, g_block_log_weights = _inner_product_cotangents(x, anchors, signal, g_logits, g_anchors)
        g_anchors = g_anchors - (2.0 * quadratic) * g_block_log_weights[:, None] * anchors
        return g_x + g_x_block, (g_anchors, g_block_log_weights)

    g_x, (g_blocks, g_weight_blocks) = jax.lax.scan(block_cotangents, jnp.zeros_like(x), (blocks, weight_blocks))
    g_context = g_blocks.reshape((-1, context.shape[1]))[:n]
    g_log_weights = g_weight_blocks.reshape(-1)[:n]
    return g_x, g_context, g_log_weights, jnp.zeros_like(signal), jnp.zeros_like(quadratic)


_blockwise_posterior.defvjp(_blockwise_posterior_fwd, _blockwise_posterior_bwd)


# --------------------------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------------------------


def _varying_axes(array) -> frozenset:
    manual = getattr(jax.typeof(array), "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset()


def match_varying_axes(*arrays):
    """Inside ``shard_map``, marks every array as varying over the union of the arrays' varying mesh axes.

    A custom VJP must return cotangents of its inputs' types; a replicated input (say log-weights) used by
    per-device rows gets a per-device cotangent. Casting it to varying before the call moves the sum over
    devices into the cast's transpose, outside the custom rule. Outside ``shard_map`` this does nothing.
    """
    axes = frozenset().union(*(_varying_axes(a) for a in arrays))
    if not axes:
        return arrays
    return tuple(
        a if _varying_axes(a) == axes else jax.lax.pcast(a, tuple(sorted(axes - _varying_axes(a))), to="varying")
        for a in arrays
    )


def _resolve_log_weights(log_weights, num_anchors, dtype):
    if log_weights is None:
        return jnp.zeros((num_anchors,), dtype)
    return jnp.asarray(log_weights, dtype)


# Elements of the (B, block, D) difference tensor per block of reference_squared_distances (64 MB in float32).
_DIFFERENCE_BLOCK_ELEMENTS = 1 << 24


@jax.custom_vjp
def reference_squared_distances(points: jax.Array, context: jax.Array) -> jax.Array:
    """(B, N) squared distances ``|a_j - r_b|^2`` from exact differences, streamed over anchor blocks.

    Unlike the expansion ``|a|^2 - 2 <a, r> + |r|^2`` it keeps full relative precision for nearby pairs, the
    only ones whose logits matter late in the flow. Memory O(B * block * D) with ~64 MB blocks. The backward
    pass uses the matmul form, whose error is relative to the cotangent, not amplified by 1/t^2.

    Args:
      points: (B, D) reference points; context: (N, D) anchors.
    """
    batch, dim = points.shape
    block = max(1, min(context.shape[0], _DIFFERENCE_BLOCK_ELEMENTS // max(1, batch * dim)))
    blocks = _split_blocks(context, block, 0.0)

    def block_distances(anchors):
        differences = anchors[None, :, :] - points[:, None, :]
        return jnp.sum(differences * differences, axis=-1)

    distances = jax.lax.map(block_distances, blocks)  # (num_blocks, B, block)
    return jnp.moveaxis(distances, 0, 1).reshape(batch, -1)[:, : context.shape[0]]


def _reference_squared_distances_fwd(points, context):
    return reference_squared_distances(points, context), (points, context)


def _reference_squared_distances_bwd(residuals, g_distances):
    points, context = residuals
    # d/d a_j |a_j - r_b|^2 = 2 (a_j - r_b) and d/d r_b = -2 (a_j - r_b), summed with the cotangents.
    g_context = 2.0 * (jnp.sum(g_distances, axis=0)[:, None] * context
                       - jnp.matmul(g_distances.T, points, precision=HIGHEST))
    g_points = 2.0 * (jnp.sum(g_distances, axis=1)[:, None] * points
                      - jnp.matmul(g_distances, context, precision=HIGHEST))
    return g_points, g_context


reference_squared_distances.defvjp(_reference_squared_distances_fwd, _reference_squared_distances_bwd)


def zone_reference(points: jax.Array, context: jax.Array) -> ZoneReference:
    """The reference for rows whose own anchors are ``points`` (B, D), against ``context`` (N, D)."""
    return ZoneReference(points, reference_squared_distances(points, context))


def posterior(
    x: jax.Array,
    context: jax.Array,
    coefficients: TimeCoefficients,
    *,
    log_weights: jax.Array | None = None,
    block_size: int | None = None,
    reference: ZoneReference | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Posterior mean of the anchors and the normalised log posterior at one time.

    Args:
      x: (B, D) current points.
      context: (N, D) anchors defining the zones.
      coefficients: ``time_coefficients(t)`` (host float64, or traced scalars inside a scan).
      log_weights: (N,) log mixture weights (``-inf`` excludes an anchor); None means uniform.
      block_size: None for the dense kernel; an int streams over anchor blocks of that size.
      reference: per-row reference points (dense kernel only), which make the logits exact for nearby anchors
        in float32; the posterior is the same in exact arithmetic.
    Returns:
      ``(mean (B, D), log_probs)``: with the dense kernel ``log_probs`` is the (B, N) normalised log posterior;
      with the blockwise kernel it is the (B,) log normaliser ``logsumexp_j logits_j`` instead (the full matrix
      is what the blockwise kernel avoids; a column is ``logits_bj - normaliser_b``, see :func:`target_log_prob`).
    """
    dtype = x.dtype
    log_weights = _resolve_log_weights(log_weights, context.shape[0], dtype)
    signal = jnp.asarray(coefficients.signal, dtype)
    quadratic = jnp.asarray(coefficients.quadratic, dtype)
    if block_size is not None:
        if reference is not None:
            raise ValueError("the blockwise kernel takes no reference points")
        x, context, log_weights, signal, quadratic = match_varying_axes(x, context, log_weights, signal, quadratic)
        return _blockwise_posterior(x, context, log_weights, signal, quadratic, int(block_size))
    if reference is None:
        query, offsets = x, _squared_norms(context)
    else:
        # The offset from the reference is formed before any product, so it keeps its own precision.
        query = x - jnp.asarray(coefficients.decay, dtype) * reference.points
        offsets = reference.squared_distances
    operands = match_varying_axes(query, context, offsets, log_weights, signal, quadratic)
    return _dense_posterior(*operands)


def target_log_prob(
    x: jax.Array,
    targets_context: jax.Array,
    target_log_weights: jax.Array | None,
    coefficients: TimeCoefficients,
    log_normaliser: jax.Array,
) -> jax.Array:
    """Log posterior of one given anchor per row from the row's log normaliser (blockwise kernel).

    Args:
      x: (B, D) points; targets_context: (B, D) the target anchor of every row;
      target_log_weights: (B,) their log weights (None: uniform); log_normaliser: (B,) from :func:`posterior`.
    Returns:
      (B,) ``log pi_{b, k_b}``.
    """
    signal = jnp.asarray(coefficients.signal, x.dtype)
    quadratic = jnp.asarray(coefficients.quadratic, x.dtype)
    logits = signal * jnp.sum(x * targets_context, -1) - quadratic * jnp.sum(targets_context**2, -1)
    if target_log_weights is not None:
        logits = logits + target_log_weights
    return logits - log_normaliser


def posterior_log_probs(
    x: jax.Array, t: float, context: jax.Array, *, log_weights: jax.Array | None = None
) -> jax.Array:
    """(B, N) normalised log posterior ``log P(anchor j | x at time t)``; t in (0, 1] is a static float."""
    dtype = solver_dtype(x, context)
    _, log_probs = posterior(
        jnp.asarray(x, dtype), jnp.asarray(context, dtype), time_coefficients(t), log_weights=log_weights
    )
    return log_probs


def velocity(
    x: jax.Array,
    t: float,
    context: jax.Array,
    *,
    log_weights: jax.Array | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """The latent-flow velocity ``dx/dt = (x - mean) / t`` at static time t in (0, 1].

    Args:
      x: (B, D) points at time t; context: (N, D) anchors; log_weights: (N,) or None.
    Returns:
      (B, D) velocity, pointing from the anchors (t = 0) towards the Gaussian (t = 1).
    """
    dtype = solver_dtype(x, context)
    x = jnp.asarray(x, dtype)
    mean, _ = posterior(
        x, jnp.asarray(context, dtype), time_coefficients(t), log_weights=log_weights, block_size=block_size
    )
    return (x - mean) / jnp.asarray(t, dtype)


# --------------------------------------------------------------------------------------------------------------
# Rematerialisation policy shared by the solvers.
# --------------------------------------------------------------------------------------------------------------

# Per device. Saving every step's (B, N) posterior lets the backward pass reuse the forward matmuls; past this
# budget each step is rematerialised instead (two extra matmuls per step, O(B*N) memory in all).
DEFAULT_MEMORY_BUDGET_BYTES = 2 * 1024**3


def saved_posteriors_bytes(num_steps: int, batch: int, num_anchors: int, dim: int, dtype) -> int:
    """Bytes the dense kernel keeps for the backward pass if no step is rematerialised."""
    return num_steps * batch * (num_anchors + 2 * dim) * jnp.dtype(dtype).itemsize


def rematerialise(evaluate, *, num_steps, batch, num_anchors, dim, dtype, block_size, memory_budget_bytes):
    """Wraps a solver's posterior evaluation in ``jax.checkpoint`` when saving every step's posterior would
    exceed the memory budget.

    Only the evaluation is rematerialised: the solver updates around it are linear in the saved states, so
    each step then keeps just the point it evaluated at, (B, D). The blockwise kernel keeps only O(B * D)
    residuals and recomputes its blocks in its own backward pass, so it is never rematerialised a second time.
    """
    if block_size is not None:
        return evaluate
    if saved_posteriors_bytes(num_steps, batch, num_anchors, dim, dtype) <= memory_budget_bytes:
        return evaluate
    return jax.checkpoint(evaluate, policy=jax.checkpoint_policies.nothing_saveable)
