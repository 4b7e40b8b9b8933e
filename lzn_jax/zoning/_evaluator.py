"""The per-step model evaluation shared by the Euler and DPM-Solver++ flows, and the rematerialisation plan.

Both solvers carry their state relative to a per-row origin: the row's own anchor (its pivot) in the forward
flow, zero in the reverse flow. The evaluation returns the posterior mean in the same coordinates (the data
prediction ``D``) and the residual ``state - D = x - mean``, each formed without cancellation of anchor-sized
numbers (docs/numerics.md, "Logits measured from a pivot point"). It also returns what a reverse
flow records: nothing, the full ``(B, N)`` log posterior, or each row's target entry ``(B,)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lzn_jax.zoning import _blockwise, _dense
from lzn_jax.zoning._varying import match_varying_axes
from lzn_jax.zoning.options import SolverOptions
from lzn_jax.zoning.velocity import TimeCoefficients, cast_coefficients, uniform_log_weights

_LOG = logging.getLogger("lzn_jax.zoning")

RECORD_NOTHING, RECORD_ALL, RECORD_TARGETS = "nothing", "all", "targets"


class RematPlan(NamedTuple):
    """Whether a flow rematerialises each step's posterior evaluation, and why.

    Attributes:
      rematerialise: True when the backward pass recomputes each step's logits instead of keeping them.
      kept_bytes: per-device bytes the kept posteriors would take (steps * B * (N + 2 D) * itemsize).
      budget_bytes: the options' memory budget.
      reason: one line for the log.
    """

    rematerialise: bool
    kept_bytes: int
    budget_bytes: int
    reason: str


def remat_plan(options: SolverOptions, *, batch: int, num_anchors: int, dim: int, dtype=jnp.float32) -> RematPlan:
    """The rematerialisation decision of a flow with these options and per-device shapes.

    Args:
      batch: rows per device (B); num_anchors: context anchors (N); dim: latent dimension (D).
    """
    kept = options.num_steps * batch * (num_anchors + 2 * dim) * jnp.dtype(dtype).itemsize
    budget = options.memory_budget_bytes
    if options.block_size is not None:
        return RematPlan(False, kept, budget, "blockwise kernel: keeps O(B * D) residuals and recomputes its "
                                              "blocks in its own backward pass")
    if options.remat == "always":
        return RematPlan(True, kept, budget, 'remat="always"')
    if options.remat == "never":
        return RematPlan(False, kept, budget, 'remat="never"')
    if kept <= budget:
        return RematPlan(False, kept, budget, f"kept posteriors ({kept / 2**30:.2f} GiB) fit the budget "
                                              f"({budget / 2**30:.2f} GiB)")
    return RematPlan(True, kept, budget, f"kept posteriors ({kept / 2**30:.2f} GiB) exceed the budget "
                                         f"({budget / 2**30:.2f} GiB)")


class Origin(NamedTuple):
    """Per-row pivots (B, D), their exact squared distances to every context anchor (B, N) with their gradient
    stopped (None for the blockwise kernel, which forms them block by block), and the column of the context that
    holds each row's pivot itself (B,) int, or None where the context does not hold the pivots."""

    pivots: jax.Array
    squared_distances: jax.Array | None
    own_index: jax.Array | None = None


def pivot_origin(pivots: jax.Array, context: jax.Array, *, own_index: jax.Array | None = None,
                 pivots_are_context: bool = False) -> Origin:
    """The origin of rows whose own anchors are ``pivots`` (B, D), against ``context`` (N, D).

    ``own_index``: see :class:`Origin`. ``pivots_are_context``: the two hold the same values (the distances
    then cost about half as much).
    """
    # Inside shard_map a replicated context (e.g. label anchors) is made to vary like the rows first.
    distances = _dense.pivot_squared_distances(*match_varying_axes(pivots, context), pivots_are_context)
    # The dense pivot kernel differentiates the logits through the distances itself, step by step
    # (_dense._dense_pivot_posterior_bwd): stopped here, outside the flow's loop, they carry no (B, N) cotangent
    # through it.
    return Origin(pivots, jax.lax.stop_gradient(distances), own_index)


class Evaluation(NamedTuple):
    """One step's model evaluation: data prediction D (B, D) and residual ``state - D`` (B, D), both relative to
    the flow's origin, and what the step records (None, (B, N) or (B,))."""

    prediction: jax.Array
    residual: jax.Array
    recorded: jax.Array | None


Evaluate = Callable[[jax.Array, TimeCoefficients], Evaluation]


def make_evaluator(
    context: jax.Array,
    options: SolverOptions,
    *,
    batch: int,
    origin: Origin | None = None,
    log_weights: jax.Array | None = None,
    targets: jax.Array | None = None,
    record: str = RECORD_NOTHING,
    refine: bool = False,
    log: bool = True,
) -> Evaluate:
    """The per-step evaluation of a flow, rematerialised as :func:`remat_plan` says (and logged once per trace).

    Args:
      context: (N, D) anchors; batch: rows (B); origin: the rows' pivots (forward flows) or None (origin 0);
      log_weights: (N,) or None; targets: (B,) int, needed to record ``RECORD_TARGETS``; refine: recompute
      each row's leading logits from exact differences (``_dense._refine_leading_logits``); log: whether to log
      the rematerialisation decision (once per flow).
    Returns:
      ``evaluate(state (B, D), coefficients) -> Evaluation``, relative to the origin.
    """
    dtype = context.dtype
    num_anchors = context.shape[0]
    log_weights = uniform_log_weights(log_weights, num_anchors, dtype)
    block_size = options.block_size
    # The dense kernels return the anchors' cotangent as (D, N): transposed here, once per flow, it is summed
    # over the steps in that layout and transposed back once (_dense.py's module docstring).
    context_t = context.T if block_size is None else None

    def evaluate(state, coefficients):
        scales = cast_coefficients(coefficients, dtype)
        if block_size is not None:
            # The kernel records the target's log posterior itself (its backward pass combines the target's two
            # paths); where nothing is recorded it records column 0, which nothing reads.
            recorded_index = jnp.zeros((state.shape[0],), jnp.int32) if targets is None else targets
            if origin is None:
                operands = match_varying_axes(state, context, log_weights, recorded_index, scales.time,
                                              scales.distance_scale)
                prediction, residual, recorded = _blockwise.blockwise_posterior(*operands, int(block_size))
            else:
                # As for the dense kernel: the offset x - (1 - t) r = state + t r keeps its own precision, and
                # the kernel returns the mean relative to the pivots, so the small state never meets r.
                query = state + scales.time * origin.pivots
                operands = match_varying_axes(query, context, origin.pivots, log_weights, recorded_index,
                                              scales.time, scales.distance_scale)
                prediction, _, recorded = _blockwise.blockwise_pivot_posterior(*operands[:5], origin.own_index,
                                                                               *operands[5:], int(block_size))
                residual = state - prediction
            return Evaluation(prediction, residual, recorded if record == RECORD_TARGETS else None)
        if origin is None:
            operands = match_varying_axes(state, context, context_t, _dense.squared_norms(context), log_weights,
                                          scales.inner_scale, scales.norm_scale, scales.time, scales.distance_scale)
            prediction, log_probs, residual = _dense.dense_posterior(*operands, refine)
        else:
            # The offset x - (1 - t) r is state + t r: formed before any product, it keeps its own precision.
            query = state + scales.time * origin.pivots
            operands = match_varying_axes(query, context, context_t, origin.pivots, origin.squared_distances,
                                          log_weights, scales.inner_scale, scales.norm_scale, scales.time,
                                          scales.distance_scale)
            prediction, log_probs = _dense.dense_pivot_posterior(*operands[:5], origin.own_index, *operands[5:],
                                                                 refine)
            residual = state - prediction  # both small inside the own zone: no cancellation
        if record == RECORD_ALL:
            return Evaluation(prediction, residual, log_probs)
        if record == RECORD_TARGETS:
            return Evaluation(prediction, residual, jnp.take_along_axis(log_probs, targets[:, None], axis=1)[:, 0])
        return Evaluation(prediction, residual, None)

    plan = remat_plan(options, batch=batch, num_anchors=num_anchors, dim=context.shape[1], dtype=dtype)
    if log:
        _LOG.info("zoning %s flow, %d steps, B=%d, N=%d: %s", options.solver, options.num_steps, batch, num_anchors,
                  ("rematerialising each step" if plan.rematerialise else "keeping each step's posterior")
                  + f" ({plan.reason})")
    if plan.rematerialise:
        # Only the evaluation: the solver updates around it are linear in the kept states, so each step then
        # keeps just the point it evaluated at, (B, D).
        return jax.checkpoint(evaluate, policy=jax.checkpoint_policies.nothing_saveable)
    return evaluate
