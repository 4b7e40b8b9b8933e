"""The solver against an independent float64 NumPy transcription of the reference's broadcast formulation.

The NumPy code below follows the reference's formulation (docs/method.md) literally, as plainly as possible: the (B, N, D) implied-noise
tensor, max-shifted pdfs with weights multiplied after the shift, Euler with ``t += h``, and DPM-Solver++ with
the data prediction derived from the velocity through the noise prediction, exactly as the reference does.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import zoning


# ------------------------------------------------------------------------------------------------ reference


def ref_velocity(x, t, anchors, weights=None):
    """Returns (velocity (B, D), weighted unnormalised pdf (B, N)), max-shifted with weights after the shift."""
    noise = (x[:, None, :] - (1.0 - t) * anchors[None, :, :]) / t
    log_pdf = -0.5 * np.sum(noise**2, axis=-1)
    pdf = np.exp(log_pdf - log_pdf.max(axis=1, keepdims=True))
    if weights is not None:
        pdf = pdf * weights[None, :]
    v = np.sum(pdf[:, :, None] * (noise - anchors[None]), axis=1) / np.sum(pdf, axis=1)[:, None]
    return v, pdf


def ref_euler_forward(own, prior, anchors, steps, eps=1e-4):
    t = eps
    x = eps * prior + (1 - eps) * own
    h = (1 - eps) / steps
    for _ in range(steps):
        v, _ = ref_velocity(x, t, anchors)
        x = x + h * v
        t = t + h
    return x


def ref_euler_reverse(z, anchors, steps, weights=None):
    t, x, h = 1.0, z, 1.0 / steps
    pdfs = []
    for _ in range(steps):
        v, p = ref_velocity(x, t, anchors, weights)
        x = x - h * v
        t = t - h
        pdfs.append(p)
    return x, np.stack(pdfs)


def ref_data_prediction(x, t, anchors, weights=None):
    """The reference's route: velocity -> noise prediction -> data prediction (alpha = 1 - t, sigma = t)."""
    v, p = ref_velocity(x, t, anchors, weights)
    alpha, sigma, d_alpha, d_sigma = 1 - t, t, -1.0, 1.0
    noise_prediction = (v - (d_alpha / alpha) * x) / (d_sigma - sigma * d_alpha / alpha)
    return (x - sigma * noise_prediction) / alpha, p


def ref_dpm_solver(x, anchors, steps, t_start, t_end, order=3, weights=None, lower_order_final=True):
    times = np.linspace(t_start, t_end, steps + 1)
    lam = lambda t: np.log((1 - t) / t)  # noqa: E731
    d, p = ref_data_prediction(x, times[0], anchors, weights)
    history, history_t, pdfs = [d], [times[0]], [p]
    for k in range(1, steps + 1):
        if k < order:
            step_order = k
        elif lower_order_final and steps < 10:
            step_order = min(order, steps + 1 - k)
        else:
            step_order = order
        s, t = history_t[-1], times[k]
        h = lam(t) - lam(s)
        alpha_t, sigma_t, sigma_s = 1 - t, t, s
        phi_1 = np.expm1(-h)
        d1 = history[-1]
        x_new = (sigma_t / sigma_s) * x - alpha_t * phi_1 * d1
        if step_order >= 2:
            r0 = (lam(s) - lam(history_t[-2])) / h
            delta0 = (d1 - history[-2]) / r0
        if step_order == 2:
            x_new = x_new - 0.5 * alpha_t * phi_1 * delta0
        if step_order == 3:
            r1 = (lam(history_t[-2]) - lam(history_t[-3])) / h
            delta1 = (history[-2] - history[-3]) / r1
            e1 = delta0 + r0 / (r0 + r1) * (delta0 - delta1)
            e2 = (delta0 - delta1) / (r0 + r1)
            phi_2 = phi_1 / h + 1
            phi_3 = phi_2 / h - 0.5
            x_new = x_new + alpha_t * phi_2 * e1 - alpha_t * phi_3 * e2
        x = x_new
        if k < steps:
            d, p = ref_data_prediction(x, t, anchors, weights)
            history, history_t = (history + [d])[-3:], (history_t + [t])[-3:]
            pdfs.append(p)
    return x, np.stack(pdfs)


def normalise(pdfs):
    return pdfs / pdfs.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------ fixtures


def problem(seed, scale, num_anchors=32, dim=12):
    rng = np.random.default_rng(seed)
    anchors = scale * rng.standard_normal((num_anchors, dim))
    prior = rng.standard_normal((num_anchors, dim))
    return anchors, prior


def rel_err(ours, ref):
    ours = np.asarray(ours, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


SCALES = [1.0, 5.0]


# ------------------------------------------------------------------------------------------------ float64


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("t", [1e-4, 1e-3, 0.05, 0.5, 0.999, 1.0])
def test_velocity_and_posterior_float64(x64, scale, t):
    anchors, prior = problem(0, scale)
    rng = np.random.default_rng(1)
    # Points on the interpolation paths, as the solver meets them, plus a few arbitrary ones.
    x = (1 - t) * anchors[rng.integers(0, 32, 20)] + t * rng.standard_normal((20, 12))
    x = np.concatenate([x, scale * rng.standard_normal((4, 12))])
    weights = rng.uniform(0.1, 2.0, size=32)
    v_ref, p_ref = ref_velocity(x, t, anchors, weights)
    v = zoning.latent_velocity(jnp.asarray(x), t, jnp.asarray(anchors), log_weights=jnp.log(weights))
    log_probs = zoning.posterior_log_probs(jnp.asarray(x), t, jnp.asarray(anchors), log_weights=jnp.log(weights))
    assert v.dtype == jnp.float64
    assert rel_err(v, v_ref) < 1e-9
    np.testing.assert_allclose(np.exp(log_probs), normalise(p_ref), rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale", SCALES)
def test_euler_forward_float64(x64, scale):
    anchors, prior = problem(2, scale)
    ref = ref_euler_forward(anchors, prior, anchors, steps=20)
    ours = zoning.compute_latents(jnp.asarray(anchors), jnp.asarray(prior), solver="euler", num_steps=20)
    assert rel_err(ours, ref) < 1e-10


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("order,steps", [(3, 20), (2, 7), (1, 5), (3, 6)])
def test_dpm_solver_forward_float64(x64, scale, order, steps):
    anchors, prior = problem(3, scale)
    start = 1e-3 * prior + (1 - 1e-3) * anchors
    ref, _ = ref_dpm_solver(start, anchors, steps, 1e-3, 1 - 1e-3, order=order)
    options = zoning.SolverOptions(solver="dpm_solver++", num_steps=steps, order=order)
    ours = zoning.compute_latents(jnp.asarray(anchors), jnp.asarray(prior), options=options)
    assert rel_err(ours, ref) < 1e-10


def test_compute_latents_with_separate_context_float64(x64):
    anchors, prior = problem(4, 2.0)
    own = anchors[:10] + 0.01
    ref = ref_euler_forward(own, prior[:10], anchors, steps=15)
    ours = zoning.compute_latents(
        jnp.asarray(own), jnp.asarray(prior[:10]), context=jnp.asarray(anchors), solver="euler", num_steps=15
    )
    assert rel_err(ours, ref) < 1e-10


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("weighted", [False, True])
def test_euler_reverse_float64(x64, scale, weighted):
    anchors, prior = problem(5, scale)
    weights = np.random.default_rng(0).uniform(0.2, 3.0, 32) if weighted else None
    z = ref_euler_forward(anchors, prior, anchors, steps=20)
    ref_end, ref_pdfs = ref_euler_reverse(z, anchors, steps=50, weights=weights)
    end, log_probs = zoning.assign(
        jnp.asarray(z), jnp.asarray(anchors), num_steps=50,
        log_weights=None if weights is None else jnp.log(weights),
    )
    assert log_probs.shape == (50, 32, 32)
    assert rel_err(end, ref_end) < 1e-10
    np.testing.assert_allclose(np.exp(log_probs), normalise(ref_pdfs), rtol=0, atol=1e-9)


@pytest.mark.parametrize("scale", SCALES)
def test_dpm_solver_reverse_float64(x64, scale):
    anchors, prior = problem(6, scale)
    z = prior
    ref_end, ref_pdfs = ref_dpm_solver(z, anchors, 20, 1 - 1e-3, 1e-3)
    end, log_probs = zoning.assign(jnp.asarray(z), jnp.asarray(anchors), solver="dpm_solver++", num_steps=20)
    assert log_probs.shape == (20, 32, 32)
    assert rel_err(end, ref_end) < 1e-10
    np.testing.assert_allclose(np.exp(log_probs), normalise(ref_pdfs), rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------ float32
# Float32 accuracy is tested against the reference's own float32 formulation in test_float32_numerics.py.


def test_bfloat16_inputs_are_solved_in_float32():
    anchors, prior = problem(20, 1.0)
    latents = zoning.compute_latents(jnp.asarray(anchors, jnp.bfloat16), jnp.asarray(prior, jnp.bfloat16))
    assert latents.dtype == jnp.float32
