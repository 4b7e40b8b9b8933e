"""The zoning solver across devices with ``jax.shard_map`` (docs/method.md, "Gradients and sharding").

Each device holds B_l rows. Inside the map it gathers every device's anchors in rank order with a tiled,
differentiable ``all_gather`` (whose transpose sums each anchor's gradient over devices), and solves for its own
rows against all B_g = W * B_l anchors. A loss taken as the mean over the global batch then has exactly the
gradients of the unsharded computation. The ``local_*`` functions are for use inside a caller's own
``shard_map``; the ``*_sharded`` wrappers take and return global arrays sharded over ``axis_name``. The mesh is
an argument or, when omitted, the one entered with ``jax.set_mesh``; Auto and Explicit axes both work.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lzn_jax.zoning import flows
from lzn_jax.zoning.options import FORWARD_DEFAULTS, REVERSE_DEFAULTS, SolverOptions, resolve_options

AxisName = str | Sequence[str]


class LocalLatents(NamedTuple):
    """This device's latents (B_l, D) and the global row index of each (B_l,) int32: ``rank * B_l + b``."""

    latents: jax.Array
    global_index: jax.Array


def _axis_names(axis_name: AxisName) -> str | tuple[str, ...]:
    """A mesh axis name, or several as a tuple (the form collectives and PartitionSpec take)."""
    return axis_name if isinstance(axis_name, str) else tuple(axis_name)


def gather_context(local_anchors: jax.Array, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """Inside ``shard_map``: all devices' anchors in rank order, and the global row index of each local anchor.

    Args:
      local_anchors: (B_l, D) this device's anchors (identical B_l on every device).
    Returns:
      ``(context (W * B_l, D), global_index (B_l,) int32)``.
    """
    axis_name = _axis_names(axis_name)
    context = jax.lax.all_gather(local_anchors, axis_name, tiled=True)
    local_rows = local_anchors.shape[0]
    rank = jax.lax.axis_index(axis_name)
    return context, rank * local_rows + jnp.arange(local_rows, dtype=jnp.int32)


# ------------------------------------------------------------------------------------- inside a shard_map


def local_compute_latents(local_anchors: jax.Array, local_noise: jax.Array, *, axis_name: AxisName,
                          options: SolverOptions | None = None) -> LocalLatents:
    """Inside ``shard_map``: latents of this device's rows against every device's anchors.

    Args:
      local_anchors, local_noise: (B_l, D); options: as for :func:`flows.compute_latents` (default
      DPM-Solver++, 20 steps).
    Returns:
      ``LocalLatents(latents (B_l, D), global_index (B_l,))``; the index is what a contrastive loss targets.
    """
    context, global_index = gather_context(local_anchors, axis_name)
    latents = flows.compute_latents(local_anchors, local_noise, context=context, own_index=global_index,
                                    options=resolve_options(options, FORWARD_DEFAULTS))
    return LocalLatents(latents, global_index)


def _local_context(context, axis_name, context_sharded: bool):
    return gather_context(context, axis_name)[0] if context_sharded else context


def local_assign(local_latents: jax.Array, context: jax.Array, *, axis_name: AxisName, context_sharded: bool,
                 log_weights: jax.Array | None = None, options: SolverOptions | None = None) -> flows.Assignment:
    """Inside ``shard_map``: reverse flow of this device's latents.

    Args:
      context: this device's rows of the anchors when ``context_sharded`` (they are gathered first), else the
        full anchors, identical on every device (e.g. label anchors).
    Returns:
      :func:`flows.assign`'s ``Assignment`` for the local rows.
    """
    context = _local_context(context, axis_name, context_sharded)
    return flows.assign(local_latents, context, log_weights=log_weights,
                        options=resolve_options(options, REVERSE_DEFAULTS))


def local_assign_targets(local_latents: jax.Array, context: jax.Array, targets: jax.Array, *, axis_name: AxisName,
                         context_sharded: bool, log_weights: jax.Array | None = None,
                         options: SolverOptions | None = None) -> flows.TargetAssignment:
    """Inside ``shard_map``: :func:`flows.assign_targets` for this device's rows; ``targets`` (B_l,) index the
    full (gathered) context."""
    context = _local_context(context, axis_name, context_sharded)
    return flows.assign_targets(local_latents, context, targets, log_weights=log_weights,
                                options=resolve_options(options, REVERSE_DEFAULTS))


# ----------------------------------------------------------------------------------- global-array wrappers


def _resolve_mesh(mesh: Mesh | None):
    if mesh is not None:
        return mesh
    ambient = jax.sharding.get_abstract_mesh()
    if ambient.empty:
        raise ValueError("no mesh: pass mesh=... or enter one with `with jax.set_mesh(mesh):`")
    return ambient


def _axis_size(mesh, axis_name: AxisName) -> int:
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    missing = [name for name in names if name not in mesh.shape]
    if missing:
        raise ValueError(f"axis_name {axis_name!r} names mesh axes {missing} that the mesh {dict(mesh.shape)} lacks")
    return math.prod(mesh.shape[name] for name in names)


def _check_divisible(name: str, rows: int, mesh, axis_name: AxisName) -> None:
    devices = _axis_size(mesh, axis_name)
    if rows % devices:
        raise ValueError(
            f"{name} has {rows} rows, not divisible by the {devices} devices of mesh axis {axis_name!r}; "
            f"use a global batch that is a multiple of {devices} (every device needs the same number of rows)"
        )


def _lay_out(mesh, operand, spec: PartitionSpec):
    """Inside jit: ``operand`` laid out as ``spec`` says (Explicit axes need an explicit reshard)."""
    if operand is None:
        return None
    sharding = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    if any(kind == AxisType.Explicit for kind in mesh.axis_types):
        return jax.sharding.reshard(operand, sharding)
    return jax.lax.with_sharding_constraint(operand, sharding)


def _shard_rows(local_fn, mesh, axis_name, operands, in_specs, out_specs):
    """Runs ``local_fn`` under ``shard_map`` on operands laid out as ``in_specs`` (None operands pass through)."""
    present = [i for i, operand in enumerate(operands) if operand is not None]

    def local(*present_operands):
        full = [None] * len(operands)
        for i, operand in zip(present, present_operands):
            full[i] = operand
        return local_fn(*full)

    laid_out = [_lay_out(mesh, operands[i], in_specs[i]) for i in present]
    mapped = jax.shard_map(local, mesh=mesh if isinstance(mesh, Mesh) else None,
                           in_specs=tuple(in_specs[i] for i in present), out_specs=out_specs)
    return mapped(*laid_out)


@functools.partial(jax.jit, static_argnames=("options", "mesh", "axis_name"))
def _compute_latents_sharded(anchors, noise, options, mesh, axis_name):
    rows = PartitionSpec(_axis_names(axis_name))

    def local(local_anchors, local_noise):
        return local_compute_latents(local_anchors, local_noise, axis_name=axis_name, options=options).latents

    return _shard_rows(local, _resolve_mesh(mesh), axis_name, (anchors, noise), (rows, rows), rows)


def compute_latents_sharded(anchors: jax.Array, noise: jax.Array, *, options: SolverOptions | None = None,
                            mesh: Mesh | None = None, axis_name: AxisName = "data") -> jax.Array:
    """:func:`flows.compute_latents` over a batch sharded on ``axis_name``: every row against all anchors.

    Args:
      anchors, noise: (B_g, D) global arrays (laid out by rows if they are not already).
      options: solver options (default DPM-Solver++, 20 steps); mesh: default the one of ``jax.set_mesh``.
    Returns:
      (B_g, D) latents sharded by rows, equal to the unsharded ``compute_latents(anchors, noise)``.
    """
    options = resolve_options(options, FORWARD_DEFAULTS)
    flows.check_matrix("anchors", anchors)
    flows.check_matrix("noise", noise, dim=np.shape(anchors)[1], rows=np.shape(anchors)[0])
    _check_divisible("anchors", np.shape(anchors)[0], _resolve_mesh(mesh), axis_name)
    return _compute_latents_sharded(anchors, noise, options, mesh, _hashable(axis_name))


def _hashable(axis_name: AxisName) -> str | tuple[str, ...]:
    return _axis_names(axis_name)


def _reverse_specs(axis_name, context_sharded: bool):
    rows = PartitionSpec(_axis_names(axis_name))
    return rows, (rows if context_sharded else PartitionSpec()), PartitionSpec(None, _axis_names(axis_name))


@functools.partial(jax.jit, static_argnames=("context_sharded", "options", "mesh", "axis_name"))
def _assign_sharded(latents, context, log_weights, targets, context_sharded, options, mesh, axis_name):
    rows, context_spec, per_step_rows = _reverse_specs(axis_name, context_sharded)
    common = dict(axis_name=axis_name, context_sharded=context_sharded, options=options)
    if targets is None:
        def local(local_latents, local_context, local_log_weights, _):
            return local_assign(local_latents, local_context, log_weights=local_log_weights, **common)

        out_specs = flows.Assignment(rows, per_step_rows)
    else:
        def local(local_latents, local_context, local_log_weights, local_targets):
            return local_assign_targets(local_latents, local_context, local_targets, log_weights=local_log_weights,
                                        **common)

        out_specs = flows.TargetAssignment(rows, per_step_rows)
    operands = (latents, context, log_weights, targets)
    in_specs = (rows, context_spec, PartitionSpec(), rows)
    return _shard_rows(local, _resolve_mesh(mesh), axis_name, operands, in_specs, out_specs)


def _check_reverse(latents, context, context_sharded, mesh, axis_name) -> None:
    flows.check_matrix("latents", latents)
    flows.check_matrix("context", context, dim=np.shape(latents)[1])
    mesh = _resolve_mesh(mesh)
    _check_divisible("latents", np.shape(latents)[0], mesh, axis_name)
    if context_sharded:
        _check_divisible("context", np.shape(context)[0], mesh, axis_name)


def assign_sharded(latents: jax.Array, context: jax.Array, *, context_sharded: bool = True,
                   log_weights: jax.Array | None = None, options: SolverOptions | None = None,
                   mesh: Mesh | None = None, axis_name: AxisName = "data") -> flows.Assignment:
    """:func:`flows.assign` over latents sharded on ``axis_name``.

    Args:
      latents: (B_g, D) global array.
      context: (N, D); split by rows with the batch when ``context_sharded`` (e.g. the other view's anchors,
        N = B_g), else given whole to every device (e.g. label anchors).
      log_weights: (N,) or None; options: default Euler, 100 steps; mesh: default the one of ``jax.set_mesh``.
    Returns:
      ``Assignment(endpoints (B_g, D), log_probs (S, B_g, N))``, equal to the unsharded ``assign``.
    """
    options = resolve_options(options, REVERSE_DEFAULTS)
    _check_reverse(latents, context, context_sharded, mesh, axis_name)
    flows.check_log_weights(log_weights, np.shape(context)[0])
    return _assign_sharded(latents, context, log_weights, None, context_sharded, options, mesh,
                           _hashable(axis_name))


def assign_targets_sharded(latents: jax.Array, context: jax.Array, targets: jax.Array, *,
                           context_sharded: bool = True, log_weights: jax.Array | None = None,
                           options: SolverOptions | None = None, mesh: Mesh | None = None,
                           axis_name: AxisName = "data") -> flows.TargetAssignment:
    """:func:`flows.assign_targets` over latents sharded on ``axis_name``; ``targets`` (B_g,) are global
    indices into ``context``. Returns ``TargetAssignment(endpoints (B_g, D), target_log_probs (S, B_g))``."""
    options = resolve_options(options, REVERSE_DEFAULTS)
    _check_reverse(latents, context, context_sharded, mesh, axis_name)
    flows.check_log_weights(log_weights, np.shape(context)[0])
    flows.check_targets(targets, np.shape(latents)[0], np.shape(context)[0])
    return _assign_sharded(latents, context, log_weights, targets, context_sharded, options, mesh,
                           _hashable(axis_name))
