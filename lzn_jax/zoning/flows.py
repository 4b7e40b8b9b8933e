"""The public operations of the latent zoning solver: ``compute_latents``, ``assign`` and ``assign_targets``.

Code time: anchors at t = 0, the Gaussian at t = 1. Every function is differentiable with respect to anchors,
context and latents, composes under ``jit``, ``grad`` and ``shard_map``, and compiles once per shape and options
when called eagerly (the numerical core is jitted with the options as a static argument). Checks of values
(weights, targets) run only on concrete inputs, with an explicit transfer, so the solver runs under
``jax.transfer_guard("disallow")``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax.zoning import _evaluator
from lzn_jax.zoning import dpm_solver as dpm_lib
from lzn_jax.zoning import euler as euler_lib
from lzn_jax.zoning.options import FORWARD_DEFAULTS, REVERSE_DEFAULTS, SolverOptions, resolve_options
from lzn_jax.zoning.velocity import solver_dtype


class Assignment(NamedTuple):
    """Result of :func:`assign`: end points (B, D) of the reverse flow and the (S, B, N) log posteriors, entry
    k taken before the k-th update (for Euler entry 0, at t = 1, equals the normalised log weights)."""

    endpoints: jax.Array
    log_probs: jax.Array


class TargetAssignment(NamedTuple):
    """Result of :func:`assign_targets`: end points (B, D) and each row's target log posterior (S, B)."""

    endpoints: jax.Array
    target_log_probs: jax.Array


# --------------------------------------------------------------------------------------------------- checks


def check_matrix(name: str, array, dim: int | None = None, rows: int | None = None) -> None:
    shape = np.shape(array)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D (rows, latent_dim) array, got shape {shape}")
    if dim is not None and shape[1] != dim:
        raise ValueError(f"{name} has latent dimension {shape[1]}, expected {dim} (shape {shape})")
    if rows is not None and shape[0] != rows:
        raise ValueError(f"{name} has {shape[0]} rows, expected {rows} (shape {shape})")


def _concrete(array) -> np.ndarray | None:
    """The values of a concrete array, fetched explicitly; None for a tracer (checked by the caller's data)."""
    if isinstance(array, jax.core.Tracer):
        return None
    return np.asarray(jax.device_get(array))


def log_weights_from_weights(weights) -> jax.Array:
    """Converts strictly positive mixture weights (N,) to log-weights.

    A weight of zero cannot be told apart from an underflow here; exclude an anchor explicitly with a
    log-weight of ``-inf`` instead.
    """
    values = _concrete(weights)
    if values is not None and not np.all(values > 0):
        raise ValueError("weights must be strictly positive; got a value <= 0 (or NaN). Pass log_weights instead, "
                         "with -inf for anchors that must get zero weight.")
    return jnp.log(weights)


def check_log_weights(log_weights, num_anchors: int) -> None:
    if log_weights is None:
        return
    if np.shape(log_weights) != (num_anchors,):
        raise ValueError(f"log_weights must have shape ({num_anchors},) (one per context anchor), "
                         f"got {np.shape(log_weights)}")
    values = _concrete(log_weights)
    if values is not None and (np.any(np.isnan(values)) or np.any(values == np.inf) or np.all(values == -np.inf)):
        raise ValueError("log_weights must be finite or -inf, with at least one finite entry; got NaN, +inf or "
                         "all -inf")


def check_targets(targets, rows: int, num_anchors: int, name: str = "targets") -> None:
    dtype = targets.dtype if hasattr(targets, "dtype") else np.asarray(targets).dtype
    if np.shape(targets) != (rows,) or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must be ({rows},) integers, got shape {np.shape(targets)} and dtype {dtype}")
    values = _concrete(targets)
    if values is not None and (np.any(values < 0) or np.any(values >= num_anchors)):
        raise ValueError(f"{name} must index the {num_anchors} context anchors, i.e. lie in [0, {num_anchors}); "
                         f"got values from {values.min()} to {values.max()}")


@jax.jit
def _mismatched_own_rows(own_index, anchors, context) -> jax.Array:
    return jnp.sum(jnp.any(context[own_index] != anchors, axis=1))


def check_own_index(own_index, anchors, context) -> None:
    """``own_index`` (B,) must be integers that pick the anchors' own rows out of ``context``; where all three
    are concrete, the rows are compared on the device and only the count of mismatches is fetched."""
    check_targets(own_index, np.shape(anchors)[0], np.shape(context)[0], name="own_index")
    if any(isinstance(array, jax.core.Tracer) for array in (own_index, anchors, context)):
        return
    mismatched = int(jax.device_get(_mismatched_own_rows(own_index, anchors, context)))
    if mismatched:
        raise ValueError(f"context[own_index] must equal anchors row for row; {mismatched} of "
                         f"{np.shape(anchors)[0]} rows differ. own_index names the row of context that holds each "
                         "anchor itself.")


# ---------------------------------------------------------------------------------------------- forward flow


def forward_start(anchors: jax.Array, noise: jax.Array, eps: float) -> jax.Array:
    """(B, D) start of the forward flow at t = eps, relative to the own anchor: ``eps * (noise - anchors)``.

    The absolute start point is ``eps * noise + (1 - eps) * anchors``; its offset from the anchor is formed
    directly, so it keeps full relative precision however small eps is.
    """
    return eps * (noise - anchors)


@functools.partial(jax.jit, static_argnames=("options", "context_is_anchors"))
def _compute_latents(anchors, noise, context, own_index, options: SolverOptions, context_is_anchors: bool = False):
    dtype = solver_dtype(anchors, noise, context)
    anchors, noise, context = anchors.astype(dtype), noise.astype(dtype), context.astype(dtype)
    if context_is_anchors:
        own_index = jnp.arange(anchors.shape[0], dtype=jnp.int32)
    eps = options.start_offset
    # The flow's state is measured from each row's own anchor, its pivot (docs/numerics.md, "Logits measured
    # from a pivot point"): y = x - r from the start offset to the end, where the latents are y + r. The
    # pivots are the anchors themselves, differentiable like any other input. Where the context holds them too
    # (own_index), the kernels combine each anchor's two roles before they are summed, so the large,
    # nearly opposite contributions of the two never have to cancel in float32 ("Conditioning of the flow
    # and gradient cancellation").
    if options.block_size is None:
        origin = _evaluator.pivot_origin(anchors, context, own_index=own_index,
                                         pivots_are_context=context_is_anchors)
    else:  # the blockwise kernel needs no pivot distances: it forms exact pivot gaps block by block
        origin = _evaluator.Origin(anchors, None, own_index)
    evaluate = _evaluator.make_evaluator(context, options, batch=anchors.shape[0], origin=origin)
    start = forward_start(anchors, noise, eps)
    if options.solver == "euler":
        times, step = euler_lib.forward_grid(options.num_steps, eps)
        offsets, _ = euler_lib.euler_flow(start, evaluate, times, step, reverse=False)
    else:
        times = dpm_lib.time_grid(options.num_steps, eps, reverse=False)
        orders = dpm_lib.step_orders(options.num_steps, options.order, options.lower_order_final)
        offsets, _ = dpm_lib.dpm_solver_flow(start, evaluate, times, orders)
    return offsets + anchors


def compute_latents(
    anchors: jax.Array,
    noise: jax.Array,
    *,
    context: jax.Array | None = None,
    own_index: jax.Array | None = None,
    solver: str | None = None,
    num_steps: int | None = None,
    eps: float | None = None,
    options: SolverOptions | None = None,
) -> jax.Array:
    """Latents of the given anchors: the forward latent flow from ``eps * noise + (1 - eps) * anchors``.

    Args:
      anchors: (B, D) the own samples' anchors (any float dtype; computed in float32, or float64 under x64).
      noise: (B, D) prior draw already scaled by the prior scale alpha (0 gives zone centres).
      context: (N, D) all anchors that define the zones; default ``anchors``.
      own_index: (B,) int, only with ``context``: the row of ``context`` that holds each anchor itself, as in a
        batch gathered across devices (``context[own_index] == anchors``, and computed from them, so that the
        gradients of both meet in the anchors). The values are the same without it; the float32 anchor
        gradients are then far less accurate, as each anchor's two roles are differentiated separately and
        their large, opposite contributions summed afterwards (docs/numerics.md, "Conditioning of the flow and
        gradient cancellation"). With ``context`` omitted, the anchors are the context and this is implied.
        A value match is not enough: the backward pass leaves out both of the own anchor's opposite shares, so
        with ``own_index`` only the sum of the anchors' and the context's gradients through the gather is right,
        not each one alone (a ``stop_gradient`` on the context gives a wrong anchor gradient).
      solver, num_steps, eps: override the fields of ``options`` (defaults: DPM-Solver++, 20 steps, eps 1e-3;
        Euler's default eps is 1e-4). Euler runs t: eps -> 1, DPM-Solver++ t: eps -> 1 - eps.
      options: a :class:`SolverOptions` (kernel, rematerialisation, DPM order ...).
    Returns:
      (B, D) latents, float32 (float64 under x64 with float64 inputs).
    """
    options = resolve_options(options, FORWARD_DEFAULTS, solver=solver, num_steps=num_steps, eps=eps)
    context_is_anchors = context is None or context is anchors
    if own_index is not None and context_is_anchors:
        raise ValueError("own_index applies to an explicit context that holds the anchors among other rows; "
                         "without context (or with context=anchors) every row is its own anchor already")
    context = anchors if context is None else context
    check_matrix("anchors", anchors)
    check_matrix("noise", noise, dim=np.shape(anchors)[1], rows=np.shape(anchors)[0])
    check_matrix("context", context, dim=np.shape(anchors)[1])
    if own_index is not None:
        check_own_index(own_index, anchors, context)
    return _compute_latents(anchors, noise, context, own_index, options, context_is_anchors)


# ---------------------------------------------------------------------------------------------- reverse flow


def _reverse_flow(latents, context, log_weights, targets, options: SolverOptions, record: str):
    dtype = solver_dtype(latents, context, log_weights)
    latents, context = latents.astype(dtype), context.astype(dtype)
    # No pivot suits every row here: each row's leading logits, its mean and its residual are instead formed
    # from its currently most probable anchor (docs/numerics.md, "Logits measured from a pivot point").
    evaluate = _evaluator.make_evaluator(context, options, batch=latents.shape[0], log_weights=log_weights,
                                         targets=targets, record=record, refine=True)
    if options.solver == "euler":
        times, step = euler_lib.reverse_grid(options.num_steps)
        return euler_lib.euler_flow(latents, evaluate, times, step, reverse=True)
    times = dpm_lib.time_grid(options.num_steps, options.start_offset, reverse=True)
    orders = dpm_lib.step_orders(options.num_steps, options.order, options.lower_order_final)
    return dpm_lib.dpm_solver_flow(latents, evaluate, times, orders)


@functools.partial(jax.jit, static_argnames=("options",))
def _assign(latents, context, log_weights, options: SolverOptions) -> Assignment:
    return Assignment(*_reverse_flow(latents, context, log_weights, None, options, _evaluator.RECORD_ALL))


@functools.partial(jax.jit, static_argnames=("options",))
def _assign_targets(latents, context, targets, log_weights, options: SolverOptions) -> TargetAssignment:
    return TargetAssignment(*_reverse_flow(latents, context, log_weights, targets, options,
                                           _evaluator.RECORD_TARGETS))


def _reverse_options(options, solver, num_steps, eps) -> SolverOptions:
    return resolve_options(options, REVERSE_DEFAULTS, solver=solver, num_steps=num_steps, eps=eps)


def assign(
    latents: jax.Array,
    context: jax.Array,
    *,
    log_weights: jax.Array | None = None,
    solver: str | None = None,
    num_steps: int | None = None,
    eps: float | None = None,
    options: SolverOptions | None = None,
) -> Assignment:
    """Reverse latent flow: carries latents back to the anchors and records the soft zone assignment.

    Args:
      latents: (B, D) points at the Gaussian end.
      context: (N, D) anchors whose zones are queried.
      log_weights: (N,) log mixture weights inside the log-sum-exp (``-inf`` = weight zero); None = uniform.
        From positive weights: :func:`log_weights_from_weights`.
      solver, num_steps, eps: override the fields of ``options`` (defaults: Euler, 100 steps, t: 1 -> 0 with
        no eps; DPM-Solver++ runs t: 1 - eps -> eps).
      options: a :class:`SolverOptions`. The blockwise kernel needs :func:`assign_targets` instead.
    Returns:
      ``Assignment(endpoints (B, D), log_probs (S, B, N))``.
    """
    options = _reverse_options(options, solver, num_steps, eps)
    if options.block_size is not None:
        raise ValueError("assign records the full (B, N) posterior, which the blockwise kernel avoids; use "
                         "assign_targets (or block_size=None)")
    check_matrix("latents", latents)
    check_matrix("context", context, dim=np.shape(latents)[1])
    check_log_weights(log_weights, np.shape(context)[0])
    return _assign(latents, context, log_weights, options)


def assign_targets(
    latents: jax.Array,
    context: jax.Array,
    targets: jax.Array,
    *,
    log_weights: jax.Array | None = None,
    solver: str | None = None,
    num_steps: int | None = None,
    eps: float | None = None,
    options: SolverOptions | None = None,
) -> TargetAssignment:
    """Reverse latent flow that records only each row's target anchor: all an alignment loss needs.

    Memory O(S * B) instead of O(S * B * N); the only form the blockwise kernel supports.

    Args:
      targets: (B,) int index of each row's target anchor in ``context``; the rest as in :func:`assign`.
    Returns:
      ``TargetAssignment(endpoints (B, D), target_log_probs (S, B))``.
    """
    options = _reverse_options(options, solver, num_steps, eps)
    check_matrix("latents", latents)
    check_matrix("context", context, dim=np.shape(latents)[1])
    check_log_weights(log_weights, np.shape(context)[0])
    check_targets(targets, np.shape(latents)[0], np.shape(context)[0])
    return _assign_targets(latents, context, targets, log_weights, options)
