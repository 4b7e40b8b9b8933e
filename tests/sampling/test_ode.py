"""Euler and Dormand-Prince on velocity fields with closed-form flows: exact solutions, inversion, NFE, and what the
two error norms make a sample depend on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import sampling
from lzn_jax.sampling import DOPRI5, EULER, SamplerOptions
from tests.sampling import fields
from tests.sampling.fields import solve

EPS = 1e-3
PER_SAMPLE = DOPRI5.replace(error_norm="per_sample")


def test_euler_is_the_euler_recursion_forward_and_backward():
    x, m, s = fields.problem()
    for t0, t1, direction in ((EPS, 1.0, "sample"), (1.0, EPS, "invert")):
        solution = solve(x, (m, s), options=EULER, direction=direction)
        expected = fields.gaussian_rf_euler(x, m, s, t0, t1, 10)
        np.testing.assert_allclose(solution.x, expected, rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(solution.nfe, np.full(len(x), 10))


def test_euler_converges_to_the_flow_at_first_order():
    x, m, s = fields.problem()
    exact = fields.gaussian_rf_flow(x, m, s, EPS, 1.0)
    errors = [np.abs(solve(x, (m, s), options=EULER.replace(num_steps=n)).x - exact).max() for n in (100, 400)]
    assert 3.0 < errors[0] / errors[1] < 5.0, errors  # 4x the steps, a quarter of the error


@pytest.mark.parametrize("options", [DOPRI5, PER_SAMPLE], ids=["batch", "per_sample"])
def test_dopri5_follows_the_time_dependent_flow_both_ways_and_inverts(options):
    images, m, s = fields.problem()
    # Tolerances bound each step's error; the global error of rtol = atol = 1e-5 stays below 1e-3 here (10 Euler
    # steps are 0.2 off).
    noise = solve(images, (m, s), options=options, direction="invert")
    np.testing.assert_allclose(noise.x, fields.gaussian_rf_flow(images, m, s, 1.0, EPS), atol=1e-3)
    assert np.abs(noise.x - images).max() > 0.5  # the inversion went somewhere
    again = solve(noise.x, (m, s), options=options)
    np.testing.assert_allclose(again.x, fields.gaussian_rf_flow(noise.x, m, s, EPS, 1.0), atol=1e-3)
    np.testing.assert_allclose(again.x, images, atol=1e-3)


def test_dopri5_converges_to_the_matrix_exponential(x64):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)))
    solution = solve(x, None, options=DOPRI5.replace(rtol=1e-10, atol=1e-10), velocity=fields.linear)
    np.testing.assert_allclose(solution.x, fields.linear_flow(x, EPS, 1.0), rtol=0, atol=1e-8)


def test_euler_round_trip_error_shrinks_at_first_order():
    images, m, s = fields.problem(seed=2)
    errors = []
    for n in (100, 400):
        options = EULER.replace(num_steps=n)
        noise = solve(images, (m, s), options=options, direction="invert").x
        errors.append(np.abs(solve(noise, (m, s), options=options).x - images).max())
    assert 3.0 < errors[0] / errors[1] < 5.0, errors


def test_remove_image_part_is_the_reference_rk45_form():
    images, m, s = fields.problem(seed=3)
    state = sampling.invert(fields.gaussian_rf, images, (m, s), options=EULER)
    removed = sampling.invert(fields.gaussian_rf, images, (m, s), options=EULER, remove_image_part=True)
    np.testing.assert_allclose(removed.x, (np.asarray(state.x) - EPS * np.asarray(images)) / (1 - EPS), rtol=1e-6)
    np.testing.assert_array_equal(removed.nfe, state.nfe)


def count_evaluations(velocity):
    """The field, plus a host counter of its evaluations (one per call of the batch field at run time)."""
    counter = {"calls": 0}

    def counted(x, t, conditioning):
        jax.debug.callback(lambda: counter.__setitem__("calls", counter["calls"] + 1))
        return velocity(x, t, conditioning)

    return counted, counter


@pytest.mark.parametrize("options,direction", [(EULER.replace(num_steps=7), "sample"),
                                               (EULER.replace(num_steps=7), "invert"), (DOPRI5, "sample")])
def test_reported_nfe_is_the_number_of_evaluations(options, direction):
    x, m, s = fields.problem(seed=4)
    counted, counter = count_evaluations(fields.gaussian_rf)
    solution = jax.block_until_ready(solve(x, (m, s), options=options, velocity=counted, direction=direction))
    jax.effects_barrier()
    np.testing.assert_array_equal(solution.nfe, np.full(len(x), counter["calls"]))
    if options.sampler == "euler":
        assert counter["calls"] == 7
    else:
        assert counter["calls"] > 13 and (counter["calls"] - 1) % 6 == 0  # a first stage, then 6 per step


def test_per_sample_rows_are_their_own_solves():
    x, m, s = fields.problem()
    together = solve(x, (m, s), options=PER_SAMPLE)
    for row in range(len(x)):
        alone = solve(x[row:row + 1], (m[row:row + 1], s[row:row + 1]), options=DOPRI5)
        np.testing.assert_allclose(together.x[row], alone.x[0], rtol=1e-6, atol=1e-6)
        assert together.nfe[row] == alone.nfe[0]
    assert together.nfe[1] > 2 * together.nfe[0]  # the stiff row did not make the smooth one take its steps


def test_batch_norm_shares_one_step_sequence_over_the_batch():
    x, m, s = fields.problem()
    together = solve(x, (m, s), options=DOPRI5)
    alone = solve(x[:1], (m[:1], s[:1]), options=DOPRI5)
    assert len(set(np.asarray(together.nfe).tolist())) == 1
    assert together.nfe[0] > 2 * alone.nfe[0]
    assert not np.array_equal(together.x[0], alone.x[0])  # the stiff batch-mate changed row 0's steps


def test_a_solve_that_runs_out_of_steps_comes_back_nan():
    x, m, s = fields.problem()
    unbounded = solve(x, (m, s), options=PER_SAMPLE)
    max_steps = (int(unbounded.nfe[0]) - 1) // 6  # exactly what the smooth row needs
    bounded = solve(x, (m, s), options=PER_SAMPLE.replace(max_steps=max_steps))
    finished = np.asarray(unbounded.nfe) <= 1 + 6 * max_steps
    assert finished.any() and not finished.all()
    np.testing.assert_array_equal(np.isfinite(bounded.x).all(axis=1), finished)
    np.testing.assert_array_equal(bounded.x[finished], unbounded.x[finished])
    assert np.isnan(bounded.x[~finished]).all()


@pytest.mark.parametrize("changes,message", [
    (dict(sampler="rk45"), "sampler"), (dict(num_steps=0), "num_steps"), (dict(time_eps=1.0), "time_eps"),
    (dict(rtol=0.0), "rtol"), (dict(error_norm="sample"), "error_norm"), (dict(max_steps=2.5), "max_steps"),
    (dict(first_step=0.0), "first_step"),
])
def test_bad_options_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        SamplerOptions(**changes)
