"""Gradients through both solvers and the loss: finite differences in float64, remat and blockwise paths."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lzn_jax import zoning


def small_problem(seed=0, num=6, dim=3, scale=1.0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(scale * rng.standard_normal((num, dim))), jnp.asarray(rng.standard_normal((num, dim))),
            jnp.asarray(rng.standard_normal((num, dim))))


@pytest.mark.parametrize("solver,steps", [("euler", 6), ("dpm_solver++", 6)])
def test_check_grads_compute_latents(x64, solver, steps):
    anchors, prior, projection = small_problem()

    def f(anchors, context):
        return jnp.sum(zoning.compute_latents(anchors, prior, context=context, solver=solver, num_steps=steps)
                       * projection)

    # eps = 0.05 keeps the flow well conditioned, so finite differences are accurate.
    def f_eps(anchors, context):
        return jnp.sum(zoning.compute_latents(anchors, prior, context=context, solver=solver, num_steps=steps,
                                              eps=0.05) * projection)

    f, f_eps = jax.jit(f), jax.jit(f_eps)  # one compilation for the primal, VJP and finite-difference calls

    check_grads(f_eps, (anchors, anchors + 0.1), order=1, modes=["rev"], eps=1e-5, atol=1e-6, rtol=1e-6)
    check_grads(lambda a: f(a, a), (anchors,), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("solver", ["euler", "dpm_solver++"])
def test_check_grads_compute_latents_with_own_index(x64, solver, block_size):
    """The anchors are rows of a larger context, as after a gather across devices, named by ``own_index``; the
    kernels then combine each anchor's two roles in the backward pass. One other context row is an exact copy of
    an anchor but a separate input, so its contributions must stay apart from that anchor's."""
    anchors, prior, projection = small_problem()
    others = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3))).at[1].set(anchors[2])
    own_index = jnp.asarray([6, 5, 4, 3, 2, 1], jnp.int32)  # context = others[0], anchors reversed, others[1:]
    options = zoning.SolverOptions(solver=solver, num_steps=6, eps=0.05, block_size=block_size)

    @jax.jit
    def f(anchors, others):
        context = jnp.concatenate([others[:1], anchors[::-1], others[1:]])
        return jnp.sum(zoning.compute_latents(anchors, prior, context=context, own_index=own_index,
                                              options=options) * projection)

    check_grads(f, (anchors, others), order=1, modes=["rev"], eps=1e-5, atol=1e-6, rtol=1e-6)

    def separate(anchors, context):  # the same function, each role differentiated on its own
        return jnp.sum(zoning.compute_latents(anchors, prior, context=context, options=options) * projection)

    context = jnp.concatenate([others[:1], anchors[::-1], others[1:]])
    g_anchors, g_context = jax.grad(separate, argnums=(0, 1))(anchors, context)
    expected = g_anchors + g_context[1:7][::-1]
    np.testing.assert_allclose(jax.grad(f)(anchors, others), expected, rtol=1e-10, atol=1e-12)


def test_own_index_is_checked():
    anchors, prior, _ = small_problem()
    context = jnp.concatenate([anchors, anchors[:2] + 1.0])
    with pytest.raises(ValueError, match="2 of 6 rows differ"):
        zoning.compute_latents(anchors, prior, context=context, own_index=jnp.asarray([0, 1, 2, 3, 6, 7]))
    with pytest.raises(ValueError, match=r"own_index must index the 8 context anchors"):
        zoning.compute_latents(anchors, prior, context=context, own_index=jnp.arange(6) + 3)
    with pytest.raises(ValueError, match=r"own_index must be \(6,\) integers"):
        zoning.compute_latents(anchors, prior, context=context, own_index=jnp.arange(6.0))
    with pytest.raises(ValueError, match="explicit context"):
        zoning.compute_latents(anchors, prior, own_index=jnp.arange(6))


@pytest.mark.parametrize("solver,steps", [("euler", 8), ("dpm_solver++", 5)])
def test_check_grads_assign_and_alignment_loss(x64, solver, steps):
    anchors, prior, _ = small_problem(1)
    latents = prior * 1.2
    log_weights = jnp.log(jnp.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0]))
    targets = jnp.array([0, 1, 2, 3, 4, 5])

    def loss(latents, context, log_weights, use_log):
        _, log_probs = zoning.assign(latents, context, solver=solver, num_steps=steps, log_weights=log_weights)
        return zoning.alignment_loss(log_probs, targets, cut_off=0.2, use_log=use_log)

    def endpoints(latents, context, log_weights):
        return jnp.sum(zoning.assign(latents, context, solver=solver, num_steps=steps,
                                     log_weights=log_weights)[0] ** 2)

    for use_log in (False, True):
        check_grads(jax.jit(lambda *a, use_log=use_log: loss(*a, use_log)), (latents, anchors, log_weights),
                    order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
    check_grads(jax.jit(endpoints), (latents, anchors, log_weights), order=1, modes=["rev"], eps=1e-6, atol=1e-6,
                rtol=1e-6)


def test_check_grads_full_lzn_composition(x64):
    """anchors -> latents (DPM) -> reverse flow over the same anchors -> alignment loss (case study 2 shape)."""
    anchors, prior, _ = small_problem(2)

    def loss(anchors, other_view):
        latents = zoning.compute_latents(anchors, 0.45 * prior, solver="euler", num_steps=5, eps=0.05)
        _, target_log_probs = zoning.assign_targets(latents, other_view, jnp.arange(6), num_steps=5)
        return zoning.target_alignment_loss(target_log_probs, use_log=True)

    check_grads(jax.jit(loss), (anchors, anchors + 0.05), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def _problem32(seed, batch=24, num=40, dim=10):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(2 * rng.standard_normal((num, dim)), jnp.float32),
            jnp.asarray(rng.standard_normal((num, dim)), jnp.float32),
            jnp.asarray(rng.standard_normal((batch, dim)), jnp.float32))


@pytest.mark.parametrize("solver", ["euler", "dpm_solver++"])
def test_rematerialised_steps_give_identical_values_and_gradients(solver):
    context, prior, projection = _problem32(3)
    own, own_prior = context[:24], prior[:24]

    def run(budget):
        def f(own, context):
            options = zoning.SolverOptions(solver=solver, num_steps=10, memory_budget_bytes=budget)
            return jnp.sum(zoning.compute_latents(own, own_prior, context=context, options=options) * projection)
        return jax.value_and_grad(f, argnums=(0, 1))(own, context)

    (v_saved, g_saved), (v_remat, g_remat) = run(1 << 40), run(0)
    np.testing.assert_allclose(v_saved, v_remat, rtol=1e-6)
    for a, b in zip(g_saved, g_remat):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_remat_policy_follows_memory_budget(caplog):
    """A zero budget rematerialises: the backward pass recomputes products (more dot_generals in the program)
    and keeps less (smaller temporaries); the decision is logged and matches ``remat_plan``."""
    context, prior, projection = _problem32(4, batch=40, num=40, dim=10)

    def compiled(options):
        def f(context):
            return jnp.sum(zoning.compute_latents(context, prior, options=options) * projection)
        lowered = jax.jit(jax.grad(f)).lower(context)
        return lowered.as_text().count("stablehlo.dot_general"), lowered.compile().memory_analysis()

    kept_options = zoning.SolverOptions(solver="euler", num_steps=20, memory_budget_bytes=1 << 40)
    remat_options = zoning.SolverOptions(solver="euler", num_steps=20, memory_budget_bytes=0)
    assert not zoning.remat_plan(kept_options, batch=40, num_anchors=40, dim=10).rematerialise
    assert zoning.remat_plan(remat_options, batch=40, num_anchors=40, dim=10).rematerialise
    assert zoning.remat_plan(remat_options.replace(remat="never"), batch=40, num_anchors=40, dim=10) \
        .rematerialise is False
    with caplog.at_level(logging.INFO, logger="lzn_jax.zoning"):
        kept_dots, kept_memory = compiled(kept_options)
        remat_dots, remat_memory = compiled(remat_options)
    assert remat_dots > kept_dots
    assert remat_memory.temp_size_in_bytes < kept_memory.temp_size_in_bytes
    messages = [r.getMessage() for r in caplog.records if r.name == "lzn_jax.zoning"]
    assert any("keeping each step's posterior" in m for m in messages)
    assert any("rematerialising each step" in m and "exceed the budget" in m for m in messages)


@pytest.mark.parametrize("block_size", [7, 40, 64])
def test_blockwise_equals_dense_values_and_gradients(x64, block_size):
    # float64: anchor gradients of the forward flow cancel by ~1e4 (docs/numerics.md), so in float32 two exact
    # kernels that merely round differently give visibly different gradients.
    context, prior, projection = (jnp.asarray(a, jnp.float64) for a in _problem32(5))
    own, own_prior = context[:24], prior[:24]
    targets = jnp.arange(24) % 40
    log_weights = jnp.log(jnp.linspace(0.5, 2.0, 40)).at[3].set(-jnp.inf)

    def forward(own, context, block):
        options = zoning.SolverOptions(solver="dpm_solver++", num_steps=8, block_size=block)
        return jnp.sum(zoning.compute_latents(own, own_prior, context=context, options=options) * projection)

    def reverse(latents, context, log_weights, block):
        options = zoning.SolverOptions(solver="euler", num_steps=12, block_size=block)
        end, log_probs = zoning.assign_targets(latents, context, targets, log_weights=log_weights, options=options)
        return zoning.target_alignment_loss(log_probs, cut_off=0.25) + 1e-2 * jnp.sum(end**2), log_probs

    dense_value, dense_grads = jax.value_and_grad(forward, argnums=(0, 1))(own, context, None)
    block_value, block_grads = jax.value_and_grad(forward, argnums=(0, 1))(own, context, block_size)
    np.testing.assert_allclose(block_value, dense_value, rtol=1e-10)
    for a, b in zip(dense_grads, block_grads):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-8 * float(jnp.max(jnp.abs(a))))

    latents = 1.3 * prior[:24]
    grad_fn = jax.value_and_grad(reverse, argnums=(0, 1, 2), has_aux=True)
    (dense_loss, dense_lp), dense_g = grad_fn(latents, context, log_weights, None)
    (block_loss, block_lp), block_g = grad_fn(latents, context, log_weights, block_size)
    np.testing.assert_allclose(block_lp, dense_lp, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(block_loss, dense_loss, rtol=1e-10)
    for a, b in zip(dense_g, block_g):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-8 * float(np.max(np.abs(a))))


@pytest.mark.parametrize("solver,bound", [("euler", 3e-3), ("dpm_solver++", 4e-4)])
def test_blockwise_float32_gradients_stay_close_to_float64(solver, bound):
    """The blockwise kernel recomputes its posterior in the backward pass; near t = eps its logits must match the
    forward's exactly, or exp() overflows. Measured relative errors of the float32 anchor gradients: Euler
    1.1e-3, DPM-Solver++ 1.5e-4 (dense kernel: 1.1e-3 and 1.4e-4; before the blockwise kernel measured from
    the rows' own anchors: 1.8e-2 and 2.0e-3); bounds are ~2.5x those."""
    rng = np.random.default_rng(0)
    anchors, prior = rng.standard_normal((64, 16)), rng.standard_normal((64, 16))

    def grad(dtype, block_size):
        def loss(a):
            options = zoning.SolverOptions(solver=solver, num_steps=20, block_size=block_size)
            return jnp.sum(zoning.compute_latents(a, jnp.asarray(prior, dtype), options=options) ** 2)
        return np.asarray(jax.grad(loss)(jnp.asarray(anchors, dtype)), np.float64)

    with jax.enable_x64(True):
        expected = grad(jnp.float64, None)
    got = grad(jnp.float32, 16)
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) < bound


def test_blockwise_kernels_values_and_gradients(x64):
    """Both blockwise kernels against the posterior written out in NumPy: the pivot variant's mean relative to the
    pivots, its log-normaliser (the absolute one plus ``|q|^2 / (2 t^2)``) and its target log posteriors; the
    origin variant's mean, residual and target log posteriors at ``x = q + (1 - t) r``. Gradients (pivots and
    every output included) pass finite differences. The context holds an exact copy of one pivot, the anchors do
    not fill the last block, one anchor has weight zero, and one target is the row's pivot."""
    from lzn_jax.zoning import _blockwise

    rng = np.random.default_rng(7)
    context = jnp.asarray(rng.standard_normal((7, 3)))
    pivots = jnp.asarray(rng.standard_normal((4, 3))).at[1].set(context[5])
    query = jnp.asarray(0.4 * rng.standard_normal((4, 3)))
    log_weights = jnp.log(jnp.asarray([1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 1.5])).at[2].set(-jnp.inf)
    time = jnp.asarray(0.3)
    scale = 0.5 / time**2
    targets = jnp.asarray([0, 5, 3, 6])
    x = query + (1 - time) * pivots

    logits = np.asarray(log_weights)[None, :] - float(scale) * np.sum(
        (np.asarray(x)[:, None, :] - (1 - float(time)) * np.asarray(context)[None, :, :]) ** 2, axis=-1)
    log_normaliser = np.log(np.sum(np.exp(logits), axis=-1))
    probs = np.exp(logits - log_normaliser[:, None])
    expected_mean = probs @ np.asarray(context)
    expected_targets = logits[np.arange(4), np.asarray(targets)] - log_normaliser

    mean_offset, pivot_log_normaliser, pivot_targets = _blockwise.blockwise_pivot_posterior(
        query, context, pivots, log_weights, targets, None, time, scale, 3)
    np.testing.assert_allclose(mean_offset, expected_mean - np.asarray(pivots), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pivot_log_normaliser, log_normaliser + scale * jnp.sum(query**2, axis=-1),
                               rtol=1e-12)
    np.testing.assert_allclose(pivot_targets, expected_targets, rtol=1e-12)

    mean, residual, origin_targets = _blockwise.blockwise_posterior(x, context, log_weights, targets, time, scale, 3)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(residual, np.asarray(x) - expected_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(origin_targets, expected_targets, rtol=1e-12)

    finite = jnp.where(jnp.isfinite(log_weights), log_weights, 0.0)
    weights = lambda w: jnp.where(jnp.isfinite(log_weights), w, -jnp.inf)  # noqa: E731
    check_grads(jax.jit(lambda q, c, p, w: _blockwise.blockwise_pivot_posterior(q, c, p, weights(w), targets, None,
                                                                                time, scale, 3)),
                (query, context, pivots, finite), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
    # The origin kernel's targets include each row's own pivot (its most probable anchor) for rows 0 and 1.
    own = jnp.argmax(logits, axis=-1).at[2:].set(targets[2:])
    check_grads(jax.jit(lambda x, c, w: _blockwise.blockwise_posterior(x, c, weights(w), own, time, scale, 3)),
                (x, context, finite), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
