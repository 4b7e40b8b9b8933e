"""The form in which the optimiser and the EMA see a module's trainable parameters: its leaves, or one vector.

Adam, clipping, the EMA and the guards of a step are elementwise, so they give the same numbers on one vector per
module as on every leaf (only the gradient norm sums in another order), but they compile and run differently:

* leaf by leaf, every array gets its own dozen or so operations, which is about half of a small model's compiled
  step and of its compile time (a ``digits_joint:smoke`` step: 20 s against 11.5 s to compile with one vector);
* one vector compiles to a few operations, but costs a concatenation, slices back and XLA:CPU's slow loops over
  one huge array: for the CIFAR10 models (112 M values) the update took 1.71 s against 0.57 s leaf by leaf.

So a module with at most ``config.optim.vector_update_max_size`` trainable values is updated as one vector, a
larger one leaf by leaf (docs/design.md, "Optimisation"). Either way the optimiser sees ``{module: [arrays]}``,
a list of one vector or of the leaves, so one code path serves both.

The Fourier time frequencies are constants of the model (:func:`is_constant`): they are in neither form, so no
update, moment or EMA ever touches them, and they add nothing to the gradient norm, as in the reference, where they
do not require gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_CONSTANT_PARAM_NAMES = ("frequencies",)


def is_constant(path) -> bool:
    """Whether the leaf at ``path`` (a key path of ``jax.tree_util``) is a constant of the model."""
    return any(getattr(entry, "key", None) in _CONSTANT_PARAM_NAMES for entry in path)


def _trainable_leaves(tree: Any) -> list[Any]:
    """The non-constant leaves of one module's tree, in ``jax.tree.leaves`` order."""
    return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if not is_constant(path)]


def trainable_size(tree: Any) -> int:
    """Number of trainable (non-constant) values of one module's tree."""
    return sum(leaf.size for leaf in _trainable_leaves(tree))


def as_vector(tree: Any, max_size: int) -> bool:
    """Whether a module of this tree is updated as one vector (at most ``max_size`` trainable values)."""
    return trainable_size(tree) <= max_size


def pack(tree: Any, vector: bool) -> list[jax.Array]:
    """One module's trainable values as the optimiser sees them: ``[(P,) vector]`` (raveled and concatenated in
    ``jax.tree.leaves`` order) or the trainable leaves themselves."""
    leaves = _trainable_leaves(tree)
    if not vector:
        return leaves
    return [jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])] if leaves else []


def unpack(tree: Any, packed: list[jax.Array], vector: bool) -> Any:
    """``tree`` with its trainable leaves taken from ``packed`` (as :func:`pack` laid them out); its constants are
    ``tree``'s own."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    trainable = [leaf for path, leaf in with_paths if not is_constant(path)]
    if vector:
        size = sum(leaf.size for leaf in trainable)
        if len(packed) != (1 if trainable else 0) or (trainable and packed[0].shape != (size,)):
            raise ValueError(f"{[p.shape for p in packed]} is not the vector of a tree of {size} trainable values")
        # Materialised once: without the barrier XLA fuses the vector's producers (the optimiser's arithmetic
        # and selects) into each leaf's slice, compiling them once per leaf again.
        source = jax.lax.optimization_barrier(packed[0]) if trainable else None
        values, start = [], 0
        for leaf in trainable:
            stop = start + leaf.size
            values.append(jax.lax.slice(source, (start,), (stop,)).reshape(leaf.shape).astype(leaf.dtype))
            start = stop
    else:
        if [p.shape for p in packed] != [leaf.shape for leaf in trainable]:
            raise ValueError("the packed leaves do not have the shapes of the tree's trainable leaves")
        values = list(packed)
    values = iter(values)
    return jax.tree.unflatten(treedef, [leaf if is_constant(path) else next(values) for path, leaf in with_paths])


def pack_params(params: dict[str, Any], max_size: int) -> dict[str, list[jax.Array]]:
    """``{module: pack(tree)}`` of ``{module: params}``: what the optimiser is initialised with."""
    return {module: pack(tree, as_vector(tree, max_size)) for module, tree in params.items()}


__all__ = [
    "as_vector",
    "is_constant",
    "pack",
    "pack_params",
    "trainable_size",
    "unpack",
]
