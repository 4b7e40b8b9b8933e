"""Tiny training configs for the trainer tests: the wiring of the digits settings at sizes where a train step compiles
in seconds. Also a config file for ``lzn_jax.main``: ``--config=tests/train/tiny.py:joint`` (or ``uncond``,
``contrastive``).

Compile time is what these tests pay for, and it grows with the number of layers (and parameter leaves, which the
optimiser touches one by one), not with their width; so the modules have few layers, and each config is compiled once
per process and device count and reused by every check that can share it (tests/train/programs.py, driver.py).

* ``joint``: case study 3 (encoder, class-conditional decoder, label anchors) on 8x8 digits, NCSN++ with two levels
  and one residual block, latent_dim 4, batch 8, 5 DPM-Solver++ latent steps and 10 Euler label steps. Staged: the
  decoder trains for the first 2 of 6 steps.
* ``uncond``: case study 1 (encoder, unconditional decoder with Fourier time features) with one NCSN++ level.
  Staged: the decoder trains for 1 step of 3.
* ``contrastive``: case study 2 with an NCSN++ encoder (two levels) on two 16x16 views, 5-step flows, 2 steps.
"""

from __future__ import annotations

import ml_collections

from configs import common, digits_joint, digits_repr

KINDS = ("joint", "uncond", "contrastive")

# NCSN++ trunk of every tiny model: one residual block per level, attention only in the middle block, dropout on.
_TRUNK = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.1)
_HEADS = dict(num_base_channels=2, num_base_units=8, latent_transformation_resolutions=None)


def _small_run(config: ml_collections.ConfigDict) -> None:
    """What every tiny config shares besides the models: batch 8 on 1 device, a short warm-up, a log line per step,
    no pictures, a checkpoint when stopped (and every 1000 steps)."""
    config.data.batch_size = 8
    config.data.num_workers = 0
    config.data.num_threads = 1
    config.data.prefetch_buffer_size = 16
    config.optim.warmup_steps = 4
    config.optim.warmup_init_factor = 0.25
    config.train.log_every_steps = 1
    config.train.sample_every_steps = 0
    config.train.num_sample_images = 4
    config.train.max_consecutive_skips = 3
    config.train.accuracy_batch_size = 0  # no accuracy pass at the end (another compile)
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 10
    config.checkpoint.async_save = False
    # One device unless a test asks for more: the tests' processes have 8 fake devices (pytest's and the
    # subprocesses', so that those share compiled steps), and a run's mesh is part of what it compiles.
    config.num_devices = 1


def _ncsnpp(block: ml_collections.ConfigDict, latent_dim: int, **changes) -> ml_collections.ConfigDict:
    return common.model_block({**block.to_dict(), **_TRUNK, "latent_dim": latent_dim, **changes})


def joint() -> ml_collections.ConfigDict:
    """Case study 3 in miniature; 6 steps, the decoder's stage ends after step 2."""
    latent_dim = 4
    config = digits_joint.get_config()
    config.latent_dim = latent_dim
    config.data.image_size = 8
    config.model.encoder = _ncsnpp(config.model.encoder, latent_dim, **_HEADS)
    config.model.decoder = _ncsnpp(config.model.decoder, latent_dim)
    config.model.label_anchors = common.model_block({**config.model.label_anchors.to_dict(), "latent_dim": latent_dim})
    config.generation.latent_solver = common.solver_block("dpm_solver++", 5)
    config.generation.label_solver = common.solver_block("euler", 10)
    common.set_generation_iterations(config, encoder=6, decoder=2, label_anchors=6)
    # Pinned here (not inherited from digits_joint.py): the tolerances of tests/train/helpers.py scale with them.
    config.optim.learning_rate = common.per_module(encoder=1e-4, decoder=1e-3, label_anchors=1e-3)
    config.ema.decay = common.per_module(encoder=0.999, decoder=0.999, label_anchors=0.999)
    _small_run(config)
    return config


def uncond() -> ml_collections.ConfigDict:
    """Case study 1 in miniature (Fourier time features, one NCSN++ level); 3 steps, the decoder trains for 1."""
    config = joint()
    config.model.label_anchors = None
    config.model.encoder.ch_mult = (1,)
    config.model.decoder.ch_mult = (1,)
    config.model.decoder.num_classes = 0
    config.model.decoder.embedding_type = "fourier"
    config.optim.learning_rate.label_anchors = 0.0
    config.ema.decay.label_anchors = 0.0
    common.set_generation_iterations(config, encoder=3, decoder=1, label_anchors=0)
    return config


def contrastive() -> ml_collections.ConfigDict:
    """Case study 2 in miniature: two 16x16 views, 5-step Euler flows; 2 steps."""
    latent_dim = 4
    config = digits_repr.get_config()
    config.latent_dim = latent_dim
    config.data.image_size = 16
    config.model.encoder = _ncsnpp(config.model.encoder, latent_dim, **_HEADS)
    config.contrastive.latent_solver = common.solver_block("euler", 5, eps=1e-4)
    config.contrastive.alignment_solver = common.solver_block("euler", 5)
    config.optim.num_iterations.encoder = 2
    config.optim.learning_rate = common.per_module(encoder=1e-3)
    config.ema.decay = common.per_module(encoder=0.999)
    _small_run(config)
    return config


def get_config(arg: str = "joint") -> ml_collections.ConfigDict:
    """The config file entry point: ``tiny.py:joint`` (the default), ``tiny.py:uncond``, ``tiny.py:contrastive``."""
    kind = arg or "joint"
    if kind not in KINDS:
        raise ValueError(f"unknown tiny config {kind!r}; use one of {KINDS}")
    return {"joint": joint, "uncond": uncond, "contrastive": contrastive}[kind]()
