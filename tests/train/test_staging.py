"""The step's update rules on the real models: a NaN batch skips the whole update, a module whose stage is over stays
bit-identical (params, Adam moments and count, EMA and its count) and out of the gradient norm, and the Fourier
frequencies never move.

In process: tiny.uncond() (encoder + unconditional decoder with Fourier time features; the decoder trains for 1 step,
the encoder for 3), one compiled step per device count (programs.py). Also on the driver's tiny.joint() run B, whose
decoder trains for 2 of 6 steps: one checkpoint per step.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from tests.train import helpers
from tests.train.programs import program

pytestmark = pytest.mark.slow


def module_view(state, module: str) -> dict:
    """Everything of ``state`` that belongs to ``module``."""
    return {"params": state.params[module], "adam": state.opt_state.inner_states[module],
            "ema": state.ema_params[module], "ema_count": state.ema_counts[module]}


def test_a_nan_batch_skips_the_whole_update_on_every_device():
    """One NaN row on one of 8 devices: the global loss is NaN, so nothing moves anywhere, only the step and the skip
    counters; the next good step trains again and ends the streak."""
    uncond = program("uncond", 8)
    states, _ = uncond.trajectory(1)
    before = states[1]  # after one good step (encoder enabled, decoder frozen from now on)
    poisoned = uncond.batch(1)
    poisoned["poison"] = jax.device_put(np.eye(8, dtype=np.float32)[5], uncond.batch_sharding)  # row 5 only
    skipped, metrics = uncond.step(before, poisoned)
    assert metrics["train/skipped"] == 1.0 and np.isnan(metrics["train/loss"])
    for name in ("params", "opt_state", "ema_params", "ema_counts", "rng"):
        helpers.assert_bitwise_equal(getattr(skipped, name), getattr(before, name), f"{name} after a NaN batch")
    assert (int(skipped.step), int(skipped.skipped_updates), int(skipped.consecutive_skips)) == (2, 1, 1)

    again, metrics = uncond.step(skipped, uncond.batch(2))
    assert metrics["train/skipped"] == 0.0 and np.isfinite(metrics["train/loss"])
    assert (int(again.step), int(again.skipped_updates), int(again.consecutive_skips)) == (3, 1, 0)
    helpers.assert_trained(again.params["encoder"], skipped.params["encoder"], "encoder after the good step")
    assert int(again.ema_counts["encoder"]) == 2  # one EMA update per successful step: steps 1 and 3


def test_a_frozen_module_stays_bit_identical_and_out_of_the_gradient_norm():
    uncond = program("uncond", 1)
    states, metrics = uncond.trajectory(3)
    for index in (2, 3):
        helpers.assert_bitwise_equal(module_view(states[index], "decoder"), module_view(states[1], "decoder"),
                                     f"decoder after step {index}")
        helpers.assert_trained(states[index].params["encoder"], states[index - 1].params["encoder"],
                               f"encoder params at step {index}")
        helpers.assert_trained(states[index].ema_params["encoder"], states[index - 1].ema_params["encoder"],
                               f"encoder EMA at step {index}")
    assert [int(s.ema_counts["decoder"]) for s in states] == [0, 1, 1, 1]
    assert [int(s.ema_counts["encoder"]) for s in states] == [0, 1, 2, 3]
    assert [m["train/enabled_decoder"] for m in metrics] == [1.0, 0.0, 0.0]

    # The norm the step clips with and logs is that of the enabled modules' gradients only, by hand.
    for index in (0, 1):
        grads = jax.device_get(uncond.gradients(states[index], uncond.batch(index)))
        encoder = float(optax.tree.norm(grads["encoder"]))
        everything = float(optax.tree.norm(grads))
        expected = everything if index == 0 else encoder
        np.testing.assert_allclose(metrics[index]["train/grad_norm"], expected, rtol=1e-5, err_msg=f"step {index}")
        assert everything > 1.01 * encoder  # the decoder's gradients are not negligible: leaving them out shows


def test_fourier_frequencies_never_move_and_are_their_own_ema():
    uncond = program("uncond", 1)
    states, _ = uncond.trajectory(3)
    leaves = [helpers.leaves(s.params["decoder"]) for s in states]
    frequencies = [path for path in leaves[0] if path.endswith("['frequencies']")]
    assert len(frequencies) == 1, frequencies
    path = frequencies[0]
    assert np.any(leaves[0][path] != 0)
    # Step 1 trained the decoder, yet the frequencies did not move.
    helpers.assert_trained(states[1].params["decoder"], states[0].params["decoder"], "decoder at step 1")
    for index, state in enumerate(states):
        np.testing.assert_array_equal(leaves[index][path], leaves[0][path])
        np.testing.assert_array_equal(helpers.leaves(state.ema_params["decoder"])[path], leaves[0][path])


def test_joint_run_freezes_the_decoder_after_its_stage(driver_runs):
    """Run B (tiny.joint(): decoder stage 2 steps, encoder and label anchors 6), one checkpoint per step."""
    workdir = driver_runs.out / "B"
    assert helpers.checkpoint_steps(workdir) == [1, 2, 3, 4, 5, 6]
    states = {step: helpers.restore(workdir, step)[0] for step in (2, 3, 6)}
    metrics = helpers.train_metrics(workdir)
    for step, previous in ((3, 2), (6, 3)):
        helpers.assert_bitwise_equal(module_view(states[step], "decoder"), module_view(states[2], "decoder"),
                                     f"decoder at step {step}")
        for module in ("encoder", "label_anchors"):
            helpers.assert_trained(states[step].params[module], states[previous].params[module],
                                   f"{module} from step {previous} to {step}")
        assert {m: int(c) for m, c in states[step].ema_counts.items()} == {
            "encoder": step, "decoder": 2, "label_anchors": step}
    assert [metrics[step]["train/enabled_decoder"] for step in range(1, 7)] == [1, 1, 0, 0, 0, 0]

    # Adam's first moment gives back the clipped gradients of step 3: g = (mu_3 - b1 mu_2) / (1 - b1). Clipping by the
    # logged norm n scaled them to a norm of n * min(1, 1 / (n + 1e-6)) if the norm was taken over the enabled encoder
    # and label anchors only, which is all the update holds (the frozen decoder's gradients are not small).
    squares = 0.0
    for module in ("encoder", "label_anchors"):
        new = helpers.leaves(states[3].opt_state.inner_states[module].inner_state[0].mu)
        old = helpers.leaves(states[2].opt_state.inner_states[module].inner_state[0].mu)
        squares += sum(float(np.sum(((new[k].astype(np.float64) - 0.9 * old[k].astype(np.float64)) / 0.1) ** 2))
                       for k in new)
    norm = metrics[3]["train/grad_norm"]
    np.testing.assert_allclose(np.sqrt(squares), norm * min(1.0, 1.0 / (norm + 1e-6)), rtol=1e-3)
