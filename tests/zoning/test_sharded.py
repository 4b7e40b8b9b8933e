"""Sharded (shard_map over 8 fake CPU devices) equals unsharded, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lzn_jax import zoning

MESHES = [((8,), ("data",), "data"), ((4, 2), ("data", "model"), ("data", "model")),
          ((4, 2), ("data", "model"), "data")]


def make_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def problem(batch=16, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(1.5 * rng.standard_normal((batch, dim))), jnp.asarray(rng.standard_normal((batch, dim))),
            jnp.asarray(rng.standard_normal((batch, dim))), jnp.asarray(1.5 * rng.standard_normal((batch, dim))))


def assert_trees_close(a, b, rtol=1e-9):
    """Leaves equal to ``rtol`` (relative to each leaf's largest finite entry), with -inf exactly where expected."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        finite = np.isfinite(y)
        np.testing.assert_array_equal(np.isfinite(x), finite)
        np.testing.assert_array_equal(x[~finite], y[~finite])
        scale = float(np.max(np.abs(y[finite]))) if finite.any() else 1.0
        np.testing.assert_allclose(x[finite], y[finite], rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("shape,names,axis,block_size", [m + (None,) for m in MESHES] + [MESHES[1] + (5,)])
@pytest.mark.parametrize("solver", ["euler", "dpm_solver++"])
def test_sharded_latents_and_gradients_equal_unsharded(x64, shape, names, axis, block_size, solver):
    mesh = make_mesh(shape, names)
    anchors, prior, projection, _ = problem()

    options = zoning.SolverOptions(solver=solver, num_steps=6, block_size=block_size)

    def unsharded_loss(anchors):
        latents = zoning.compute_latents(anchors, prior, options=options)
        return jnp.mean(jnp.sum(latents * projection, -1)), latents

    def sharded_loss(anchors):
        latents = zoning.compute_latents_sharded(anchors, prior, mesh=mesh, axis_name=axis, options=options)
        return jnp.mean(jnp.sum(latents * projection, -1)), latents

    (loss, latents), grads = jax.value_and_grad(unsharded_loss, has_aux=True)(anchors)
    rows = NamedSharding(mesh, PartitionSpec(axis))
    sharded_anchors = jax.device_put(anchors, rows)
    (s_loss, s_latents), s_grads = jax.jit(jax.value_and_grad(sharded_loss, has_aux=True))(sharded_anchors)
    assert s_latents.sharding.is_equivalent_to(rows, 2)
    assert_trees_close((s_loss, s_latents, s_grads), (loss, latents, grads))


@pytest.mark.parametrize("shape,names,axis", MESHES[:2])
def test_sharded_alignment_to_other_view_equals_unsharded(x64, shape, names, axis):
    """Case study 2: latents of view 0 aligned to the gathered anchors of view 1, target = global index."""
    mesh = make_mesh(shape, names)
    view0, prior, _, view1 = problem(seed=1)

    forward = zoning.SolverOptions(solver="euler", num_steps=5)
    reverse = zoning.SolverOptions(solver="euler", num_steps=5)
    targets = jnp.arange(16)

    def loss(view0, view1, sharded):
        if sharded:
            latents = zoning.compute_latents_sharded(view0, 0.45 * prior, mesh=mesh, axis_name=axis, options=forward)
            _, log_probs = zoning.assign_targets_sharded(latents, view1, targets, mesh=mesh, axis_name=axis,
                                                         options=reverse)
        else:
            latents = zoning.compute_latents(view0, 0.45 * prior, options=forward)
            _, log_probs = zoning.assign_targets(latents, view1, targets, options=reverse)
        return zoning.target_alignment_loss(log_probs, cut_off=0.2, use_log=True)

    expected = jax.value_and_grad(loss, argnums=(0, 1))(view0, view1, False)
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(view0, view1, True)
    assert_trees_close(got, expected)


def test_sharded_label_flow_with_global_class_weights_equals_unsharded(x64):
    """Case study 3: replicated label anchors, class weights from the global batch's label counts."""
    mesh = make_mesh((8,), ("data",))
    rng = np.random.default_rng(2)
    label_anchors = jnp.asarray(rng.standard_normal((4, 5)))
    latents = jnp.asarray(rng.standard_normal((16, 5)))
    labels = jnp.asarray(rng.integers(0, 3, 16))  # class 3 absent: weight zero, log-weight -inf

    def loss(latents, label_anchors, sharded):
        log_weights = zoning.class_log_weights(labels, 4)
        if sharded:
            _, log_probs = zoning.assign_sharded(latents, label_anchors, mesh=mesh, context_sharded=False,
                                                 log_weights=log_weights,
                                                 options=zoning.SolverOptions(solver="euler", num_steps=20))
        else:
            _, log_probs = zoning.assign(latents, label_anchors, log_weights=log_weights, num_steps=20)
        return zoning.alignment_loss(log_probs, labels), log_probs

    expected = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(latents, label_anchors, False)
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(
        latents, label_anchors, True)
    assert_trees_close(got, expected)


def test_label_flow_forward_with_replicated_context_equals_unsharded(x64):
    """Case study 3's class-conditional latents: each device's rows start at their label anchors, and the
    context is the replicated label-anchor table, inside the caller's own shard_map."""
    mesh = make_mesh((8,), ("data",))
    rng = np.random.default_rng(4)
    label_anchors = jnp.asarray(rng.standard_normal((3, 5)))
    labels = jnp.asarray(rng.integers(0, 3, 16))
    noise = jnp.asarray(rng.standard_normal((16, 5)))

    def local_loss(label_anchors, labels, noise):
        latents = zoning.compute_latents(label_anchors[labels], noise, context=label_anchors, solver="euler",
                                         num_steps=8)
        return jax.lax.psum(jnp.sum(latents**2), "data") / 16

    sharded = jax.shard_map(local_loss, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data"),
                                                             PartitionSpec("data")), out_specs=PartitionSpec())

    def unsharded(label_anchors, labels, noise):
        latents = zoning.compute_latents(label_anchors[labels], noise, context=label_anchors, solver="euler",
                                         num_steps=8)
        return jnp.sum(latents**2) / 16

    expected = jax.value_and_grad(unsharded)(label_anchors, labels, noise)
    got = jax.jit(jax.value_and_grad(sharded))(label_anchors, labels, noise)
    assert_trees_close(got, expected)


def test_class_log_weights_sum_counts_over_devices():
    mesh = make_mesh((8,), ("data",))
    labels = jnp.asarray(np.random.default_rng(3).integers(0, 5, 32))
    local = jax.shard_map(lambda y: zoning.class_log_weights(y, 5, axis_name="data"), mesh=mesh,
                          in_specs=PartitionSpec("data"), out_specs=PartitionSpec())
    np.testing.assert_allclose(jax.jit(local)(labels), zoning.class_log_weights(labels, 5), rtol=1e-6)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    mesh = make_mesh((8,), ("data",))
    anchors = jnp.ones((12, 3))
    with pytest.raises(ValueError, match="12 rows, not divisible by the 8 devices"):
        zoning.compute_latents_sharded(anchors, anchors, mesh=mesh)
    with pytest.raises(ValueError, match="lacks"):
        zoning.compute_latents_sharded(jnp.ones((16, 3)), jnp.ones((16, 3)), mesh=mesh, axis_name="batch")


def test_local_compute_latents_returns_global_index():
    """Inside a caller's shard_map: each device's rows get their global row index, rank * B_l + b."""
    mesh = make_mesh((8,), ("data",))
    anchors, prior, _, _ = problem()
    options = zoning.SolverOptions(solver="euler", num_steps=4)
    local = jax.shard_map(lambda a, p: zoning.local_compute_latents(a, p, axis_name="data", options=options),
                          mesh=mesh, in_specs=(PartitionSpec("data"),) * 2, out_specs=PartitionSpec("data"))
    latents, index = jax.jit(local)(anchors, prior)
    np.testing.assert_array_equal(index, np.arange(16))
    np.testing.assert_allclose(latents, zoning.compute_latents(anchors, prior, options=options), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_wrappers_take_the_mesh_of_set_mesh_with_explicit_or_auto_axes(axis_type):
    """``jax.make_mesh`` builds Explicit axes by default; the wrappers accept either kind, from the argument or
    from ``jax.set_mesh``, eagerly and under jit, and agree with the unsharded solver."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    rng = np.random.default_rng(7)
    anchors, prior = (jnp.asarray(rng.standard_normal((16, 5)), jnp.float32) for _ in range(2))
    targets = jnp.asarray(rng.permutation(16))
    forward, reverse = zoning.SolverOptions(solver="euler", num_steps=6), zoning.SolverOptions(num_steps=6,
                                                                                                solver="euler")
    expected_latents = zoning.compute_latents(anchors, prior, options=forward)
    expected = zoning.assign(expected_latents, anchors, options=reverse)
    expected_targets = zoning.assign_targets(expected_latents, anchors, targets, options=reverse)
    with jax.set_mesh(mesh):
        rows = jax.device_put(anchors, PartitionSpec("data"))
        latents = zoning.compute_latents_sharded(rows, prior, options=forward)
        assignment = zoning.assign_sharded(latents, rows, options=reverse)
        targeted = jax.jit(lambda z, c, k: zoning.assign_targets_sharded(z, c, k, options=reverse))(
            latents, rows, targets)
    explicit = zoning.compute_latents_sharded(anchors, prior, options=forward, mesh=mesh)
    for got, want in ((latents, expected_latents), (explicit, expected_latents), (assignment, expected),
                      (targeted, expected_targets)):
        assert_trees_close(got, want, rtol=2e-5)


def test_wrappers_without_a_mesh_say_how_to_give_one():
    with pytest.raises(ValueError, match="jax.set_mesh"):
        zoning.compute_latents_sharded(jnp.ones((16, 3)), jnp.ones((16, 3)))
