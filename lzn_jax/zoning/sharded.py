"""The zoning solver across devices ("latent parallelism", SPEC.md §1.8) with ``jax.shard_map``.

Each device holds B_l rows. Inside the map it gathers every device's anchors in rank order with a tiled,
differentiable ``all_gather`` (whose transpose is the reduce-scatter sum of the reference), and computes the
latents of its own rows against all B_g = W * B_l anchors. A loss taken as the mean over the global batch then
has exactly the gradients of the unsharded computation. The ``local_*`` functions are for use inside a caller's
own ``shard_map``; the ``*_sharded`` wrappers take and return global arrays sharded over ``axis_name``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lzn_jax.zoning import latents as latents_lib

AxisName = str | Sequence[str]


def _axis_names(axis_name: AxisName) -> str | tuple[str, ...]:
    """A mesh axis name, or several as a tuple (the form collectives and PartitionSpec take)."""
    return axis_name if isinstance(axis_name, str) else tuple(axis_name)


def gather_context(local_anchors: jax.Array, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """All devices' anchors in rank order, and the global row index of each local anchor.

    Args:
      local_anchors: (B_l, D) this device's anchors (identical B_l on every device).
    Returns:
      ``(context (W * B_l, D), global_index (B_l,) int32)`` with global index ``rank * B_l + b``.
    """
    axis_name = _axis_names(axis_name)
    context = jax.lax.all_gather(local_anchors, axis_name, tiled=True)
    local_rows = local_anchors.shape[0]
    rank = jax.lax.axis_index(axis_name)
    return context, rank * local_rows + jnp.arange(local_rows, dtype=jnp.int32)


def local_compute_latents(local_anchors, local_noise, *, axis_name: AxisName, **solver_options):
    """Inside ``shard_map``: latents (B_l, D) of this device's rows against the gathered anchors.

    Returns ``(latents (B_l, D), global_index (B_l,))``; ``solver_options`` as in ``compute_latents``.
    """
    context, global_index = gather_context(local_anchors, axis_name)
    latents = latents_lib.compute_latents(local_anchors, local_noise, context=context, **solver_options)
    return latents, global_index


def local_assign(local_latents, context, *, axis_name: AxisName, gather: bool, **assign_options):
    """Inside ``shard_map``: reverse flow of this device's latents.

    Args:
      context: this device's share of the anchors (gathered first when ``gather``), or the full, replicated
        anchors (e.g. label anchors) when not.
    Returns:
      ``assign``'s ``(endpoints (B_l, D), log_probs)`` for the local rows.
    """
    if gather:
        context, _ = gather_context(context, axis_name)
    return latents_lib.assign(local_latents, context, **assign_options)


def _axis_size(mesh: Mesh, axis_name: AxisName) -> int:
    names = (axis_name,) if isinstance(axis_name, str) else _axis_names(axis_name)
    missing = [name for name in names if name not in mesh.shape]
    if missing:
        raise ValueError(f"axis_name {axis_name!r} names mesh axes {missing} that the mesh {dict(mesh.shape)} lacks")
    return math.prod(mesh.shape[name] for name in names)


def _check_divisible(name: str, rows: int, mesh: Mesh, axis_name: AxisName) -> None:
    devices = _axis_size(mesh, axis_name)
    if rows % devices:
        raise ValueError(
            f"{name} has {rows} rows, not divisible by the {devices} devices of mesh axis {axis_name!r}; "
            f"use a global batch that is a multiple of {devices} (every device needs the same number of rows)"
        )


def _place(mesh: Mesh, operands, specs):
    """Lays each operand out as its spec says (a no-op for arrays already laid out so)."""
    return [jax.device_put(operand, NamedSharding(mesh, spec)) for operand, spec in zip(operands, specs)]


def compute_latents_sharded(anchors, noise, *, mesh: Mesh, axis_name: AxisName = "data", **solver_options):
    """``compute_latents`` over a batch sharded on ``axis_name``: every row against all rows' anchors.

    Args:
      anchors, noise: (B_g, D) global arrays (sharded or not; they are resharded by rows).
    Returns:
      ``(latents (B_g, D), global_index (B_g,))`` sharded by rows; equal to the unsharded
      ``compute_latents(anchors, noise)`` and ``arange(B_g)``.
    """
    _check_divisible("anchors", anchors.shape[0], mesh, axis_name)
    rows = PartitionSpec(_axis_names(axis_name))

    def local(local_anchors, local_noise):
        return local_compute_latents(local_anchors, local_noise, axis_name=axis_name, **solver_options)

    operands = _place(mesh, (anchors, noise), (rows, rows))
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows), out_specs=(rows, rows))(*operands)


def assign_sharded(
    latents,
    context,
    *,
    mesh: Mesh,
    axis_name: AxisName = "data",
    context_sharded: bool = True,
    log_weights=None,
    targets=None,
    **assign_options,
):
    """``assign`` over latents sharded on ``axis_name``.

    Args:
      latents: (B_g, D) global array.
      context: (N, D); sharded by rows with the batch when ``context_sharded`` (e.g. the other view's anchors,
        N = B_g), else replicated (e.g. label anchors).
      log_weights: (N,) replicated, or None. targets: (B_g,) global target indices, or None.
    Returns:
      ``(endpoints (B_g, D), log_probs (S, B_g, N) or (S, B_g))``, equal to the unsharded ``assign``.
    """
    _check_divisible("latents", latents.shape[0], mesh, axis_name)
    if context_sharded:
        _check_divisible("context", context.shape[0], mesh, axis_name)
    rows = PartitionSpec(_axis_names(axis_name))
    replicated = PartitionSpec()
    per_step_rows = PartitionSpec(None, _axis_names(axis_name))
    operands = [latents, context]
    in_specs = [rows, rows if context_sharded else replicated]
    for extra, spec in ((log_weights, replicated), (targets, rows)):
        if extra is not None:
            operands.append(extra)
            in_specs.append(spec)

    def local(local_latents, local_context, *extras):
        extras = list(extras)
        local_log_weights = extras.pop(0) if log_weights is not None else None
        local_targets = extras.pop(0) if targets is not None else None
        return local_assign(
            local_latents, local_context, axis_name=axis_name, gather=context_sharded,
            log_weights=local_log_weights, targets=local_targets, **assign_options,
        )

    operands = _place(mesh, operands, in_specs)
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=(rows, per_step_rows))(*operands)
