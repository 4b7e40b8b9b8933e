"""Entry point: ``python -m lzn_jax.main --config=configs/<setting>.py[:variant] [--config.key=value ...]``.

Parses the config, initialises multi-host JAX when asked (``--multihost``), and dispatches on
``config.experiment``. Everything it calls is importable and usable from a notebook.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join("configs", "digits_zoning_demo.py"), "Experiment config file.", lock_config=True
)

_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (Cloud TPU pods and SLURM clusters are detected)."
)

EXPERIMENTS = ("zoning_demo",)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    if _MULTIHOST.value:
        jax.distributed.initialize()
    config = _CONFIG.value
    if config.experiment == "zoning_demo":
        from lzn_jax.experiments import zoning_demo

        zoning_demo.run(config)
    else:
        raise ValueError(f"config.experiment={config.experiment!r} is not one of {EXPERIMENTS}")


if __name__ == "__main__":
    app.run(main)
