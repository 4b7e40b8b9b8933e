"""Builds the ArrayRecord copy of a TFDS data set that the training pipeline reads.

  python -m lzn_jax.data.prepare cifar10 --data_dir=/data/tfds
  python -m lzn_jax.data.prepare imagenet2012 --data_dir=/data/tfds --manual_dir=/data/imagenet_archives

CIFAR10 is downloaded by TFDS. ImageNet cannot be downloaded: put ``ILSVRC2012_img_train.tar`` and
``ILSVRC2012_img_val.tar`` (from image-net.org) in ``--manual_dir`` first, as the TFDS documentation describes.
"""

from __future__ import annotations

import argparse
import os
import sys

from lzn_jax.data.tfds_source import TFDS_DATASETS

IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Parses ``NAME --data_dir=... [--manual_dir=...]``."""
    parser = argparse.ArgumentParser(prog="python -m lzn_jax.data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=TFDS_DATASETS)
    parser.add_argument("--data_dir", default=None, help="TFDS data folder (default: TFDS's ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="folder with the manually downloaded archives (ImageNet)")
    return parser.parse_args(argv)


def check_manual_dir(name: str, manual_dir: str | None) -> None:
    """Fails before any work when ImageNet's archives are not where the user said."""
    if name != "imagenet2012":
        return
    if not manual_dir:
        raise SystemExit(
            "imagenet2012 needs --manual_dir=<folder> holding " + " and ".join(IMAGENET_ARCHIVES) +
            " (download them from https://image-net.org; TFDS cannot)."
        )
    missing = [archive for archive in IMAGENET_ARCHIVES if not os.path.exists(os.path.join(manual_dir, archive))]
    if missing:
        raise SystemExit(f"--manual_dir={manual_dir!r} lacks {missing}; download them from https://image-net.org")


def prepare(name: str, data_dir: str | None, manual_dir: str | None = None) -> str:
    """Downloads (CIFAR10) or reads the archives (ImageNet) and writes ArrayRecord files; returns the data folder."""
    import tensorflow_datasets as tfds

    check_manual_dir(name, manual_dir)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder.data_dir


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    folder = prepare(arguments.name, arguments.data_dir, arguments.manual_dir)
    print(f"prepared {arguments.name} as ArrayRecord in {folder}")


if __name__ == "__main__":
    main()
