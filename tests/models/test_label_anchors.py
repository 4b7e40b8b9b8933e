"""Label anchors: N(0, 1) initialisation, row lookup, gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax import models


def test_initialised_standard_normal():
    module = models.build(models.label_anchors_config(num_classes=100, latent_dim=200))
    table = np.asarray(module.init(jax.random.key(0))["params"]["anchors"], np.float64)
    assert table.shape == (100, 200)
    # 20,000 draws: mean within 5 standard errors of 0, std within 2%; tails present (not uniform).
    assert abs(table.mean()) < 5 / np.sqrt(table.size)
    assert abs(table.std() - 1) < 0.02
    assert np.abs(table).max() > 3.5
    assert abs(np.mean(np.abs(table)) - np.sqrt(2 / np.pi)) < 0.02  # E|N(0, 1)|


def test_lookup_returns_rows_in_both_modes_and_gradient_counts_labels():
    module = models.LabelAnchors(num_classes=10, latent_dim=4)
    params = module.init(jax.random.key(1))
    labels = jnp.asarray([3, 3, 0, 9])
    table = np.asarray(module.apply(params))
    assert table.shape == (10, 4)
    np.testing.assert_array_equal(module.apply(params, labels), table[[3, 3, 0, 9]])
    np.testing.assert_array_equal(module.apply(params, labels, train=True), table[[3, 3, 0, 9]])
    grad = jax.grad(lambda p: module.apply(p, labels).sum())(params)["params"]["anchors"]
    counts = np.bincount(np.asarray(labels), minlength=10)
    np.testing.assert_array_equal(grad, np.repeat(counts[:, None], 4, axis=1))
