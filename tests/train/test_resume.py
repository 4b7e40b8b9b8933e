"""Resuming ``loop.train``: after a stop, after a SIGKILL in the middle of an asynchronous save, and after a streak of
non-finite updates. The runs are driver.py's (one background process, tiny.joint(), 6 steps); here they are compared.

Every step's data and randomness are pure functions of the step (the pipeline's order, ``fold_in(rng, step)``), and
the runs share one compiled step, so on CPU a resumed run must be *bitwise* the uninterrupted one.
"""

from __future__ import annotations

import math

import pytest

from tests.train import driver, helpers

pytestmark = pytest.mark.slow


def test_stop_and_resume_is_bitwise_an_uninterrupted_run(driver_runs):
    out = driver_runs.out
    first, second, reference = (driver_runs.summary(name) for name in ("A1", "A2", "B"))
    assert (first["step"], first["finished"], first["stopped_early"]) == (3, False, True)
    assert (second["step"], second["finished"]) == (6, True)
    assert reference["step"] == 6 and reference["finished"]
    # A saved only when it stopped (every_steps is 1000): step 3 by the first call, step 6 by the resumed one.
    assert helpers.checkpoint_steps(out / "A") == [3, 6]

    resumed, resumed_data = helpers.restore(out / "A")
    uninterrupted, uninterrupted_data = helpers.restore(out / "B")
    assert int(resumed.step) == 6
    # params, opt_state, ema_params, ema_counts, step, rng, skip counters: every leaf, every bit.
    helpers.assert_bitwise_equal(resumed, uninterrupted, "state after 3 + 3 steps vs 6 steps")
    assert resumed_data == uninterrupted_data

    # The logged values of the resumed steps (and of the first three) are the uninterrupted run's, bit for bit.
    resumed_metrics, reference_metrics = helpers.train_metrics(out / "A"), helpers.train_metrics(out / "B")
    assert sorted(resumed_metrics) == sorted(reference_metrics) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed_metrics[step] == reference_metrics[step], step
    assert all(math.isfinite(v) for m in reference_metrics.values() for v in m.values())


def test_resume_after_sigkill_in_an_async_save_is_bitwise_an_uninterrupted_run(driver_runs):
    out, kill = driver_runs.out, driver_runs.results["kill"]
    assert kill["returncode"] == -9, kill["output"]
    assert f"killing myself right after the save of step {driver.KILL_STEP} returned (True)" in kill["output"]
    names = kill["checkpoints"]
    previous, killed = str(driver.KILL_STEP - 1), str(driver.KILL_STEP)
    # The previous save is complete (async saves wait for the one before); the killed one is complete or a temporary
    # directory, depending on how far its background write got.
    assert previous in names, names
    assert killed in names or any(name.startswith(killed + ".orbax-checkpoint-tmp") for name in names), names

    summary = driver_runs.summary("K")
    assert summary["step"] == 6 and summary["finished"]
    assert not [p for p in (out / "K" / "checkpoints").iterdir() if "tmp" in p.name]  # cleaned up by the resume
    resumed, resumed_data = helpers.restore(out / "K")
    uninterrupted, uninterrupted_data = helpers.restore(out / "B")
    helpers.assert_bitwise_equal(resumed, uninterrupted, f"killed after step {driver.KILL_STEP}'s save, resumed")
    assert resumed_data == uninterrupted_data
    # metrics.jsonl kept every line the killed process wrote (steps 1 to KILL_STEP: each is flushed when written),
    # and the resumed run appended the rest: every step is there, with the uninterrupted run's values.
    resumed_metrics, reference_metrics = helpers.train_metrics(out / "K"), helpers.train_metrics(out / "B")
    assert sorted(resumed_metrics) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed_metrics[step] == reference_metrics[step], step


def test_a_streak_of_non_finite_updates_stops_the_run_and_keeps_the_last_checkpoint(driver_runs):
    """N resumes a step-3 checkpoint with one NaN parameter: steps 4, 5, 6 are skipped, and the third skip in a row
    (train.max_consecutive_skips = 3) stops it with TrainingDivergedError. Checkpoints are due at every step, yet none
    is written inside the streak: nothing in the checkpoint directory changes, and the step-3 checkpoint still
    restores."""
    out, run = driver_runs.out, driver_runs.results["N"]
    assert run.get("error") == "TrainingDivergedError", run
    assert "3 consecutive updates skipped" in run["message"] and "(steps 4-6)" in run["message"], run["message"]
    assert driver_runs.results["N_after"] == driver_runs.results["N_before"]
    assert helpers.checkpoint_steps(out / "N") == [3]

    state, data_state = helpers.restore(out / "N")
    before, before_data = helpers.restore(out / "A_after_3")
    assert int(state.step) == 3 and data_state == before_data == {**before_data, "step": 3}
    poisoned = helpers.leaves(state.params)
    clean = helpers.leaves(before.params)
    assert [path for path in poisoned if poisoned[path].tobytes() != clean[path].tobytes()] == [
        "['encoder']['conv_in']['kernel']"]

    # The skipped steps were logged before the run stopped: skipped, with a non-finite loss, counted.
    metrics = helpers.train_metrics(out / "N")
    for step, total in ((4, 1), (5, 2)):
        assert metrics[step]["train/skipped"] == 1.0 and not math.isfinite(metrics[step]["train/loss"])
        assert metrics[step]["train/skipped_total"] == total
    assert 6 not in metrics
