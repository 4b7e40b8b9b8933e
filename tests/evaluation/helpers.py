"""Random Inception variables that keep activations O(1) through the whole network, for tests."""

from __future__ import annotations

import jax
import numpy as np


def random_variables(abstract: dict, seed: int = 0) -> dict:
    """Fills a variable tree of ShapeDtypeStructs: He-scaled kernels, BN scale/var in [0.5, 1.5], small shifts."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(shape[:-1]))
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        if name.endswith(("['scale']", "['var']")):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0.0, 0.1, shape).astype(np.float32)  # BN bias and mean, classifier bias

    return jax.tree_util.tree_map_with_path(fill, abstract)
