"""The public solver API as a notebook and a trainer use it: no implicit transfers, one compilation per shape,
outputs of fixed types, options as one frozen value."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import zoning
from lzn_jax.zoning import flows


def device_problem(batch=32, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    arrays = (rng.standard_normal((batch, dim)).astype(np.float32) for _ in range(2))
    return tuple(jax.device_put(a) for a in arrays)


def test_public_api_runs_under_disallowed_transfers():
    """Validation included: no implicit host <-> device transfer anywhere in the public solver API."""
    anchors, noise = device_problem()
    targets = jax.device_put(np.arange(32, dtype=np.int32))
    log_weights = jax.device_put(np.zeros(32, np.float32))
    weights = jax.device_put(np.ones(32, np.float32))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    blockwise = zoning.SolverOptions(solver="euler", num_steps=10, block_size=8)
    # The sharded wrappers are called as a trainer calls them: on arrays already laid out by rows.
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    row_anchors, row_noise, row_targets = (jax.device_put(a, rows) for a in (anchors, noise, targets))
    some_anchors, some_noise, own_rows = anchors[:8], noise[:8], targets[:8]  # rows 0-7 of the context
    with jax.transfer_guard("disallow"):
        latents = zoning.compute_latents(anchors, noise)
        zoning.compute_latents(anchors, noise, options=blockwise)
        zoning.compute_latents(some_anchors, some_noise, context=anchors, own_index=own_rows)  # checked by value
        _, log_probs = zoning.assign(latents, anchors, log_weights=log_weights, num_steps=10)
        _, target_log_probs = zoning.assign_targets(latents, anchors, targets, num_steps=10)
        zoning.assign_targets(latents, anchors, targets, options=blockwise)
        zoning.alignment_loss(log_probs, targets)
        zoning.target_alignment_loss(target_log_probs, use_log=True)
        zoning.log_weights_from_weights(weights)
        zoning.latent_velocity(latents, 0.5, anchors)
        zoning.posterior_log_probs(latents, 0.5, anchors)
        sharded = zoning.compute_latents_sharded(row_anchors, row_noise, mesh=mesh)
        zoning.assign_targets_sharded(sharded, row_anchors, row_targets, mesh=mesh,
                                      options=zoning.SolverOptions(solver="euler", num_steps=10))
        jax.jit(jax.grad(lambda a: jnp.sum(zoning.compute_latents(a, noise) * noise)))(anchors)
    np.testing.assert_allclose(sharded, latents, rtol=1e-5, atol=1e-5)


def test_eager_calls_compile_once_per_shape_and_options():
    anchors, noise = device_problem(seed=1)
    zoning.compute_latents(anchors, noise, num_steps=7)
    before = flows._compute_latents._cache_size()
    for _ in range(3):
        zoning.compute_latents(anchors, noise, num_steps=7)
        zoning.compute_latents(anchors, noise, options=zoning.SolverOptions(num_steps=7))  # the same options
    assert flows._compute_latents._cache_size() == before
    zoning.compute_latents(anchors, noise, num_steps=8)
    assert flows._compute_latents._cache_size() == before + 1


def test_outputs_have_fixed_types():
    anchors, noise = device_problem(seed=2)
    latents = zoning.compute_latents(anchors, noise)
    assert isinstance(latents, jax.Array) and latents.shape == (32, 6)
    assignment = zoning.assign(latents, anchors, num_steps=10)
    assert isinstance(assignment, zoning.Assignment) and assignment.log_probs.shape == (10, 32, 32)
    targeted = zoning.assign_targets(latents, anchors, jnp.arange(32), num_steps=10)
    assert isinstance(targeted, zoning.TargetAssignment) and targeted.target_log_probs.shape == (10, 32)
    np.testing.assert_allclose(
        targeted.target_log_probs, jnp.take_along_axis(assignment.log_probs, jnp.arange(32)[None, :, None], 2)[..., 0],
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targeted.endpoints, assignment.endpoints, rtol=1e-6, atol=1e-6)


def test_options_are_frozen_hashable_and_keywords_override_them():
    options = zoning.SolverOptions(solver="euler", num_steps=9, eps=0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.num_steps = 3
    assert hash(options) == hash(zoning.SolverOptions(solver="euler", num_steps=9, eps=0.01))
    anchors, noise = device_problem(seed=3)
    via_keywords = zoning.compute_latents(anchors, noise, options=options, num_steps=4)
    via_options = zoning.compute_latents(anchors, noise, options=options.replace(num_steps=4))
    np.testing.assert_array_equal(via_keywords, via_options)
    assert options.start_offset == 0.01 and zoning.SolverOptions(solver="euler").start_offset == 1e-4
