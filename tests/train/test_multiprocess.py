"""``python -m lzn_jax.main`` as one process of a two-process JAX job whose peer never comes, and maybe_initialize's
timeout.

The process finds its cluster the way a SLURM job step does (``lzn_jax.parallel.maybe_initialize`` lets JAX read
SLURM_* variables; JAX_COORDINATOR_ADDRESS names the local coordinator), so this is the command a cluster runs. The
two-process training itself runs through launch/local.sh in tests/launch/test_launch.py.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from tests.train.conftest import REPO, subprocess_env

LONE_TIMEOUT_S = 10  # LZN_DISTRIBUTED_TIMEOUT_SECONDS of the process left alone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(process_id: int, port: int, **extra) -> dict[str, str]:
    """One process of a 2-process job on this machine, with one CPU device, as SLURM would describe it."""
    return subprocess_env(None, devices=1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SLURM_JOB_ID="1",
                          SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2", SLURM_PROCID=str(process_id),
                          SLURM_LOCALID="0", **extra)


def main_command(workdir, *overrides) -> list[str]:
    return [sys.executable, "-m", "lzn_jax.main", f"--config={REPO / 'tests' / 'train' / 'tiny.py'}:contrastive",
            f"--workdir={workdir}", *overrides]


def communicate(procs, timeout: float) -> list[str]:
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the processes ran for more than {timeout} s and were killed")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def absl_time(output: str, level: str, text: str) -> float:
    """Seconds of the day of the first absl-formatted line (``W1128 23:56:48.060757 ...``) of ``level`` with ``text``."""
    for line in output.splitlines():
        match = re.match(rf"{level}\d{{4}} (\d\d):(\d\d):(\d\d\.\d+) ", line)
        if match and text in line:
            hours, minutes, seconds = match.groups()
            return 3600 * int(hours) + 60 * int(minutes) + float(seconds)
    raise AssertionError(f"no {level} line with {text!r} in:\n{output[-3000:]}")


# One process that waits for a peer in vain: nothing to keep in step, so it may run beside the background jobs.
@pytest.mark.multiprocess(timing_sensitive=False)
def test_a_process_whose_peer_never_comes_fails_within_the_timeout(tmp_path):
    start = time.monotonic()
    proc = subprocess.Popen(main_command(tmp_path / "workdir"),
                            env=cluster_env(0, free_port(), LZN_DISTRIBUTED_TIMEOUT_SECONDS=str(LONE_TIMEOUT_S)),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = communicate([proc], 240)[0]
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, output[-4000:]
    assert "joining the JAX cluster of coordinator 127.0.0.1:" in output, output[-4000:]
    assert f"waiting up to {LONE_TIMEOUT_S} s for every process" in output, output[-4000:]
    assert "DEADLINE_EXCEEDED" in output and "CoordinationService" in output, output[-4000:]
    # JAX gives up after the configured timeout (measured: about 15 s for 10), not after its default of 300 s.
    waited = (absl_time(output, "F", "DEADLINE_EXCEEDED") - absl_time(output, "W", "joining the JAX cluster")) % 86400
    assert waited < LONE_TIMEOUT_S + 20, f"{waited:.0f} s between joining and giving up"
    assert elapsed < 60, f"{elapsed:.0f} s from start to exit (imports included)"
    assert not (tmp_path / "workdir").exists()  # it never got to train


def test_maybe_initialize_takes_its_timeout_from_the_keyword_or_the_environment(monkeypatch):
    import jax

    from lzn_jax.parallel import distributed

    calls = []

    def no_cluster(**kwargs):
        calls.append(kwargs)
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.maybe_initialize() is False
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7")
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize(initialization_timeout=3) is False
    assert calls == [{}, {"initialization_timeout": 7}, {"initialization_timeout": 3}]

    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="LZN_DISTRIBUTED_TIMEOUT_SECONDS='soon'"):
        distributed.maybe_initialize()

    # A cluster that was described but could not be joined is an error, never a silent single-process run.
    def unreachable(**kwargs):
        raise jax.errors.JaxRuntimeError("DEADLINE_EXCEEDED: Deadline Exceeded")

    monkeypatch.setenv(distributed.TIMEOUT_ENV, "10")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(jax.distributed, "initialize", unreachable)
    with pytest.raises(RuntimeError, match=r"could not join the JAX cluster \(coordinator 127.0.0.1:1, timeout 10 s\)"):
        distributed.maybe_initialize()
