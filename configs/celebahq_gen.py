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

VARIANTS = ("rf", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return common.image256_generation_config(arg, data_name="celeba_hq", encoder_learning_rate=4e-6,
                                             num_iterations=350_000, ema_decay=0.9999, fid_num_samples=29_952)
