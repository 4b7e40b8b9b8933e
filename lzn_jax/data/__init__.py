"""Input pipelines: digits / TFDS / image-folder sources, augmentations, per-host grain batches that become sharded
global ``jax.Array``s. Start at ``build_pipeline`` (training) or ``build_eval_pipeline`` (one masked pass).

Names are imported on first use, so ``lzn_jax.data.config`` (what config files import) stays free of jax and grain.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the module of this package that defines it.
_EXPORTS = {
    "ArraySource": "sources",
    "DatasetNotPreparedError": "tfds_source",
    "EvalBatches": "pipeline",
    "ImageFolderSource": "folders",
    "Source": "sources",
    "TooManyBadFilesError": "folders",
    "TrainBatches": "pipeline",
    "TwoViewOptions": "augment",
    "apply_photometric_device": "device",
    "apply_photometric_host": "augment",
    "build_eval_pipeline": "pipeline",
    "build_pipeline": "pipeline",
    "build_source": "pipeline",
    "check_config": "config",
    "default_config": "config",
    "digits_source": "digits",
    "folder_source": "folders",
    "load_digits_split": "digits",
    "model_inputs_fn": "device",
    "prepare_command": "tfds_source",
    "to_float_images": "device",
}

_SUBMODULES = ("augment", "config", "device", "digits", "folders", "pipeline", "prepare", "sources", "tfds_source",
               "transforms")

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what the lazy exports resolve to, for type checkers and IDEs
    from lzn_jax.data.augment import TwoViewOptions, apply_photometric_host
    from lzn_jax.data.config import check_config, default_config
    from lzn_jax.data.device import apply_photometric_device, model_inputs_fn, to_float_images
    from lzn_jax.data.digits import digits_source, load_digits_split
    from lzn_jax.data.folders import ImageFolderSource, TooManyBadFilesError, folder_source
    from lzn_jax.data.pipeline import EvalBatches, TrainBatches, build_eval_pipeline, build_pipeline, build_source
    from lzn_jax.data.sources import ArraySource, Source
    from lzn_jax.data.tfds_source import DatasetNotPreparedError, prepare_command


def __getattr__(name: str):
    if name in _SUBMODULES:  # ``data.augment.X`` works without importing the submodule first
        return importlib.import_module(f"lzn_jax.data.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lzn_jax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lzn_jax.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
