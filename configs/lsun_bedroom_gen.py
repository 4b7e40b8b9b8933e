r"""Case study 1, LSUN-Bedroom 256x256: Rectified Flow with an LZN latent in its decoder (RF+LZN), unconditional.

  python -m lzn_jax.main --config=configs/lsun_bedroom_gen.py --workdir=/path/to/workdir \
      --config.data.data_dir=/path/to/bedroom_train
  python -m lzn_jax.main --config=configs/lsun_bedroom_gen.py:rf --workdir=/path/to/workdir ...  # plain RF baseline
  python -m lzn_jax.main --config=configs/lsun_bedroom_gen.py:smoke --workdir=/tmp/lzn_smoke ...  # 16x16 wiring check
Variants compose (`:rf,smoke`); `...` stands for the data_dir flag of the first command.
data_dir holds the 3,033,042 bedroom_train images, exported as 256x256 PNGs.

Paper (Tab. 1; RK45 sampler, CM FID on 29,952 samples): RF+LZN FID 5.95, Recon 37.01; RF baseline FID
6.25, Recon 48.72. Paper hardware: 32 A100-40GB (8 images each), about 341 hours for the 2.05M iterations.
"""

import ml_collections

from configs import common

VARIANTS = ("rf", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return common.image256_generation_config(arg, data_name="lsun_bedroom", encoder_learning_rate=2e-6,
                                             num_iterations=2_050_000, ema_decay=0.99999, fid_num_samples=29_952)
