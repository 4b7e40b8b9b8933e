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

VARIANTS = ("rf", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return common.image256_generation_config(arg, data_name="afhq_cat", encoder_learning_rate=2e-6,
                                             num_iterations=60_000, ema_decay=0.999999, fid_num_samples=5120)
