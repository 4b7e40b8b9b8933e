"""Case study 2 in miniature: LZN representation learning (two views, no decoder) on the scikit-learn digits.

  python -m lzn_jax.main --config=configs/digits_repr.py --workdir=/path/to/workdir
  python -m lzn_jax.main --config=configs/digits_repr.py:smoke --workdir=/tmp/lzn_smoke    # tiny wiring check

No paper number: a small stand-in for configs/imagenet_repr.py (1,438 training digits) meant for a CPU or one small
GPU, with an NCSN++ encoder instead of the ResNet-50 (its 16-d anchors are the probed features).

Measured (2026-11-29, 2 CPU cores, empty compilation cache): 800 steps at batch 128 in 26 min 47 s wall while
other jobs kept the load at 5-7 (0.3-0.9 steps/s); in a run of the same step at a load of about 2 the step took
2.1-2.3 steps/s, so about 6 minutes of steps plus 2-3 minutes of compiling and probing on idle cores (not measured
idle). At the end: assignment accuracy 0.36 (from 0.01 at the start; batch 128), k-NN accuracy 93.9 % and ridge
probe 92.2 % on the 359 test digits, against 91.1 % and 87.2 % for the untrained encoder (random convolutional
features already separate digits well). 1,000 steps reached 95.8 % and 93.0 %.
"""

import ml_collections

from configs import common, digits_gen

VARIANTS = ("smoke",)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = common.parse_variants(arg, VARIANTS)
    config = common.base_config()
    config.objective = "contrastive"
    config.latent_dim = 16

    # Two views of 16x16; two_view repeats the gray channel, so the encoder sees 3 channels. Digit-sized
    # augmentation: crops keep at least 30% of the area, a 3-tap blur, no mirroring.
    config.data.name = "digits"
    config.data.split = "train"
    config.data.image_size = 16
    config.data.num_channels = 1
    config.data.augmentation = "two_view"
    config.data.flip_probability = 0.0
    config.data.two_view.crop_scale = (0.3, 1.0)
    config.data.two_view.blur_kernel_size = 3
    config.data.batch_size = 128

    config.model.encoder = digits_gen.digits_encoder(config.latent_dim)

    config.optim.learning_rate = common.per_module(encoder=1e-3)
    config.optim.num_iterations.encoder = 800
    config.optim.warmup_steps = 100
    config.optim.warmup_init_factor = 1.0 / 100
    config.ema.decay = common.per_module(encoder=0.999)

    # The paper's contrastive flows (base_config's defaults, written out): forward Euler from t = 1e-4 with the
    # prior scaled by 0.45, reverse Euler alignment of 20 steps, -log max p over steps 4..19.
    config.contrastive.latent_solver = common.solver_block("euler", 20, eps=1e-4)
    config.contrastive.prior_scale = 0.45
    config.contrastive.alignment_solver = common.solver_block("euler", 20)
    config.contrastive.cut_off = 0.2

    config.checkpoint.every_steps = 200
    config.train.log_every_steps = 25
    config.train.sample_every_steps = 200  # the assignment curve
    config.train.num_sample_images = 100
    config.train.end_probes = True  # k-NN and ridge accuracy on the 359 test digits at the end
    config.eval.linear_probe_epochs = 1000  # --mode=eval: a linear probe on the 16-d anchors (6 steps per epoch)
    config.eval.linear_probe_batch_size = 256

    if "smoke" in variants:
        common.apply_smoke(config)
    return config
