"""Input pipelines: TFDS / image-folder / embedded-digits sources, augmentations, per-host grain batches that
become sharded global ``jax.Array``s. Start at ``build_pipeline`` (see ``pipeline.py`` for the contract)."""

from lzn_jax.data.augment import TwoViewOptions, apply_photometric_device, apply_photometric_host
from lzn_jax.data.digits import digits_source, load_digits_split
from lzn_jax.data.folders import ImageFolderSource, TooManyBadFilesError, folder_source
from lzn_jax.data.pipeline import GlobalBatchIterator, build_pipeline, build_source, default_config
from lzn_jax.data.tfds_source import DatasetNotPreparedError, prepare_command
from lzn_jax.data.transforms import to_float_images

__all__ = [
    "DatasetNotPreparedError",
    "GlobalBatchIterator",
    "ImageFolderSource",
    "TooManyBadFilesError",
    "TwoViewOptions",
    "apply_photometric_device",
    "apply_photometric_host",
    "build_pipeline",
    "build_source",
    "default_config",
    "digits_source",
    "folder_source",
    "load_digits_split",
    "prepare_command",
    "to_float_images",
]
