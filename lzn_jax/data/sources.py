"""What the pipelines read: the ``Source`` protocol (random access to records) and ``ArraySource`` over arrays.

The built-in sources (digits, TFDS, image folders) follow it; a notebook passes its own to ``build_pipeline``.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Source(Protocol):
    """Random access to the records of one split.

    What the pipelines rely on:
      * ``len(source)`` is the number of records N, and ``source[i]`` for ``0 <= i < N`` returns a record
        ``{"image": uint8 (H, W, C), ["label": integer scalar]}``, every record with the same keys;
      * ``source[i]`` always returns the same record (resumed runs and evaluation passes depend on it), and may be
        called from several threads at once (grain reads with ``data.num_threads`` threads);
      * the source is picklable when ``data.num_workers > 0`` (grain sends it to its worker processes).
    Image sizes may vary between records; the per-example transform brings them to ``data.image_size``.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, np.ndarray]: ...


def check_source(source) -> None:
    """Refuses an object the pipelines cannot read as a ``Source``: reads ``source[0]`` and checks its form.

    Raises:
      TypeError: no ``__len__`` / ``__getitem__``, or a record that is not a dict with an ``"image"``.
      ValueError: no records, or an image that is not ``uint8 (H, W, C)``.
    """
    if not isinstance(source, Source):
        raise TypeError(
            f"a data source needs __len__ and __getitem__ (see lzn_jax.data.Source), got {type(source).__name__}; "
            "wrap in-memory arrays with lzn_jax.data.ArraySource(images, labels)"
        )
    if len(source) == 0:
        raise ValueError("the data source has no records")
    record = source[0]
    if not isinstance(record, Mapping) or "image" not in record:
        raise TypeError(
            f"source[0] must be a dict with an 'image' (and optionally a 'label'), got {type(record).__name__}; "
            "wrap in-memory arrays with lzn_jax.data.ArraySource(images, labels)"
        )
    image = np.asarray(record["image"])
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(
            f"source[0]['image'] must be uint8 (H, W, C), got {image.dtype} {image.shape}; convert pixels to 0..255 "
            "uint8 and add a channel axis if needed"
        )


class ArraySource:
    """A ``Source`` over in-memory arrays: ``source[i] -> {"image": uint8 (H, W, C), ["label": int32 ()]}``.

    Args:
      images: ``uint8 (N, H, W, C)``.
      labels: ``integer (N,)``, or ``None`` for unlabelled data.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
        if getattr(images, "dtype", None) != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"ArraySource needs uint8 images of shape (N, H, W, C), got {getattr(images, 'dtype', type(images))} "
                f"{getattr(images, 'shape', '')}; convert pixels to 0..255 uint8 and add a channel axis if needed"
            )
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"ArraySource got {len(images)} images but {len(labels)} labels; pass one label per image")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = {"image": self.images[index]}
        if self.labels is not None:
            record["label"] = np.int32(self.labels[index])
        return record
