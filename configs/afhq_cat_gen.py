r"""Case study 1, AFHQ-Cat 256x256: Rectified Flow with an LZN latent in its decoder (RF+LZN), unconditional.

  python -m lzn_jax.main --config=configs/afhq_cat_gen.py --workdir=/path/to/workdir \
      --config.data.data_dir=/path/to/afhq
  python -m lzn_jax.main --config=configs/afhq_cat_gen.py:rf --workdir=/path/to/workdir ...  # plain RF baseline
  python -m lzn_jax.main --config=configs/afhq_cat_gen.py:smoke --workdir=/tmp/lzn_smoke ...  # 16x16 wiring check
Variants compose (`:rf,smoke`); `...` stands for the data_dir flag of the first command.
data_dir is the AFHQ root; its train/cat (5,153 images) is read.

Paper (Tab. 1; RK45 sampler, CM FID on 5,120 samples): RF+LZN FID 5.68, Recon 10.29; RF baseline FID
6.08, Recon 17.92. Paper hardware: 32 A100-40GB (8 images each), about 10 hours for the 60k iterations.
"""

import ml_collections

from configs import common
from lzn_jax.models import presets

VARIANTS = ("rf", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = common.parse_variants(arg, VARIANTS)
    config = common.base_config()
    config.objective = "generation"
    config.latent_dim = 200

    # Flip, then the shorter side resized to image_size (data.resize_size unset); labels unused.
    config.data.name = "afhq_cat"
    config.data.image_size = 256
    config.data.augmentation = "flip"
    config.data.batch_size = 256  # global

    config.model.encoder = common.model_block(presets.image256_encoder_config(config.latent_dim))
    config.model.decoder = common.model_block(presets.image256_decoder_config(config.latent_dim))

    # Adam (0.9, 0.999, 1e-8), warm-up from 1/5000 over 5000 steps, clipping at 1.0: base_config's defaults.
    config.optim.learning_rate = common.per_module(encoder=2e-6, decoder=2e-4)
    common.set_generation_iterations(config, encoder=60_000, decoder=60_000)
    config.ema.decay = common.per_module(encoder=0.999999, decoder=0.999999)

    # Image latents: DPM-Solver++(3M), 20 steps from t = 1e-3 to 0.999, unscaled prior; RF times ~ U[1e-3, 1].
    config.generation.latent_solver = common.solver_block("dpm_solver++", 20)
    config.generation.prior_scale = 1.0
    config.generation.rf_time_eps = 1e-3
    config.generation.rf_loss_weight = 1.0

    config.checkpoint.every_steps = 2000
    config.train.sample_every_steps = 10_000
    config.train.num_sample_images = 256
    common.paper_generation_eval(config, fid_num_samples=5120, reconstruction_num_images=256)

    if "rf" in variants:
        common.apply_rectified_flow_baseline(config)
    if "smoke" in variants:
        common.apply_smoke(config)  # 16x16 images, two levels: the 256 structure (FIR, skips, Fourier) at toy size
    return config
