"""Entry point: ``python -m lzn_jax.main --config=configs/<setting>.py[:variants] --workdir=DIR [--mode=train|eval]``.

Parses the config (``--config.key=value`` overrides), joins the JAX cluster when there is one (Cloud TPU pods,
SLURM; nothing to do on one machine) and trains or evaluates. Everything it calls is importable from a notebook.
"""

from __future__ import annotations

import pathlib

from absl import app, flags
from ml_collections import config_flags

from lzn_jax import entry

# The default works from any directory: it names the file in this repository, not a path relative to the cwd.
_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits_joint.py"
_CONFIG = config_flags.DEFINE_config_file("config", str(_DEFAULT_CONFIG), "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, logs, samples (created if missing; "
                               "resumed if it holds a checkpoint). Default: workdirs/<config name> in the cwd.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming), or evaluate the latest checkpoint.")

MODES = ("train", "eval")


def default_workdir(config_path: str) -> pathlib.Path:
    """``workdirs/<config file stem>[_<variants>]`` under the current directory."""
    path, _, variants = config_path.partition(":")
    name = pathlib.Path(path).stem + ("_" + variants.replace(",", "_") if variants else "")
    return pathlib.Path("workdirs") / name


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    entry.quiet_library_logs()
    entry.enable_compilation_cache()
    from lzn_jax import parallel

    parallel.maybe_initialize()
    config = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else default_workdir(flags.FLAGS["config"].config_filename)
    if config.get("experiment") == "zoning_demo":
        from lzn_jax.experiments import zoning_demo

        zoning_demo.run(config)
        return
    if _MODE.value == "train":
        from lzn_jax.train import loop

        loop.train(config, workdir)
    else:
        from lzn_jax.train import evaluate

        evaluate.evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
