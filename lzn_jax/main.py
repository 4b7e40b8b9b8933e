"""Entry point: ``python -m lzn_jax.main --config=configs/<setting>.py[:variant] [--config.key=value ...]``.

Parses the config, joins the JAX cluster when there is one (Cloud TPU pods, SLURM; nothing to pass on a single
machine), and dispatches on ``config.experiment``. Everything it calls is importable from a notebook.
"""

from __future__ import annotations

import pathlib

from absl import app
from ml_collections import config_flags

# The default works from any directory: it names the file in this repository, not a path relative to the cwd.
_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits_zoning_demo.py"
_CONFIG = config_flags.DEFINE_config_file("config", str(_DEFAULT_CONFIG), "Experiment config file.",
                                          lock_config=True)

EXPERIMENTS = ("zoning_demo",)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lzn_jax import parallel

    parallel.maybe_initialize()
    config = _CONFIG.value
    if config.experiment == "zoning_demo":
        from lzn_jax.experiments import zoning_demo

        zoning_demo.run(config)
    else:
        raise ValueError(f"config.experiment={config.experiment!r} is not one of {EXPERIMENTS}")


if __name__ == "__main__":
    app.run(main)
