"""``python -m lzn_jax.main`` preempted by SIGTERM: it saves, exits 0, and the same command resumes and finishes."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import textwrap

import pytest

from tests import background
from tests.train import helpers
from tests.train.conftest import REPO, DriverRuns, compile_cache_dir, driver_out, subprocess_env

TIMEOUT_S = 600
SIGTERM_AFTER_STEP = 2

# A config file for main: tiny.joint(); with TINY_SIGTERM_AFTER_STEP set, the process sends itself SIGTERM right after
# that step's save call, i.e. between two steps, as a scheduler's preemption notice would arrive.
CONFIG_FILE = """
import os, signal

from tests.train import tiny


def get_config(arg=""):
    after = os.environ.get("TINY_SIGTERM_AFTER_STEP")
    if after:
        from lzn_jax import checkpoint

        original = checkpoint.Checkpointer.save

        def save(self, step, state, **kwargs):
            started = original(self, step, state, **kwargs)
            if step == int(after):
                os.kill(os.getpid(), signal.SIGTERM)
            return started

        checkpoint.Checkpointer.save = save
    return tiny.joint()
"""


def run_main(config_file, workdir, cache_dir, **env):
    return background.run([sys.executable, "-m", "lzn_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
                          env=subprocess_env(cache_dir, **env), cwd=REPO, timeout=TIMEOUT_S)


def preempt_and_resume(directory: pathlib.Path) -> dict:
    """The background job (tests/background.py): main preempted by SIGTERM, then the same command again. It waits for
    the driver's reference run first, whose compiled step the two runs then read from the shared cache. The
    workdir as the first run left it is copied aside for the test to inspect."""
    DriverRuns(driver_out()).wait_for_reference()
    config_file = directory / "tiny_main_config.py"
    config_file.write_text(textwrap.dedent(CONFIG_FILE))
    workdir, preempted = directory / "workdir", directory / "workdir_after_the_preemption"
    first = run_main(config_file, workdir, compile_cache_dir(), TINY_SIGTERM_AFTER_STEP=str(SIGTERM_AFTER_STEP))
    if first.returncode != 0:
        return {"first": first}
    shutil.copytree(workdir, preempted)
    return {"first": first, "preempted": preempted, "second": run_main(config_file, workdir, compile_cache_dir()),
            "workdir": workdir}


JOB = "train_main_preempted"
background.register(JOB, ("preempted_main",), preempt_and_resume, priority=3)


@pytest.fixture(scope="session")
def preempted_main() -> dict:
    return background.wait(JOB)


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_the_same_command_resumes(preempted_main, driver_reference):
    first = preempted_main["first"]
    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-4000:]
    # Noticed at the next step boundary: that step's checkpoint is written and the run stops there.
    stopped = SIGTERM_AFTER_STEP + 1
    assert f"preemption at step {stopped}: checkpoint written, exiting" in output, output[-4000:]
    preempted = preempted_main["preempted"]
    assert helpers.checkpoint_steps(preempted) == [stopped]
    summary = json.loads((preempted / "summary.json").read_text())
    assert (summary["step"], summary["finished"], summary["stopped_early"]) == (stopped, False, True)
    state, data_state = helpers.restore(preempted)
    assert int(state.step) == stopped and data_state["step"] == stopped

    second, workdir = preempted_main["second"], preempted_main["workdir"]
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert f"state from workdir checkpoint at step {stopped}; steps {stopped} -> 6" in output, output[-4000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["step"], summary["finished"], summary["stopped_early"]) == (6, True, False)
    assert helpers.checkpoint_steps(workdir) == [stopped, 6]
    # The same computation as the driver's uninterrupted run of tiny.joint(), bit for bit.
    helpers.assert_bitwise_equal(helpers.restore(workdir)[0], helpers.restore(driver_reference.out / "B")[0],
                                 "main, preempted and resumed, vs 6 uninterrupted steps")
