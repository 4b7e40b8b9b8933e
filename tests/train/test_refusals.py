"""What ``loop.train`` refuses before it writes anything: a workdir whose checkpoint another model wrote, and a global
batch that does not divide over the devices. Neither compiles a step."""

from __future__ import annotations

import shutil

import pytest

from lzn_jax.checkpoint import IncompatibleCheckpointError
from lzn_jax.train import loop
from tests.train import helpers, tiny


def joint_with(latent_dim: int | None = None, nf: int | None = None):
    config = tiny.joint()
    config.num_devices = 1
    if latent_dim is not None:
        config.latent_dim = latent_dim
        for module in ("encoder", "decoder", "label_anchors"):
            config.model[module].latent_dim = latent_dim
    if nf is not None:
        config.model.decoder.nf = nf
    return config


@pytest.mark.slow
@pytest.mark.parametrize("change, expected", [
    ({"latent_dim": 6}, ["params/label_anchors/anchors: saved float32[10,4], expected float32[10,6]",
                         "ema_params/label_anchors/anchors"]),
    ({"nf": 16}, ["params/decoder/conv_in/kernel: saved float32[3,3,1,8], expected float32[3,3,1,16]"]),
])
def test_an_incompatible_workdir_is_refused_untouched(driver_runs, tmp_path, change, expected):
    """The driver's workdir A (6 steps of tiny.joint()) resumed with another latent_dim or width."""
    workdir = tmp_path / "A"
    shutil.copytree(driver_runs.out / "A", workdir)
    before = helpers.file_hashes(workdir)
    with pytest.raises(IncompatibleCheckpointError) as error:
        loop.train(joint_with(**change), workdir)
    message = str(error.value)
    assert "does not fit the train state of this run" in message
    for text in expected:
        assert text in message, message
    assert helpers.file_hashes(workdir) == before


def test_a_batch_that_does_not_divide_over_the_devices_is_refused(tmp_path):
    config = tiny.joint()
    config.data.batch_size = 12
    config.num_devices = 8
    with pytest.raises(ValueError, match=r"data.batch_size=12 .* the 8 devices") as error:
        loop.train(config, tmp_path / "workdir")
    assert "multiple of 8" in str(error.value)
    assert not (tmp_path / "workdir").exists()


def test_encoder_chunks_that_do_not_divide_a_devices_rows_are_refused(tmp_path):
    config = tiny.contrastive()
    config.data.batch_size = 16  # 2 images, 4 view rows, per device
    config.num_devices = 8
    config.contrastive.encoder_chunks = 3
    with pytest.raises(ValueError, match=r"encoder_chunks=3 does not divide the 4 encoder rows each of the 8 "):
        loop.train(config, tmp_path / "workdir")
    assert not (tmp_path / "workdir").exists()
