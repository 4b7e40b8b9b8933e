"""Sample grids: float images to uint8, images tiled into one picture (one row per class for class-conditional
samples), written as PNG."""

from __future__ import annotations

import pathlib

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images -> uint8 in [0, 255] (clipped, rounded)."""
    return np.clip(np.rint((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, *, columns: int) -> np.ndarray:
    """Tiles uint8 images (N, H, W, C) into one (rows * (H + 1) - 1, columns * (W + 1) - 1, C) picture with
    1-pixel white gaps; the last row is padded with white."""
    count, height, width, channels = images.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1, channels), 255, np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        grid[row * (height + 1):row * (height + 1) + height, column * (width + 1):column * (width + 1) + width] = (
            images[index]
        )
    return grid


def class_grid(images: np.ndarray, labels: np.ndarray, *, num_classes: int) -> np.ndarray:
    """One row per class: row k holds the uint8 images (N, H, W, C) whose label (N,) is k, in their order, and rows
    are padded with white to the longest. Returns a picture as :func:`image_grid` lays it out."""
    labels = np.asarray(labels)
    in_range = labels.size == 0 or (0 <= labels.min() and labels.max() < num_classes)
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer) or not in_range:
        raise ValueError(f"labels must be {images.shape[:1]} ints in [0, {num_classes}), got {labels.dtype} "
                         f"{labels.shape}" + (f" in [{labels.min()}, {labels.max()}]" if labels.size else ""))
    columns = max(1, int(np.bincount(labels, minlength=num_classes).max(initial=0)))
    cells = np.full((num_classes, columns, *images.shape[1:]), 255, np.uint8)
    for k in range(num_classes):
        members = images[labels == k]
        cells[k, :len(members)] = members
    return image_grid(cells.reshape(num_classes * columns, *images.shape[1:]), columns=columns)


def write_grid(path: str | pathlib.Path, images: np.ndarray, *, labels: np.ndarray | None = None,
               num_classes: int | None = None, columns: int | None = None) -> pathlib.Path:
    """Writes images (N, H, W, C), uint8 or float in [-1, 1], as a PNG grid and returns its path.

    With ``labels`` (N,): one row per class (``num_classes`` rows, default ``max(labels) + 1``). Without: rows of
    ``columns`` images (default ``ceil(sqrt(N))``).
    """
    # The PNG writer lives with the trainer's reports; imported here because importing it pulls in clu.
    from lzn_jax.train.report import write_png

    images = np.asarray(images)
    pixels = images if images.dtype == np.uint8 else to_uint8(images)
    if labels is not None:
        labels = np.asarray(labels)
        classes = int(labels.max(initial=-1)) + 1 if num_classes is None else num_classes
        picture = class_grid(pixels, labels, num_classes=classes)
    else:
        picture = image_grid(pixels, columns=columns or int(np.ceil(np.sqrt(len(pixels)))))
    path = pathlib.Path(path)
    write_png(path, picture)
    return path
