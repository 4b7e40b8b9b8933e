"""The embedded ``digits`` data set: scikit-learn's 1,797 real 8x8 handwritten digits, needing no download.

Pixels 0..16 become uint8 0..255 and are resized (PIL bilinear) to 16x16x1 or, to exercise CIFAR-shaped models,
32x32x3. The train/test split is stratified and fixed: per class, ``round(0.2 * n_class)`` examples chosen by a
permutation with a constant seed go to ``test``.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from lzn_jax.data.sources import ArraySource

TEST_FRACTION = 0.2
SPLIT_SEED = 20251127
NUM_CLASSES = 10
SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """``uint8 (1797, 8, 8)`` images in 0..255 and ``int32 (1797,)`` labels, read once per process."""
    from sklearn.datasets import load_digits  # imported lazily: it costs ~1 s and most imports never need it

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int32)


def stratified_test_indices(labels: np.ndarray, *, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED):
    """Indices of the test split: per class ``round(test_fraction * count)`` chosen at random (fixed seed).

    Args:
      labels: ``int (N,)`` class of every example.
    Returns:
      ``int64 (N_test,)`` sorted indices.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(test_fraction * len(members)))
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """``uint8 (N, 8, 8)`` -> ``uint8 (N, size, size)`` with PIL bilinear."""
    if size == images.shape[1]:
        return images
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)) for image in images])


@functools.lru_cache(maxsize=8)
def load_digits_split(split: str = "train", *, image_size: int = 16, num_channels: int = 1):
    """The digits split as arrays (cached; treat them as read-only).

    Args:
      split: ``"train"`` (1,438 examples), ``"test"`` (359) or ``"all"`` (1,797).
      image_size: output height and width (16 by default; 32 for CIFAR-shaped models).
      num_channels: 1, or 3 to repeat the gray channel as RGB.
    Returns:
      ``images`` uint8 ``(N, image_size, image_size, num_channels)`` and ``labels`` int32 ``(N,)``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; use one of {SPLITS}")
    if num_channels not in (1, 3):
        raise ValueError(f"digits num_channels must be 1 or 3, got {num_channels}")
    images, labels = _raw_digits()
    if split != "all":
        test = np.zeros(len(labels), bool)
        test[stratified_test_indices(labels)] = True
        keep = test if split == "test" else ~test
        images, labels = images[keep], labels[keep]
    images = _resize(images, image_size)[..., None]
    if num_channels == 3:
        images = np.repeat(images, 3, axis=-1)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_source(split: str = "train", *, image_size: int = 16, num_channels: int = 1) -> ArraySource:
    """The digits split as a random-access source for the pipeline."""
    return ArraySource(*load_digits_split(split, image_size=image_size, num_channels=num_channels))
