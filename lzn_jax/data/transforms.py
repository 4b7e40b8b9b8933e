"""Deterministic and random geometric image transforms that run on the host (numpy / PIL, no jax).

Images are ``uint8 (H, W, C)`` numpy arrays; random choices come from a ``numpy.random.Generator`` that the
pipeline derives from ``(data.seed, step, position in the global batch)``, so every transform is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def _as_pil(image: np.ndarray) -> Image.Image:
    """``uint8 (H, W, C)`` with C in {1, 3} -> PIL image (mode ``L`` or ``RGB``)."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {image.dtype}; convert pixels to 0..255 uint8 first")
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image of shape (H, W, 1) or (H, W, 3), got {image.shape}")
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image) -> np.ndarray:
    """PIL image -> ``uint8 (H, W, C)``; grayscale keeps one channel."""
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes so that the shorter side equals ``size`` (PIL bilinear, antialiased), keeping the aspect ratio.

    Same output size rule as torchvision ``Resize(int)``: the longer side becomes ``int(size * long / short)``.

    Args:
      image: ``uint8 (H, W, C)``.
    Returns:
      ``uint8 (H', W', C)`` with ``min(H', W') == size``.
    """
    height, width = image.shape[:2]
    if min(height, width) == size:
        return image
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    return _from_pil(_as_pil(image).resize((new_width, new_height), Image.BILINEAR))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Crops the central ``size x size`` window (torchvision's rounding of the offsets).

    Args:
      image: ``uint8 (H, W, C)`` with ``H, W >= size``.
    Returns:
      ``uint8 (size, size, C)``.
    """
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from an image of {height}x{width}; resize it first")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image[top : top + size, left : left + size]


def resize_and_center_crop(image: np.ndarray, size: int, *, resize_to: int | None = None) -> np.ndarray:
    """Shorter side to ``resize_to`` (default ``size``), then the central ``size x size`` crop.

    With ``resize_to=size`` this is the reference's generation transform (``Resize(256)``; the crop is a no-op on
    the square AFHQ / CelebA-HQ / LSUN images and makes non-square files batchable). With ``resize_to=256`` and
    ``size=224`` it is ImageNet's evaluation transform (``Resize(256)`` -> ``CenterCrop(224)``).

    Returns:
      ``uint8 (size, size, C)``.
    """
    return center_crop(resize_shorter_side(image, size if resize_to is None else resize_to), size)


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator, *, probability: float = 0.5) -> np.ndarray:
    """Mirrors the width axis with the given probability. ``(H, W, C)`` -> ``(H, W, C)``."""
    return image[:, ::-1] if rng.random() < probability else image


def sample_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Samples a RandomResizedCrop window with torchvision's rule.

    Area fraction ``~ U(scale)``, log aspect ratio ``~ U(log ratio)``; a draw is kept when the window fits, and after
    ``attempts`` misses the central window with the aspect ratio clamped into ``ratio`` is used.

    Returns:
      ``(top, left, crop_height, crop_width)`` integers with the window inside the image.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    input_ratio = width / height
    if input_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif input_ratio > ratio[1]:
        crop_height, crop_width = height, int(round(height * ratio[1]))
    else:
        crop_height, crop_width = height, width
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Resizes the window ``box = (top, left, h, w)`` of ``image`` to ``size x size`` (PIL bilinear, antialiased).

    Returns:
      ``uint8 (size, size, C)``.
    """
    top, left, crop_height, crop_width = box
    # Crop first, then resize (torchvision's order): resizing with PIL's ``box=`` argument would let the
    # antialiasing filter read pixels outside the window.
    window = image[top : top + crop_height, left : left + crop_width]
    return _from_pil(_as_pil(np.ascontiguousarray(window)).resize((size, size), Image.BILINEAR))
