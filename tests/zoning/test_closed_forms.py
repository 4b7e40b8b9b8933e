"""Closed forms the solver must reproduce exactly: straight lines, exact DPM steps, assignments, weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import zoning
from lzn_jax.zoning import dpm_solver


@pytest.mark.parametrize("solver", ["euler", "dpm_solver++"])
def test_single_anchor_flows_on_a_straight_line(x64, solver):
    """With one anchor a, the flow from (1 - eps) a + eps e is the straight line (1 - t) a + t e."""
    rng = np.random.default_rng(0)
    anchor = rng.standard_normal((1, 6)) * 3
    prior = rng.standard_normal((5, 6))
    own = np.repeat(anchor, 5, axis=0)
    latents = zoning.compute_latents(jnp.asarray(own), jnp.asarray(prior), context=jnp.asarray(anchor),
                                     solver=solver, num_steps=7)
    t_end = 1.0 if solver == "euler" else 1 - 1e-3
    # float64 rounding at the start is amplified ~1/eps = 1e4 along the flow (docs/numerics.md).
    np.testing.assert_allclose(latents, (1 - t_end) * own + t_end * prior, rtol=0, atol=1e-10)


def test_first_order_dpm_step_is_exact_for_a_single_anchor(x64):
    """order=1, one step: x_t = (t/s) x + (1 - t/s) a lands exactly on the line for any step size."""
    anchor = np.array([[1.5, -2.0, 0.5]])
    prior = np.array([[0.3, 0.1, -1.0]])
    options = zoning.SolverOptions(solver="dpm_solver++", num_steps=1, order=1, eps=0.1)
    latents = zoning.compute_latents(jnp.asarray(anchor), jnp.asarray(prior), options=options)
    np.testing.assert_allclose(latents, 0.1 * anchor + 0.9 * prior, rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver,steps,atol", [("euler", 100, 1e-4), ("dpm_solver++", 50, 5e-2)])
def test_reverse_of_forward_lands_on_own_anchor(solver, steps, atol):
    """Well-separated anchors: latents flow back into their own zone and end on their own anchor.

    The forward flow gets 200 steps: with anchors this far apart the posterior switches sharply, and the
    reference's 20-step time-uniform grid misroutes some rows (7 of 16 here), in the reference as in ours.
    DPM-Solver++ stops at t = 1e-3, hence its looser end-point tolerance.
    """
    rng = np.random.default_rng(1)
    anchors = jnp.asarray(rng.standard_normal((16, 8)) * 6, jnp.float32)
    prior = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    latents = zoning.compute_latents(anchors, prior, solver="dpm_solver++", num_steps=200)
    endpoints, log_probs = zoning.assign(latents, anchors, solver=solver, num_steps=steps)
    np.testing.assert_array_equal(np.argmax(log_probs[-1], axis=-1), np.arange(16))
    np.testing.assert_allclose(endpoints, anchors, rtol=0, atol=atol)


def test_log_probs_normalised_and_first_entry_equals_weights():
    rng = np.random.default_rng(2)
    context = jnp.asarray(rng.standard_normal((10, 5)), jnp.float32)
    latents = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
    weights = rng.uniform(0.5, 4.0, 10)
    log_weights = zoning.log_weights_from_weights(jnp.asarray(weights, jnp.float32))
    _, log_probs = zoning.assign(latents, context, num_steps=30, log_weights=log_weights)
    np.testing.assert_allclose(jnp.sum(jnp.exp(log_probs), axis=-1), 1.0, atol=1e-5)
    expected = np.broadcast_to(weights / weights.sum(), (7, 10))
    np.testing.assert_allclose(jnp.exp(log_probs[0]), expected, rtol=1e-5)
    _, uniform = zoning.assign(latents, context, num_steps=30)
    np.testing.assert_allclose(jnp.exp(uniform[0]), 0.1, rtol=1e-5)


def test_zero_weight_gives_no_nan_in_values_or_gradients():
    """docs/differences.md, item 2: the reference divides 0/0 when the nearest anchor has weight zero."""
    context = jnp.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0]])
    latents = jnp.array([[0.01, 0.02], [0.5, -0.3]])  # next to the anchor that gets weight zero
    log_weights = jnp.array([-jnp.inf, 0.0, jnp.log(2.0)])

    def loss(latents, context):
        _, log_probs = zoning.assign(latents, context, num_steps=50, log_weights=log_weights)
        return zoning.alignment_loss(log_probs, jnp.array([1, 2]), cut_off=0.2)

    endpoints, log_probs = zoning.assign(latents, context, num_steps=50, log_weights=log_weights)
    assert np.all(np.isfinite(endpoints))
    assert np.all(np.exp(log_probs[:, :, 0]) == 0)
    assert not np.any(np.isnan(log_probs))
    grads = jax.grad(loss, argnums=(0, 1))(latents, context)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_step_orders_follow_lower_order_final_rule():
    assert dpm_solver.step_orders(20, 3, True) == [1, 2] + [3] * 18
    assert dpm_solver.step_orders(6, 3, True) == [1, 2, 3, 3, 2, 1]
    assert dpm_solver.step_orders(6, 3, False) == [1, 2, 3, 3, 3, 3]
    assert dpm_solver.step_orders(5, 2, True) == [1, 2, 2, 2, 1]


def test_time_grids_match_spec():
    grid = dpm_solver.time_grid(20, 1e-3, reverse=False)
    assert grid[0] == 1e-3 and grid[-1] == 0.999 and len(grid) == 21
    assert dpm_solver.time_grid(20, 1e-3, reverse=True)[0] == 0.999


def test_alignment_loss_closed_form():
    # S = 10 steps, cut_off 0.2 -> steps 2..9 count; sample 0's best kept probability is 0.9 at step 5,
    # sample 1's is 0.6 at step 9 (its 0.99 at step 1 is cut off).
    probs = np.full((10, 2, 3), 1 / 3)
    probs[5, 0] = [0.9, 0.05, 0.05]
    probs[1, 1] = [0.005, 0.99, 0.005]
    probs[9, 1] = [0.2, 0.6, 0.2]
    log_probs = jnp.log(jnp.asarray(probs))
    targets = jnp.array([0, 1])
    np.testing.assert_allclose(zoning.alignment_loss(log_probs, targets), -(0.9 + 0.6) / 2, rtol=1e-6)
    np.testing.assert_allclose(zoning.alignment_loss(log_probs, targets, use_log=True),
                               -(np.log(0.9) + np.log(0.6)) / 2, rtol=1e-6)
    column = jnp.take_along_axis(log_probs, targets[None, :, None], axis=2)[..., 0]
    np.testing.assert_allclose(zoning.target_alignment_loss(column), -(0.9 + 0.6) / 2, rtol=1e-6)
    # The gradient reaches only the arg-max step of each sample.
    grad = jax.grad(lambda lp: zoning.alignment_loss(lp, targets))(log_probs)
    nonzero = np.argwhere(np.asarray(grad) != 0)
    assert {tuple(i) for i in nonzero} == {(5, 0, 0), (9, 1, 1)}


def test_log_alignment_loss_stays_finite_when_probability_underflows():
    """docs/differences.md, item 3: the reference's -log(max p) is +inf once p underflows in float32."""
    context = jnp.array([[0.0], [40.0]])
    latents = jnp.array([[-5.0]])  # flows to anchor 0; the target anchor 1 becomes vanishingly unlikely
    _, log_probs = zoning.assign(latents, context, num_steps=20)
    loss = zoning.alignment_loss(log_probs, jnp.array([1]), cut_off=0.5, use_log=True)
    best_probability = np.exp(-np.float32(loss))
    assert best_probability == 0.0  # the probability itself underflows in float32 ...
    assert np.isfinite(loss) and loss > 900  # ... but its log does not


def test_class_log_weights():
    log_w = zoning.class_log_weights(jnp.array([0, 0, 2, 2, 2, 3]), 5)
    np.testing.assert_allclose(jnp.exp(log_w), [2 / 6, 0, 3 / 6, 1 / 6, 0], atol=1e-7)


def test_class_log_weights_are_float64_under_x64(x64):
    log_w = zoning.class_log_weights(jnp.array([0, 1, 1]), 2)
    assert log_w.dtype == jnp.float64
    np.testing.assert_allclose(log_w, np.log([1 / 3, 2 / 3]), rtol=1e-15)


def test_bad_input_raises_clear_errors():
    a = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="solver='rk45' does not exist"):
        zoning.compute_latents(a, a, solver="rk45")
    with pytest.raises(ValueError, match="noise has latent dimension 2"):
        zoning.compute_latents(a, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="noise has 3 rows"):
        zoning.compute_latents(a, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="context has latent dimension 5"):
        zoning.assign(a, jnp.ones((6, 5)))
    with pytest.raises(ValueError, match="weights must be strictly positive"):
        zoning.log_weights_from_weights(jnp.array([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="log_weights must have shape \\(4,\\)"):
        zoning.assign(a, a, log_weights=jnp.zeros(3))
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        zoning.compute_latents(a, a, num_steps=0)
    with pytest.raises(ValueError, match="num_steps \\(2\\) must be >= order \\(3\\)"):
        zoning.compute_latents(a, a, num_steps=2)
    with pytest.raises(ValueError, match="cut_off=1.0 keeps no step"):
        zoning.alignment_loss(jnp.zeros((10, 4, 4)), jnp.zeros(4, jnp.int32), cut_off=1.0)
    with pytest.raises(ValueError, match="use assign_targets"):
        zoning.assign(a, a, options=zoning.SolverOptions(solver="euler", num_steps=5, block_size=2))
    with pytest.raises(ValueError, match="targets must index the 4 context anchors"):
        zoning.assign_targets(a, a, jnp.array([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="targets must index the 4 context anchors"):
        zoning.assign_targets(a, a, jnp.array([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="targets must be \\(4,\\) integers"):
        zoning.assign_targets(a, a, jnp.zeros(4))
    with pytest.raises(ValueError, match="remat='sometimes' does not exist"):
        zoning.SolverOptions(remat="sometimes")
    with pytest.raises(TypeError, match="options must be a zoning.SolverOptions"):
        zoning.compute_latents(a, a, options={"solver": "euler"})
    with pytest.raises(ValueError, match="target_log_probs must be \\(steps, batch\\)"):
        zoning.target_alignment_loss(jnp.zeros((10, 4, 4)))
