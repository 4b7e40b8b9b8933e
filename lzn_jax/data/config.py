"""The ``data`` block of an experiment config: every key at its default, documented where it is set.

Imports only ml_collections, so that parsing a config file never pulls in jax, grain or TensorFlow.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

# The values ``data.augmentation`` and ``data.augment_on`` accept.
AUGMENTATIONS = ("none", "flip", "two_view")
AUGMENT_ON = ("host", "device")


def default_config() -> ml_collections.ConfigDict:
    """The ``data`` block with every key the pipelines read.

    Keys that may be unset are typed placeholders (``None`` by default), so ``--config.data.data_dir=...`` works on
    the command line. Copy a block with ``copy.deepcopy`` (or ``copy_and_resolve_references``), not
    ``ConfigDict(block)``, which would share those placeholders between the copy and the original.
    """
    config = ml_collections.ConfigDict()
    # Data set: "digits" (embedded, needs no download), "cifar10" or "imagenet2012" (TFDS, prepared once with
    # `python -m lzn_jax.data.prepare NAME`), or an image folder: "afhq_cat", "celeba_hq", "lsun_bedroom",
    # "image_folder" (any folder of images).
    config.name = "digits"
    # Split: "train" | "test" (digits, cifar10) | "validation" (imagenet2012) | "all" (digits). Folders ignore it.
    config.split = "train"
    # TFDS data folder, or the root of an image-folder data set. Unset: TFDS's default folder.
    config.data_dir = placeholder(str)
    # Global batch over all hosts; a multiple of the host count (and of the batch shards of the sharding).
    config.batch_size = 128
    # Seed of the data order and of every random augmentation; kept apart from the model's seed.
    config.seed = 0
    # Side of the square output images (digits: 16 or 32; CIFAR10: 32; the folders: 256; ImageNet: 224).
    config.image_size = 16
    # Digits only: 1 (gray) or 3 (the gray channel repeated, for CIFAR-shaped models).
    config.num_channels = 1
    # Random transform of each example: "none", "flip" (horizontal, with flip_probability) or "two_view" (two
    # SimCLR-style views per image, see two_view below; batches then hold "views" instead of "image").
    config.augmentation = "flip"
    config.flip_probability = 0.5
    # "none" and "flip" first bring every image to image_size x image_size: the shorter side is resized (PIL
    # bilinear) to resize_size, then the centre is cropped. Unset: resize to image_size itself (a square image of
    # that size is left as it is). ImageNet's evaluation transform is resize_size=256 with image_size=224.
    config.resize_size = placeholder(int)
    # Where the photometric half of "two_view" runs: "host" (batches hold final uint8 views) or "device" (batches
    # hold the crops plus their "augment" parameters, which model_inputs_fn(config) applies in the jitted step).
    # The measurements behind the default are in benchmarks/README.md.
    config.augment_on = "host"
    # The two-view augmentation; defaults are the reference's ImageNet values (RandomResizedCrop, flip, colour
    # jitter in random order, grayscale, Gaussian blur).
    config.two_view = ml_collections.ConfigDict()
    # Area fraction and aspect-ratio range of the random resized crop.
    config.two_view.crop_scale = (0.08, 1.0)
    config.two_view.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    # Colour jitter strengths (brightness, contrast, saturation, hue) and the probability of jittering a view.
    config.two_view.jitter_strength = (0.8, 0.8, 0.8, 0.2)
    config.two_view.jitter_probability = 0.8
    config.two_view.grayscale_probability = 0.2
    # Gaussian blur: taps, range of the uniformly drawn sigma, probability (the reference always blurs; SimCLR
    # blurs half of the views).
    config.two_view.blur_kernel_size = 23
    config.two_view.blur_sigma = (0.1, 2.0)
    config.two_view.blur_probability = 1.0
    # Training pipeline only: permute the records every epoch (False: file order). Evaluation reads file order.
    config.shuffle = True
    # Training pipeline only: unset for an endless stream, else stop after num_epochs * (N // batch_size) steps.
    config.num_epochs = placeholder(int)
    # grain worker processes per host (0: read in this process, with num_threads threads). Sources must then be
    # picklable.
    config.num_workers = 0
    # grain's read threads per process and its read-ahead, in examples.
    config.num_threads = 4
    config.prefetch_buffer_size = 256
    # Image folders stop with an error once more than this fraction of their files fail to decode.
    config.max_bad_fraction = 0.001
    return config


def _unknown_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str) -> list:
    """Keys of ``config`` (recursively, as dotted paths) that ``reference`` does not have."""
    unknown = []
    for key in config.keys():
        if key not in reference:
            unknown.append(prefix + key)
        elif isinstance(reference[key], ml_collections.ConfigDict):
            unknown.extend(_unknown_keys(config[key], reference[key], f"{prefix}{key}."))
    return unknown


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses a ``data`` block with a key the pipelines do not read or a value they cannot honour.

    Raises:
      ValueError: naming the key, the value and the fix.
    """
    unknown = _unknown_keys(config, default_config(), "")
    if "eval_resize_size" in unknown:
        raise ValueError(
            "data.eval_resize_size is now data.resize_size (with data.augmentation='none' for evaluation)"
        )
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; the keys are those of lzn_jax.data.default_config()")
    if config.augmentation == "eval":
        raise ValueError(
            "data.augmentation='eval' is now data.augmentation='none' with data.resize_size set, e.g. 256 with "
            "image_size=224 for Resize(256) -> CenterCrop(224)"
        )
    if config.augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown data.augmentation={config.augmentation!r}; use one of {AUGMENTATIONS}")
    if config.augment_on not in AUGMENT_ON:
        raise ValueError(f"data.augment_on must be one of {AUGMENT_ON}, got {config.augment_on!r}")
    if config.resize_size is not None:
        if config.augmentation == "two_view":
            raise ValueError(
                "data.resize_size does not apply to two_view, whose random resized crops read the whole image; "
                "leave it unset"
            )
        if config.image_size is None or config.resize_size < config.image_size:
            raise ValueError(
                f"data.resize_size={config.resize_size} must be at least data.image_size={config.image_size}: "
                "the centre crop is taken from the resized image"
            )
    if config.batch_size <= 0:
        raise ValueError(f"data.batch_size must be positive, got {config.batch_size}")
