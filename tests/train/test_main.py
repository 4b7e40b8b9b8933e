"""``python -m lzn_jax.main`` preempted by SIGTERM: it saves, exits 0, and the same command resumes and finishes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.train import helpers
from tests.train.conftest import REPO, subprocess_env

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
    return subprocess.run(
        [sys.executable, "-m", "lzn_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
        env=subprocess_env(cache_dir, **env), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
        check=False)


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_the_same_command_resumes(tmp_path, compile_cache, driver_reference):
    config_file = tmp_path / "tiny_main_config.py"
    config_file.write_text(textwrap.dedent(CONFIG_FILE))
    workdir = tmp_path / "workdir"

    first = run_main(config_file, workdir, compile_cache, TINY_SIGTERM_AFTER_STEP=str(SIGTERM_AFTER_STEP))
    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-4000:]
    # Noticed at the next step boundary: that step's checkpoint is written and the run stops there.
    stopped = SIGTERM_AFTER_STEP + 1
    assert f"preemption at step {stopped}: checkpoint written, exiting" in output, output[-4000:]
    assert helpers.checkpoint_steps(workdir) == [stopped]
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["step"], summary["finished"], summary["stopped_early"]) == (stopped, False, True)
    state, data_state = helpers.restore(workdir)
    assert int(state.step) == stopped and data_state["step"] == stopped

    second = run_main(config_file, workdir, compile_cache)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert f"state from workdir checkpoint at step {stopped}; steps {stopped} -> 6" in output, output[-4000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["step"], summary["finished"], summary["stopped_early"]) == (6, True, False)
    assert helpers.checkpoint_steps(workdir) == [stopped, 6]
    # The same computation as the driver's uninterrupted run of tiny.joint(), bit for bit.
    helpers.assert_bitwise_equal(helpers.restore(workdir)[0], helpers.restore(driver_reference.out / "B")[0],
                                 "main, preempted and resumed, vs 6 uninterrupted steps")
