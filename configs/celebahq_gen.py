r"""Case study 1, CelebA-HQ 256x256: Rectified Flow with an LZN latent in its decoder (RF+LZN), unconditional.

  python -m lzn_jax.main --config=configs/celebahq_gen.py --workdir=/path/to/workdir \
      --config.data.data_dir=/path/to/CelebA-HQ-1024
  python -m lzn_jax.main --config=configs/celebahq_gen.py:rf --workdir=/path/to/workdir ...  # plain RF baseline
  python -m lzn_jax.main --config=configs/celebahq_gen.py:smoke --workdir=/tmp/lzn_smoke ...  # 16x16 wiring check
Variants compose (`:rf,smoke`); `...` stands for the data_dir flag of the first command.
data_dir holds the 30,000 CelebA-HQ 1024x1024 images (no split: train = test).

Paper (Tab. 1; RK45 sampler, CM FID on 29,952 samples): RF+LZN FID 7.17, Recon 15.90; RF baseline FID
6.95, Recon 26.20. Paper hardware: 32 A100-40GB (8 images each), about 58 hours for the 350k iterations.
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
    config.data.name = "celeba_hq"
    config.data.image_size = 256
    config.data.augmentation = "flip"
    config.data.batch_size = 256  # global

    config.model.encoder = common.model_block(presets.image256_encoder_config(config.latent_dim))
    config.model.decoder = common.model_block(presets.image256_decoder_config(config.latent_dim))

    # Adam (0.9, 0.999, 1e-8), warm-up from 1/5000 over 5000 steps, clipping at 1.0: base_config's defaults.
    config.optim.learning_rate = common.per_module(encoder=4e-6, decoder=2e-4)
    common.set_generation_iterations(config, encoder=350_000, decoder=350_000)
    config.ema.decay = common.per_module(encoder=0.9999, decoder=0.9999)

    # Image latents: DPM-Solver++(3M), 20 steps from t = 1e-3 to 0.999, unscaled prior; RF times ~ U[1e-3, 1].
    config.generation.latent_solver = common.solver_block("dpm_solver++", 20)
    config.generation.prior_scale = 1.0
    config.generation.rf_time_eps = 1e-3
    config.generation.rf_loss_weight = 1.0

    config.checkpoint.every_steps = 2000
    config.train.sample_every_steps = 10_000
    config.train.num_sample_images = 256
    common.paper_generation_eval(config, fid_num_samples=29_952, reconstruction_num_images=256)

    if "rf" in variants:
        common.apply_rectified_flow_baseline(config)
    if "smoke" in variants:
        common.apply_smoke(config)  # 16x16 images, two levels: the 256 structure (FIR, skips, Fourier) at toy size
    return config
