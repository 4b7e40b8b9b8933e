"""8 devices train what 1 device trains: the same batches (the pipeline does not depend on the mesh), the same random
draws, the zoning flows solved against the whole global batch; only the order of float32 reductions differs.

uncond and contrastive: in process, 2 steps of each on meshes of 1 and 8 of the 8 fake devices (programs.py). joint:
2 steps in process on 8 devices against the driver's loop.train run on 1 device (B, a checkpoint per step). The
tolerances, and the measurements behind them, are helpers.assert_same_training's.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.train import helpers
from tests.train.programs import program

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["uncond", "contrastive"])
def test_eight_devices_train_like_one(kind):
    states_one, metrics_one = program(kind, 1).trajectory(2)
    states_eight, metrics_eight = program(kind, 8).trajectory(2)
    assert all(m["train/skipped"] == 0.0 for m in metrics_one + metrics_eight)
    helpers.assert_same_training(states_one[-1], states_eight[-1], metrics_one, metrics_eight, kind)


@pytest.fixture(scope="session")
def joint_on_eight_devices():
    """Computed by the first test below, which runs among the in-process tests, while the driver (a background
    job, tests/background.py) trains the one-device run that the second test compares it with."""
    return program("joint", 8).trajectory(2)


def test_joint_on_eight_devices_takes_every_update(joint_on_eight_devices):
    states, metrics = joint_on_eight_devices
    assert [int(state.step) for state in states] == [0, 1, 2]
    assert all(m["train/skipped"] == 0.0 and np.isfinite(m["train/loss"]) for m in metrics), metrics


def test_eight_devices_train_like_one_joint(joint_on_eight_devices, driver_runs):
    states_eight, metrics_eight = joint_on_eight_devices
    one, _ = helpers.restore(driver_runs.out / "B", step=2)
    metrics_one = helpers.train_metrics(driver_runs.out / "B")
    helpers.assert_same_training(one, states_eight[-1], [metrics_one[1], metrics_one[2]], metrics_eight, "joint")
