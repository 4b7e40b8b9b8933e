"""Learnable class anchors: the label encoder of case study 3 (docs/method.md, 'Models')."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lzn_jax.models import layers


class LabelAnchors(nn.Module):
    """A (num_classes, latent_dim) table initialised i.i.d. N(0, 1); class k is encoded as row k."""

    num_classes: int = 10
    latent_dim: int = 200

    @nn.nowrap
    def example_inputs(self, batch_size: int, image_size: int | None = None, num_channels: int = 3) -> tuple[()]:
        """No inputs: `init(rng)` builds the table (the arguments exist for the registry's uniform call)."""
        del batch_size, image_size, num_channels
        return ()

    @nn.compact
    def __call__(self, labels: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """labels: (B,) int -> anchors (B, latent_dim) float32, rows of the table.

        Labels default to every class in order, which returns the whole table (num_classes, latent_dim): the context
        the label flow needs. `train` is accepted for interface uniformity; a lookup has no training mode.
        """
        del train
        table = self.param("anchors", layers.normal_init(1.0), (self.num_classes, self.latent_dim), jnp.float32)
        return table if labels is None else jnp.take(table, labels, axis=0)
