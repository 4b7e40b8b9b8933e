"""Image-folder sources (AFHQ-Cat, CelebA-HQ, LSUN-Bedroom, or any folder of images) with bad-file handling.

Every file PIL can open is decoded and converted to RGB (grayscale, palette, CMYK, alpha all work; the reference
breaks on them). A file that does not decode is skipped: the record at that index is replaced by the next index
that decodes (deterministic, so resumed runs see the same data), and its path is logged and counted. When the bad
files exceed ``max_bad_fraction`` of the folder, reading stops with an error. Counts are per process (each grain
worker counts what it read).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# The sub-folder of the data set root that holds the images the reference trains on.
FOLDER_DATASETS = {
    "afhq_cat": os.path.join("train", "cat"),
    "celeba_hq": "",
    "lsun_bedroom": "",
    "image_folder": "",
}


def _image_extensions() -> frozenset[str]:
    """Every file extension some PIL plugin claims (``.jpg``, ``.png``, ``.webp``, ``.tif``...), lower case."""
    Image.init()
    return frozenset(extension.lower() for extension in Image.registered_extensions())


def list_image_files(folder: str) -> tuple[list[str], int]:
    """Sorted paths of the image files below ``folder`` (recursive) and the number of other files ignored.

    Raises:
      FileNotFoundError: ``folder`` is missing or holds no image file.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"image folder {folder!r} does not exist; set data.data_dir to the folder that holds the images"
        )
    extensions = _image_extensions()
    paths, ignored = [], 0
    for root, directories, names in os.walk(folder):
        directories.sort()
        for name in sorted(names):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                paths.append(os.path.join(root, name))
            else:
                ignored += 1
    if not paths:
        raise FileNotFoundError(
            f"image folder {folder!r} holds no image file (looked recursively for {sorted(extensions)[:8]}...); "
            "check data.data_dir"
        )
    return sorted(paths), ignored


def decode_rgb(path: str) -> np.ndarray:
    """Reads any PIL-readable image as ``uint8 (H, W, 3)`` RGB. Raises ``OSError`` / ``ValueError`` if it cannot."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "RGB":
            return np.asarray(image, dtype=np.uint8)
        # Transparent pixels are composited on white, not left with whatever colour hides behind alpha 0.
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class TooManyBadFilesError(RuntimeError):
    """More files failed to decode than ``max_bad_fraction`` allows."""


class ImageFolderSource:
    """Random-access source over a folder: ``source[i] -> {"image": uint8 (H, W, 3)}`` (sizes vary by file)."""

    def __init__(self, folder: str, *, max_bad_fraction: float = 0.001):
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        self.folder = folder
        self.paths, ignored = list_image_files(folder)
        self.max_bad_fraction = max_bad_fraction
        self.bad_paths: set[str] = set()
        if ignored:
            logger.info("image folder %s: ignoring %d files whose extension no PIL plugin reads", folder, ignored)
        logger.info("image folder %s: %d image files", folder, len(self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def _record_bad(self, path: str, error: Exception) -> None:
        if path in self.bad_paths:
            return
        self.bad_paths.add(path)
        logger.warning(
            "skipping undecodable image %s (%s: %s); %d bad so far",
            path, type(error).__name__, error, len(self.bad_paths),
        )
        if len(self.bad_paths) > self.max_bad_fraction * len(self.paths):
            raise TooManyBadFilesError(
                f"{len(self.bad_paths)} of the {len(self.paths)} images in {self.folder!r} do not decode "
                f"(more than data.max_bad_fraction={self.max_bad_fraction}); first ones: "
                f"{sorted(self.bad_paths)[:5]}. Remove or repair them, or raise data.max_bad_fraction."
            )

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            if path in self.bad_paths:
                continue
            try:
                return {"image": decode_rgb(path)}
            except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three on broken files
                self._record_bad(path, error)
        raise TooManyBadFilesError(f"no image in {self.folder!r} decodes")


def folder_source(name: str, data_dir: str, *, max_bad_fraction: float = 0.001) -> ImageFolderSource:
    """The image folder of data set ``name`` (a key of ``FOLDER_DATASETS``) under ``data_dir``."""
    if name not in FOLDER_DATASETS:
        raise ValueError(f"unknown folder data set {name!r}; use one of {sorted(FOLDER_DATASETS)}")
    if not data_dir:
        raise ValueError(f"data set {name!r} reads an image folder: set data.data_dir to its root")
    return ImageFolderSource(os.path.join(data_dir, FOLDER_DATASETS[name]), max_bad_fraction=max_bad_fraction)
