"""The pure parts of lzn_jax.experiments.zones (its end-to-end smoke run is in test_experiments.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import zoning
from lzn_jax.evaluation import classification
from lzn_jax.experiments import zones


@pytest.mark.parametrize("count,batch_size", [(359, 8), (359, 359), (10, 3), (10, 1), (7, 7)])
def test_cyclic_batches_predict_every_index_once_in_batches_of_one_size(count, batch_size):
    batches = zones.cyclic_batches(count, batch_size)
    assert all(rows.shape == (batch_size,) for rows, _ in batches)
    predicted = np.concatenate([rows[:new] for rows, new in batches])
    np.testing.assert_array_equal(np.sort(predicted), np.arange(count))
    # Within a batch no index repeats (a wrapped last batch borrows from the start, never itself).
    assert all(len(set(rows.tolist())) == batch_size for rows, _ in batches)


def test_cyclic_batches_refuse_a_size_outside_the_split():
    for bad in (0, 11):
        with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\]"):
            zones.cyclic_batches(10, bad)


def test_reverse_trajectories_end_where_the_solver_ends():
    latents = jax.random.normal(jax.random.key(0), (12, 3))
    context = 0.7 * jax.random.normal(jax.random.key(1), (5, 3))
    paths = zones.reverse_trajectories(latents, context, 50)
    assert paths.shape == (51, 12, 3)
    np.testing.assert_allclose(paths[0], latents, rtol=0, atol=0)
    endpoints = zoning.assign(latents, context, options=zoning.SolverOptions(solver="euler", num_steps=50)).endpoints
    np.testing.assert_allclose(paths[-1], endpoints, atol=2e-4)
    # Every path ends next to one anchor: the zones partition the latents.
    distances = np.linalg.norm(paths[-1][:, None, :] - np.asarray(context)[None], axis=-1)
    assert np.all(distances.min(axis=1) < 0.05)


def test_toy_zones_split_the_gaussian_evenly():
    toy = zones.toy_zones(seed=0, grid=120, extent=4.0)
    # Each zone's Gaussian mass, from the lattice: equal weights give every anchor 1/12 of it (up to the flow's
    # discretisation and the lattice).
    x = toy["axis"]
    density = np.exp(-0.5 * (x[None, :] ** 2 + x[:, None] ** 2))
    mass = np.bincount(toy["zones"].ravel(), weights=density.ravel(), minlength=zones.TOY_ANCHORS) / density.sum()
    np.testing.assert_allclose(mass, 1 / zones.TOY_ANCHORS, atol=0.02)
    assert toy["trajectories"].shape == (101, zones.TRAJECTORIES, 2)
    nearest = classification.nearest_label(jnp.asarray(toy["trajectories"][-1]), jnp.asarray(toy["anchors"]))
    assert len(np.unique(np.asarray(nearest))) > 3
