"""TFDS sources (``cifar10``, ``imagenet2012``) read at random access from prepared ArrayRecord files.

``tfds.data_source`` never downloads here (``download=False``): a missing or TFRecord-only copy fails at once,
without network access, with the exact ``python -m lzn_jax.data.prepare ...`` command that builds the ArrayRecord
files.
"""

from __future__ import annotations

import shlex

import numpy as np

TFDS_DATASETS = ("cifar10", "imagenet2012")
# The TFDS name of the held-out split of each data set (cifar10 calls it "test", ImageNet "validation").
EVAL_SPLITS = {"cifar10": "test", "imagenet2012": "validation"}


class DatasetNotPreparedError(FileNotFoundError):
    """The TFDS data set has no ArrayRecord copy under ``data_dir``."""


def prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares ``name`` under ``data_dir`` (ImageNet also needs its manual archives)."""
    command = ["python", "-m", "lzn_jax.data.prepare", name]
    if data_dir:
        command.append(f"--data_dir={data_dir}")
    if name == "imagenet2012":
        command.append("--manual_dir=<folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar>")
    return shlex.join(command) if name != "imagenet2012" else " ".join(command)


class TfdsSource:
    """Wraps a TFDS ArrayRecord data source: ``source[i] -> {"image": uint8 (H, W, 3), "label": int32}``.

    Only the image and the label are kept (file names and ids are strings that would not batch).
    """

    def __init__(self, data_source):
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self.data_source[int(index)]
        return {"image": np.asarray(record["image"], np.uint8), "label": np.int32(record["label"])}


def tfds_source(name: str, split: str, data_dir: str | None) -> TfdsSource:
    """Opens split ``split`` of TFDS data set ``name`` from ``data_dir`` (the TFDS default when ``None``).

    Raises:
      DatasetNotPreparedError: no prepared ArrayRecord copy; the message holds the command to run.
    """
    import tensorflow_datasets as tfds  # imported lazily: pulls in TensorFlow (seconds)

    if name not in TFDS_DATASETS:
        raise ValueError(f"unknown TFDS data set {name!r}; this project reads {TFDS_DATASETS}")
    try:
        data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (AssertionError, FileNotFoundError, NotImplementedError, ValueError) as error:
        # tfds says "file format TFRECORD is not supported" both for a missing copy and for a TFRecord-only copy.
        raise DatasetNotPreparedError(
            f"TFDS data set {name!r} (split {split!r}) has no prepared ArrayRecord copy under "
            f"data_dir={data_dir!r}, and this project never downloads during training. Prepare it once with:\n"
            f"  {prepare_command(name, data_dir)}\n(tfds said: {str(error).splitlines()[0]})"
        ) from error
    return TfdsSource(data_source)
