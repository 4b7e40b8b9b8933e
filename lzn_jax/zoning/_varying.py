"""Inside ``jax.shard_map``: making a custom VJP's inputs vary over the same mesh axes.

A custom VJP must return cotangents with its inputs' types. When a replicated input (log-weights, label anchors
given whole to every device) meets per-device rows, its cotangent differs per device, which the rule could not
return as a replicated value. Casting the input to varying *before* the call puts the cross-device sum into the
cast's transpose, outside the custom rule. Outside ``shard_map`` every function here is the identity.
"""

from __future__ import annotations

import jax


def _varying_axes(array) -> frozenset:
    manual = getattr(jax.typeof(array), "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset()


def match_varying_axes(*arrays):
    """Returns ``arrays`` with each one marked as varying over the union of their varying mesh axes."""
    axes = frozenset().union(*(_varying_axes(a) for a in arrays))
    if not axes:
        return arrays
    return tuple(
        a if _varying_axes(a) == axes else jax.lax.pcast(a, tuple(sorted(axes - _varying_axes(a))), to="varying")
        for a in arrays
    )
