"""Latent zoning on the embedded scikit-learn digits: no download, no training, any machine.

  python -m lzn_jax.main --config=configs/digits_zoning_demo.py
  python -m lzn_jax.main --config=configs/digits_zoning_demo.py:smoke    # smaller and faster
"""

import ml_collections

from lzn_jax.data.config import default_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "zoning_demo"
    config.seed = 0
    config.latent_dim = 32
    config.prior_scale = 1.0
    config.solver = "dpm_solver++"
    config.num_steps = 20
    config.reverse_num_steps = 100

    config.data = default_config()
    config.data.name = "digits"
    config.data.split = "train"
    config.data.image_size = 16
    config.data.augmentation = "none"
    config.data.batch_size = 1024
    if variant == "smoke":
        config.data.batch_size = 256
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; use '' or 'smoke'")
    return config
