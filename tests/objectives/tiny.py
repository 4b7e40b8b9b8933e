"""Tiny modules, params and batches shared by the objective tests (8x8x1 images, latent_dim 4, batch 8).

The same shapes in every objective test, so the op-by-op kernels JAX compiles for one test serve the others.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax import models
from lzn_jax.train.state import Modules

BATCH, SIZE, CHANNELS, LATENT_DIM, NUM_CLASSES = 8, 8, 1, 4, 10
# Each jitted objective compiles at XLA's lowest backend optimisation level: the values are the same computation,
# the compile of the NCSN++ backward pass takes a third of the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Dropout on: the objectives' dropout keys are part of what the hand-composed computations must mirror.
TRUNK = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, fir=False,
             progressive_input="none")
ENCODER = dict(name="ncsnpp_encoder", latent_dim=LATENT_DIM, num_base_channels=2, num_base_units=8,
               num_latent_transformation_layers=2, latent_transformation_resolutions=None, **TRUNK)
DECODER = dict(name="ncsnpp_decoder", latent_dim=LATENT_DIM, num_classes=NUM_CLASSES, embedding_type="positional",
               progressive="none", scale_by_sigma=False, **TRUNK)
LABEL_ANCHORS = dict(name="label_anchors", num_classes=NUM_CLASSES, latent_dim=LATENT_DIM)


def jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def perturbed(params, seed: int, scale: float = 0.05):
    """Every leaf plus ``scale`` N(0, 1) noise: the decoder's output conv starts near zero (init_scale 0), which would
    make its prediction, hence the loss, blind to the latent, the class and the time it is given."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return treedef.unflatten(
        [leaf + jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    )


def build(encoder: dict | None = ENCODER, decoder: dict | None = DECODER, label_anchors: dict | None = LABEL_ANCHORS,
          *, seed: int = 0) -> tuple[Modules, dict]:
    """(Modules, params) of the given module configs (None: no such module), params perturbed."""
    built = {"encoder": encoder, "decoder": decoder, "label_anchors": label_anchors}
    modules = Modules(**{name: None if block is None else models.build(block) for name, block in built.items()})
    params = {}
    for index, name in enumerate(("encoder", "decoder", "label_anchors")):
        module = getattr(modules, name)
        if module is not None:
            inputs = module.example_inputs(1, SIZE, CHANNELS)
            params[name] = module.init(jax.random.key(100 * seed + index), *inputs)["params"]
    return modules, perturbed(params, seed)


def images(seed: int, *leading: int) -> jax.Array:
    """float32 images in [-1, 1] of shape (*leading, SIZE, SIZE, CHANNELS)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1.0, 1.0, (*leading, SIZE, SIZE, CHANNELS)), jnp.float32)


def data_mesh_sharding():
    """(mesh over the 8 fake devices, NamedSharding of rows over "data")."""
    from lzn_jax import parallel

    mesh = parallel.data_mesh()
    assert mesh.devices.size == 8, "tests/conftest.py provides 8 CPU devices"
    return mesh, parallel.batch_sharding(mesh)


def tree_errors(actual, expected) -> tuple[float, float]:
    """(|a - e| / |e|, max|a - e| / max|e|) over all leaves of a tree taken as one vector.

    Measured over the whole tree, not leaf by leaf: some leaves' gradients are zero up to rounding (an attention
    key bias) or sums that cancel across the batch (the bias of the anchor heads, a translation of every anchor), and
    their own relative error means nothing.
    """
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(actual)])
    e = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(expected)])
    assert a.shape == e.shape
    return float(np.linalg.norm(a - e) / np.linalg.norm(e)), float(np.max(np.abs(a - e)) / np.max(np.abs(e)))
