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
  only ``(B,)`` statistics as residuals. Its backward pass must recompute the logits and meet the forward's
  log-normaliser exactly, which the expansion cannot promise in float32 (at t = 1e-4 its terms are ~1e8 and two
  compilations of it differ by tens, so exp() overflows); it therefore computes ``-|x - (1 - t) a|^2 / (2 t^2)``
  from exact differences, as the reference does, in ``(B, block_size, D)`` pieces: memory O(B * block_size * D),
  independent of N.

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
    ``quadratic = (1 - t)^2 / (2 t^2)``; ``curvature = 1 / (2 t^2)`` gives the exact-difference logits
    ``-curvature |x - (1 - t) a|^2`` (blockwise kernel).
    """

    signal: jax.Array | float
    quadratic: jax.Array | float
    time: jax.Array | float
    curvature: jax.Array | float


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
    return TimeCoefficients(
        signal=(1.0 - t) / t**2, quadratic=0.5 * (1.0 - t) ** 2 / t**2, time=t, curvature=0.5 / t**2
    )


def time_coefficients_array(times: np.ndarray, dtype) -> TimeCoefficients:
    """``time_coefficients(times)`` computed in float64 on the host, then cast to ``dtype`` arrays (scan inputs)."""
    return TimeCoefficients(*(jnp.asarray(v, dtype) for v in time_coefficients(times)))


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


def offset_from(x, points, time):
    """``x - (1 - t) points`` to full relative precision where x is near (1 - t) points.

    Written as ``(x - points) + t points``: the first difference is exact for nearby values and the second term
    is small, so the result does not depend on whether the compiler fuses a multiply-add (``x - (1 - t) p``
    rounds differently with and without one, by far more than the result's own precision when t is 1e-4).
    """
    return (x - points) + time * points


def _block_logits(x, anchors, block_log_weights, time, curvature):
    """Exact-difference logits of one block: (B, block) and the differences ``x - (1 - t) a`` (B, block, D)."""
    differences = offset_from(x[:, None, :], anchors[None, :, :], time)
    return block_log_weights - curvature * jnp.sum(differences * differences, axis=-1), differences


def _block_starts(num_blocks, block_size):
    return jnp.arange(num_blocks, dtype=jnp.int32) * block_size


def _blockwise_statistics(x, context, log_weights, time, curvature, block_size):
    """Streams over anchor blocks.

    Returns:
      ``(mean (B, D), log-sum-exp of the logits (B,), index of each row's largest logit (B,) int32)``.
    """
    blocks = _split_blocks(context, block_size, 0.0)
    weight_blocks = _split_blocks(log_weights, block_size, -jnp.inf)

    def accumulate(carry, block):
        running_max, running_sum, running_weighted, running_argmax = carry
        anchors, block_log_weights, start = block
        logits, _ = _block_logits(x, anchors, block_log_weights, time, curvature)
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
def _blockwise_posterior(x, context, log_weights, time, curvature, block_size):
    """(mean (B, D), log-sum-exp (B,)) computed over anchor blocks of ``block_size``."""
    return _blockwise_statistics(x, context, log_weights, time, curvature, block_size)[:2]


def _blockwise_posterior_fwd(x, context, log_weights, time, curvature, block_size):
    mean, log_normaliser, pivot = _blockwise_statistics(x, context, log_weights, time, curvature, block_size)
    return (mean, log_normaliser), (x, context, log_weights, time, curvature, log_normaliser, pivot)


def _blockwise_posterior_bwd(block_size, residuals, cotangents):
    """Recomputes each block twice. The recomputed posterior may differ from the forward's by rounding, and
    near t = 0 the 1/t^2 scale amplifies any mismatch in ``g_probs_j - sum_k probs_k g_probs_k`` by ~1e8. So
    the products are taken relative to each row's pivot (its largest forward logit) from exact differences,
    ``<g_mean, a_j - a_pivot>``, which is exactly zero at the pivot: a one-hot row then gets exactly zero
    logit cotangents, however the recomputation rounds."""
    x, context, log_weights, time, curvature, log_normaliser, pivot = residuals
    g_mean, g_log_normaliser = cotangents
    n = context.shape[0]
    blocks = _split_blocks(context, block_size, 0.0)
    weight_blocks = _split_blocks(log_weights, block_size, -jnp.inf)
    pivot_anchors = context[pivot]

    def block_posterior(block):
        anchors, block_log_weights = block
        logits, differences = _block_logits(x, anchors, block_log_weights, time, curvature)
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
        # logits = -curvature |x - (1 - t) a|^2: d/dx = -2 curvature (...), d/da = +2 curvature (1 - t) (...).
        weighted_differences = (2.0 * curvature) * g_logits[:, :, None] * differences
        g_anchors = (jnp.matmul(probs.T, g_mean, precision=HIGHEST)
                     + (1.0 - time) * jnp.sum(weighted_differences, axis=0))
        return g_x - jnp.sum(weighted_differences, axis=1), (g_anchors, jnp.sum(g_logits, axis=0))

    g_x, (g_blocks, g_weight_blocks) = jax.lax.scan(block_cotangents, jnp.zeros_like(x), (blocks, weight_blocks))
    g_context = g_blocks.reshape((-1, context.shape[1]))[:n]
    g_log_weights = g_weight_blocks.reshape(-1)[:n]
    return g_x, g_context, g_log_weights, jnp.zeros_like(time), jnp.zeros_like(curvature)


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
    # Inside shard_map a replicated context (e.g. label anchors) must vary like the rows before the custom VJP.
    return ZoneReference(points, reference_squared_distances(*match_varying_axes(points, context)))


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
      reference: per-row reference points, which make the dense kernel's logits exact for nearby anchors in
        float32 (the posterior is the same in exact arithmetic); the blockwise kernel, exact anyway, ignores it.
    Returns:
      ``(mean (B, D), log_probs)``: with the dense kernel ``log_probs`` is the (B, N) normalised log posterior;
      with the blockwise kernel it is the (B,) log normaliser ``logsumexp_j logits_j`` instead (the full matrix
      is what the blockwise kernel avoids; a column is ``logits_bj - normaliser_b``, see :func:`target_log_prob`).
    """
    dtype = x.dtype
    log_weights = _resolve_log_weights(log_weights, context.shape[0], dtype)
    if block_size is not None:
        # Exact differences need no reference point: they are what the reference point approximates.
        time = jnp.asarray(coefficients.time, dtype)
        curvature = jnp.asarray(coefficients.curvature, dtype)
        operands = match_varying_axes(x, context, log_weights, time, curvature)
        return _blockwise_posterior(*operands, int(block_size))
    if reference is None:
        query, offsets = x, _squared_norms(context)
    else:
        # The offset from the reference is formed before any product, so it keeps its own precision.
        query = offset_from(x, reference.points, jnp.asarray(coefficients.time, dtype))
        offsets = reference.squared_distances
    signal = jnp.asarray(coefficients.signal, dtype)
    quadratic = jnp.asarray(coefficients.quadratic, dtype)
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
      (B,) ``log pi_{b, k_b}``, with the blockwise kernel's exact-difference logits.
    """
    difference = offset_from(x, targets_context, jnp.asarray(coefficients.time, x.dtype))
    logits = -jnp.asarray(coefficients.curvature, x.dtype) * jnp.sum(difference * difference, axis=-1)
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


def posterior_output(x, context, coefficients, mean_and_logp, *, log_weights, targets, block_size):
    """What a reverse step records: the full (B, N) log posterior, or only each row's target entry (B,)."""
    _, log_probs = mean_and_logp
    if block_size is not None:
        target_weights = None if log_weights is None else log_weights[targets]
        return target_log_prob(x, context[targets], target_weights, coefficients, log_probs)
    if targets is None:
        return log_probs
    return jnp.take_along_axis(log_probs, targets[:, None], axis=1)[:, 0]


def posterior_evaluator(
    context, *, num_steps, batch, log_weights=None, targets=None, reference=None, record=False, block_size=None,
    memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES,
):
    """The per-step model evaluation of a solver, rematerialised as the memory budget says.

    Returns:
      ``evaluate(x (B, D), coefficients) -> (mean (B, D), recorded)``, where ``recorded`` is what
      :func:`posterior_output` gives when ``record`` is set, else None.
    """

    def evaluate(x, coefficients):
        mean_and_logp = posterior(
            x, context, coefficients, log_weights=log_weights, block_size=block_size, reference=reference
        )
        recorded = None
        if record:
            recorded = posterior_output(
                x, context, coefficients, mean_and_logp, log_weights=log_weights, targets=targets,
                block_size=block_size,
            )
        return mean_and_logp[0], recorded

    return rematerialise(
        evaluate, num_steps=num_steps, batch=batch, num_anchors=context.shape[0], dim=context.shape[1],
        dtype=context.dtype, block_size=block_size, memory_budget_bytes=memory_budget_bytes,
    )
