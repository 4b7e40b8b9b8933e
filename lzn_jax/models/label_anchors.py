"""Learnable class anchors: the label encoder of case study 3 (SPEC.md §2.5)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lzn_jax.models import layers


class LabelAnchors(nn.Module):
    """A (num_classes, latent_dim) table initialised i.i.d. N(0, 1); class k is encoded as row k."""

    num_classes: int = 10
    latent_dim: int = 200

    @nn.compact
    def __call__(self, labels: jax.Array | None = None) -> jax.Array:
        """labels: (B,) int or None -> anchors (B, latent_dim) float32, or the whole table (num_classes, latent_dim)."""
        table = self.param("anchors", layers.normal_init(1.0), (self.num_classes, self.latent_dim),
                           jnp.float32)
        return table if labels is None else jnp.take(table, labels, axis=0)


def label_anchors_config(num_classes: int = 10, latent_dim: int = 200) -> ml_collections.ConfigDict:
    """Label anchors of case study 3: 10 CIFAR10 classes in the 200-d latent space."""
    return ml_collections.ConfigDict(dict(name="label_anchors", num_classes=num_classes, latent_dim=latent_dim))
