"""Large sample sets on disk as uint8 ``.npy`` parts, one per process, each with a JSON index of the global rows it
holds: no host ever gathers the whole set to write it. :func:`read_samples` puts the parts back in global order.

Layout of ``directory`` for a set called ``name``: ``{name}_host{p:03d}.npy`` (uint8, (n_p, H, W, C)) and
``{name}_host{p:03d}.json`` ({"row_ranges": [[start, stop], ...] in file order, "total_rows", "process_count",
...}). Both are written atomically (temporary file, then rename); the index is renamed last.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from lzn_jax.sampling.grids import to_uint8

FORMAT = "lzn-jax sample part v1"


class SampleSetError(ValueError):
    """A sample set on disk is incomplete or inconsistent (missing rows, overlapping parts, mixed runs)."""


def local_rows(images: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a global array (N, ...), sharded by rows only, that this process's devices hold, each once.

    Returns ``(rows (n,) int64 ascending, values (n, ...))`` on the host. Shards that replicate a row block (other
    mesh axes) are skipped unless they are the block's first replica, so over all processes every row comes once.

    Raises:
      ValueError: a shard splits an axis other than the rows.
    """
    count = images.shape[0]
    blocks = []
    for shard in images.addressable_shards:
        if shard.replica_id != 0:
            continue
        if any(index.indices(size) != (0, size, 1) for index, size in zip(shard.index[1:], images.shape[1:])):
            raise ValueError(f"a shard of the {images.shape} array splits an axis other than the rows "
                             f"({shard.index}); lay it out by rows only (e.g. parallel.batch_sharding(mesh))")
        start, stop, _ = shard.index[0].indices(count)
        blocks.append((start, stop, shard.data))
    blocks.sort(key=lambda block: block[0])
    rows = np.concatenate([np.arange(start, stop) for start, stop, _ in blocks] or [np.zeros(0)]).astype(np.int64)
    values = np.concatenate([np.asarray(data) for _, _, data in blocks]) if blocks else np.zeros(
        (0, *images.shape[1:]), images.dtype)
    return rows, values


def _row_ranges(rows: np.ndarray) -> list[list[int]]:
    """Rows (n,) in file order -> maximal runs of consecutive rows as [start, stop) pairs."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    return [[int(rows[a]), int(rows[b - 1]) + 1] for a, b in zip(starts, stops)]


def _atomic_write(path: pathlib.Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _as_pixels(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.all(np.isfinite(images)):
        raise ValueError("the images hold NaN or infinite values (a Dormand-Prince solve that gave up returns NaN; "
                         "raise SamplerOptions.max_steps); nothing was written")
    return to_uint8(images)


def part_paths(directory: str | pathlib.Path, name: str, process_index: int) -> tuple[pathlib.Path, pathlib.Path]:
    """``(npy path, index path)`` of process ``process_index``'s part of set ``name``."""
    stem = pathlib.Path(directory) / f"{name}_host{process_index:03d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def write_sample_part(directory: str | pathlib.Path, rows: np.ndarray, images: np.ndarray, *, total_rows: int,
                      name: str = "samples", process_index: int | None = None,
                      process_count: int | None = None) -> pathlib.Path:
    """Writes one process's part of a sample set: ``images`` (n, H, W, C), uint8 or float in [-1, 1] (converted
    by :func:`to_uint8`), which are the global rows ``rows`` (n,) of a set of ``total_rows``. Returns the index path.

    ``process_index`` / ``process_count`` default to this JAX process's; a sampling job that makes its set in
    several batches collects its :func:`local_rows` per batch (offsetting the rows) and writes once at the end.

    Raises:
      ValueError: rows and images disagree, rows outside [0, total_rows) or repeated, or non-finite images.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or len(rows) != len(images):
        raise ValueError(f"rows must be (n,) with n = len(images) = {len(images)}, got shape {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= total_rows or len(np.unique(rows)) != rows.size):
        raise ValueError(f"rows must be distinct and in [0, {total_rows}), got range [{rows.min()}, {rows.max()}] "
                         f"with {rows.size - len(np.unique(rows))} repeats")
    pixels = _as_pixels(images)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    array_path, index_path = part_paths(directory, name, process_index)
    index = {"format": FORMAT, "name": name, "file": array_path.name, "process_index": int(process_index),
             "process_count": int(process_count), "total_rows": int(total_rows),
             "shape": [int(n) for n in pixels.shape], "dtype": "uint8", "row_ranges": _row_ranges(rows)}
    _atomic_write(array_path, lambda handle: np.save(handle, np.ascontiguousarray(pixels)))
    _atomic_write(index_path, lambda handle: handle.write(json.dumps(index, indent=1).encode()))
    return index_path


def write_samples(directory: str | pathlib.Path, images: jax.Array, *, name: str = "samples") -> pathlib.Path:
    """Every process writes the rows of the global array ``images`` (N, H, W, C), sharded by rows, that its
    devices hold; call it on every process. No collective, no gather. Returns this process's index path."""
    rows, values = local_rows(images)
    return write_sample_part(directory, rows, values, total_rows=images.shape[0], name=name)


def _load_index(path: pathlib.Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SampleSetError(f"cannot read the sample index {path}: {error}") from error
    if index.get("format") != FORMAT:
        raise SampleSetError(f"{path} is not a sample index of this format ({FORMAT!r})")
    return index


def _describe(rows: np.ndarray, limit: int = 5) -> str:
    ranges = _row_ranges(rows)
    shown = ", ".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in ranges[:limit])
    return f"{rows.size} rows ({shown}{', ...' if len(ranges) > limit else ''})"


def read_samples(directory: str | pathlib.Path, *, name: str = "samples") -> np.ndarray:
    """All rows of sample set ``name`` in ``directory``, in global order: uint8 (N, H, W, C).

    Raises:
      FileNotFoundError: no part of the set exists.
      SampleSetError: parts from different runs, a part whose array disagrees with its index, rows that no part
        holds, or rows that two parts hold; the message names them.
    """
    directory = pathlib.Path(directory)
    index_paths = sorted(directory.glob(f"{name}_host[0-9][0-9][0-9]*.json"))
    if not index_paths:
        raise FileNotFoundError(f"no part of sample set {name!r} in {directory} (expected {name}_host000.json ...)")
    indexes = [_load_index(path) for path in index_paths]
    for key in ("total_rows", "process_count"):
        values = {path.name: index[key] for path, index in zip(index_paths, indexes)}
        if len(set(values.values())) > 1:
            raise SampleSetError(f"the parts of {name!r} in {directory} disagree on {key} ({values}): they come "
                                 "from different runs; delete the stale parts, or write each run to its own directory")
    total, process_count = indexes[0]["total_rows"], indexes[0]["process_count"]
    present = {index["process_index"] for index in indexes}
    if len(present) < process_count:
        absent = sorted(set(range(process_count)) - present)
        raise SampleSetError(f"sample set {name!r} in {directory} was written by {process_count} processes but the "
                             f"parts of processes {absent} are missing")
    image_shapes = {tuple(index["shape"][1:]) for index in indexes}
    if len(image_shapes) > 1:
        raise SampleSetError(f"the parts of {name!r} in {directory} hold images of different shapes {image_shapes}")

    coverage = np.zeros(total, np.int32)
    for path, index in zip(index_paths, indexes):
        for start, stop in index["row_ranges"]:
            coverage[start:stop] += 1
    if (coverage > 1).any():
        raise SampleSetError(f"parts of {name!r} in {directory} overlap: {_describe(np.flatnonzero(coverage > 1))} "
                             "are held twice; the directory mixes runs")
    if (coverage == 0).any():
        raise SampleSetError(f"sample set {name!r} in {directory} is incomplete: "
                             f"{_describe(np.flatnonzero(coverage == 0))} of {total} are in no part")

    samples = np.empty((total, *image_shapes.pop()), np.uint8)
    for path, index in zip(index_paths, indexes):
        array_path = directory / index["file"]
        try:
            part = np.load(array_path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise SampleSetError(f"cannot read {array_path}, a part of {name!r}: {error}") from error
        held = sum(stop - start for start, stop in index["row_ranges"])
        if part.dtype != np.uint8 or part.shape != (held, *samples.shape[1:]):
            raise SampleSetError(f"{array_path} holds {part.dtype} {part.shape} but its index {path.name} says uint8 "
                                 f"{(held, *samples.shape[1:])}; the part is damaged or from another run")
        offset = 0
        for start, stop in index["row_ranges"]:
            samples[start:stop] = part[offset:offset + stop - start]
            offset += stop - start
    return samples
