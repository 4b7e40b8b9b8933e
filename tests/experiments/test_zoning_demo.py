"""The digits zoning demo (latent zoning of real digits, sharded over the 8 fake devices) and its CLI."""

import os
import pathlib
import subprocess
import sys

import jax

from lzn_jax.experiments import zoning_demo

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_config(variant="smoke"):
    sys.path.insert(0, str(REPO))
    try:
        from configs import digits_zoning_demo
    finally:
        sys.path.pop(0)
    return digits_zoning_demo.get_config(variant)


def test_demo_latents_are_gaussian_and_zones_are_recovered():
    assert jax.device_count() == 8
    metrics = zoning_demo.run(load_config())
    assert metrics["batch_size"] == 256
    # Forward then reverse flow must send almost every latent back to its own digit's anchor; a solver that lost
    # the zones (or a sharding that mixed rows up) gives about 1/256.
    assert metrics["zone_accuracy"] > 0.95
    # 256 x 32 standard normal draws: mean within ~4 standard errors of 0, std within a few percent of 1.
    assert abs(metrics["latent_mean"]) < 0.03
    assert 0.95 < metrics["latent_std"] < 1.05


def test_main_cli_runs_and_rejects_unknown_config_keys():
    # The in-process test above checks the numbers; this one checks that the command parses, runs and reports,
    # on a tiny batch, from a directory other than the repository.
    command = [sys.executable, "-m", "lzn_jax.main", f"--config={REPO / 'configs' / 'digits_zoning_demo.py'}",
               "--config.data.batch_size=64", "--config.reverse_num_steps=10"]
    done = subprocess.run(command, cwd=REPO.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "zone_accuracy" in done.stdout
    bad = subprocess.run(command + ["--config.no_such_key=1"], cwd=REPO.parent, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode != 0 and "no_such_key" in bad.stderr
