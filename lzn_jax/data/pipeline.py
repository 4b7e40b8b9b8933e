"""The input pipeline: source -> per-example transform -> per-host batch (grain) -> sharded global ``jax.Array``.

Entry point for a trainer::

    from lzn_jax import data
    batches = data.build_pipeline(config.data, sharding=NamedSharding(mesh, P("data")), start_step=step)
    batch = next(batches)               # {"image": uint8 (B, H, W, C) jax.Array, "label": int32 (B,)}
    images = data.to_float_images(batch["image"])   # float32 in [-1, 1], inside the jitted step
    checkpoint["data"] = batches.get_state()        # {"step": ..., ...}: all that resuming needs
    batches.set_state(restored["data"])             # or build_pipeline(..., start_step=restored step)

Order is a pure function of ``(data.seed, step)``. Epoch ``e`` visits the records in the order of a permutation
seeded by ``(seed, e)``; global batch ``s`` is the slice ``[k * B, (k + 1) * B)`` of the permutation of epoch
``s // S`` with ``k = s % S`` and ``S = N // B`` steps per epoch (the last ``N - S * B`` records of every epoch's
permutation are dropped, as the reference's sampler does; the count is logged). Host ``p`` of ``P`` takes rows
``[p * B / P, (p + 1) * B / P)`` of every global batch (with a sharding: the rows its devices hold), so hosts read
disjoint shards and ``jax.make_array_from_process_local_data`` reassembles the global batch in order. Every random
augmentation draws from a generator seeded by ``(seed, step, row in the global batch)``: the pixels, too, do not
depend on the number of hosts, on the number of grain workers or on where a run was resumed.

Batches by ``data.augmentation``:
  ``"none"`` / ``"flip"``: ``{"image": uint8 (B, S, S, C), "label": int32 (B,)}`` (no label for image folders);
    images not already ``image_size`` square are resized (shorter side, bilinear) and centre-cropped.
  ``"eval"``: Resize(``eval_resize_size``) -> CenterCrop(``image_size``), e.g. 256 -> 224.
  ``"two_view"``: ``{"views": uint8 (B, 2, S, S, 3), "label"}``; with ``augment_on="device"`` the views are only
    cropped and the batch also holds ``"augment"`` (per-view parameters, leading shape (B, 2)): call
    ``lzn_jax.data.augment.apply_photometric_device(batch["views"], batch["augment"])`` in the jitted step. With
    ``augment_on="host"`` the views are final and become model inputs through ``to_float_images``.

Config keys (``default_config()``; a ``data`` block of the experiment config):
  name: "digits" | "cifar10" | "imagenet2012" | "afhq_cat" | "celeba_hq" | "lsun_bedroom" | "image_folder".
  split: "train" | "test" (digits, cifar10) | "validation" (imagenet2012) | "all" (digits); folders ignore it.
  data_dir: TFDS data folder, or the root of an image folder data set (None: TFDS default).
  batch_size: global batch over all hosts. seed: data order and augmentation seed (separate from the model's).
  image_size: output side (digits: 16 or 32; 32 for CIFAR; 256 for the folders; 224 for ImageNet).
  num_channels: digits only, 1 or 3.
  augmentation: "none" | "flip" | "eval" | "two_view". flip_probability: 0.5. eval_resize_size: 256.
  augment_on: "host" | "device" (two_view only; see augment.py for the measurements behind the default).
  two_view: crop_scale, crop_ratio, jitter_strength, jitter_probability, grayscale_probability,
    blur_kernel_size, blur_sigma, blur_probability (reference values by default).
  shuffle: permute every epoch (False: file order, e.g. for evaluation).
  num_epochs: None for an endless stream, else the iterator stops after num_epochs * (N // batch_size) steps.
  num_workers: grain worker processes per host (0: in-process threads only). num_threads, prefetch_buffer_size:
    grain's per-process read threads and read-ahead in examples.
  max_bad_fraction: image folders stop with an error when more of their files than this do not decode.
"""

from __future__ import annotations

import logging

import grain
from absl import flags
import jax
import ml_collections
import numpy as np

from lzn_jax.data import augment, digits, folders, tfds_source, transforms

AUGMENTATIONS = ("none", "flip", "eval", "two_view")
# Streams of the per-example random generators; a new random use gets a new tag so old streams never shift.
_AUGMENT_STREAM = 1
_ENDLESS_STEPS = 2**40

logger = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The ``data`` block with every key the pipeline reads (documented in the module docstring)."""
    options = augment.TwoViewOptions()
    return ml_collections.ConfigDict(
        {
            "name": "digits",
            "split": "train",
            "data_dir": None,
            "batch_size": 128,
            "seed": 0,
            "image_size": 16,
            "num_channels": 1,
            "augmentation": "flip",
            "flip_probability": 0.5,
            "eval_resize_size": 256,
            "augment_on": "host",
            "two_view": {
                "crop_scale": options.crop_scale,
                "crop_ratio": options.crop_ratio,
                "jitter_strength": options.jitter_strength,
                "jitter_probability": options.jitter_probability,
                "grayscale_probability": options.grayscale_probability,
                "blur_kernel_size": options.blur_kernel_size,
                "blur_sigma": options.blur_sigma,
                "blur_probability": options.blur_probability,
            },
            "shuffle": True,
            "num_epochs": None,
            "num_workers": 0,
            "num_threads": 4,
            "prefetch_buffer_size": 256,
            "max_bad_fraction": 0.001,
        }
    )


def build_source(config: ml_collections.ConfigDict):
    """The random-access source of ``config.name``: ``len(source)`` and ``source[i] -> {"image", ["label"]}``."""
    name = config.name
    if name == "digits":
        return digits.digits_source(config.split, image_size=config.image_size, num_channels=config.num_channels)
    if name in tfds_source.TFDS_DATASETS:
        return tfds_source.tfds_source(name, config.split, config.data_dir)
    if name in folders.FOLDER_DATASETS:
        return folders.folder_source(name, config.data_dir, max_bad_fraction=config.max_bad_fraction)
    known = ["digits", *tfds_source.TFDS_DATASETS, *folders.FOLDER_DATASETS]
    raise ValueError(f"unknown data set data.name={name!r}; use one of {known}")


def epoch_permutation(num_records: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Record order of one epoch. Returns ``int64 (num_records,)``, a permutation seeded by ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(num_records)
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def example_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The augmentation generator of row ``row`` of global batch ``step``."""
    return np.random.default_rng([seed, _AUGMENT_STREAM, step, row])


def two_view_options(config: ml_collections.ConfigDict) -> augment.TwoViewOptions:
    """``TwoViewOptions`` from ``config.two_view`` with ``crop_size = config.image_size``."""
    options = config.two_view
    return augment.TwoViewOptions(
        crop_size=config.image_size,
        crop_scale=tuple(options.crop_scale),
        crop_ratio=tuple(options.crop_ratio),
        flip_probability=config.flip_probability,
        jitter_strength=tuple(options.jitter_strength),
        jitter_probability=options.jitter_probability,
        grayscale_probability=options.grayscale_probability,
        blur_kernel_size=options.blur_kernel_size,
        blur_sigma=tuple(options.blur_sigma),
        blur_probability=options.blur_probability,
    )


class ExampleTransform:
    """``(record, rng) -> example``: the per-example transform of ``config.augmentation`` (picklable for workers)."""

    def __init__(self, config: ml_collections.ConfigDict):
        if config.augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown data.augmentation={config.augmentation!r}; use one of {AUGMENTATIONS}")
        if config.augment_on not in ("host", "device"):
            raise ValueError(f"data.augment_on must be 'host' or 'device', got {config.augment_on!r}")
        self.augmentation = config.augmentation
        self.augment_on = config.augment_on
        self.image_size = config.image_size
        self.eval_resize_size = config.eval_resize_size
        self.flip_probability = config.flip_probability
        self.two_view = two_view_options(config)

    def _fit(self, image: np.ndarray) -> np.ndarray:
        if self.image_size is None or image.shape[:2] == (self.image_size, self.image_size):
            return image
        return transforms.resize_and_center_crop(image, self.image_size)

    def __call__(self, record: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = record["image"]
        example = {key: value for key, value in record.items() if key != "image"}
        if self.augmentation == "none":
            example["image"] = self._fit(image)
        elif self.augmentation == "flip":
            example["image"] = np.ascontiguousarray(
                transforms.random_horizontal_flip(self._fit(image), rng, probability=self.flip_probability)
            )
        elif self.augmentation == "eval":
            example["image"] = transforms.resize_and_center_crop(
                image, self.image_size, resize_to=self.eval_resize_size
            )
        else:
            if image.shape[-1] == 1:
                image = np.repeat(image, 3, axis=-1)
            if self.augment_on == "host":
                example["views"] = augment.two_view_host(image, rng, self.two_view)
            else:
                example["views"], example["augment"] = augment.two_view_crops(image, rng, self.two_view)
        return example


class _ExampleLoader:
    """Maps a host-local example number to its transformed example (the pure function of (seed, step))."""

    def __init__(self, source, transform, *, seed, shuffle, global_batch_size, rows):
        self.source, self.transform = source, transform
        self.seed, self.shuffle = seed, shuffle
        self.global_batch_size = global_batch_size
        self.rows = rows  # the rows of every global batch that this host reads, ascending
        self.local_batch_size = len(rows)
        self.steps_per_epoch = len(source) // global_batch_size
        self._permutations: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_permutations"] = {}
        return state

    def _permutation(self, epoch: int) -> np.ndarray:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            permutation = epoch_permutation(len(self.source), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
            self._permutations = {epoch: permutation, **{e: p for e, p in self._permutations.items() if e > epoch - 2}}
        return permutation

    def source_index(self, step: int, row: int) -> int:
        """Index into the source of row ``row`` (global numbering) of global batch ``step``."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        return int(self._permutation(epoch)[step_in_epoch * self.global_batch_size + row])

    def __call__(self, local_number: int) -> dict[str, np.ndarray]:
        step, local_row = divmod(int(local_number), self.local_batch_size)
        row = int(self.rows[local_row])
        record = self.source[self.source_index(step, row)]
        return self.transform(record, example_rng(self.seed, step, row))


def _check_batch_sizes(num_records: int, global_batch_size: int, process_count: int) -> None:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"data.batch_size={global_batch_size} must be a positive multiple of the process count {process_count}"
        )
    if num_records < global_batch_size:
        raise ValueError(
            f"the data set has {num_records} examples, fewer than one global batch of {global_batch_size}; "
            "lower data.batch_size"
        )


def host_rows(
    global_batch_size: int, sharding: jax.sharding.Sharding | None, *, process_index: int, process_count: int
) -> np.ndarray:
    """Rows of every global batch that this host reads, ascending. Returns ``int64 (B_local,)``.

    Without a sharding: the contiguous block ``[p * B / P, (p + 1) * B / P)``. With one: the union of the rows of
    this process's devices, in the order ``make_array_from_process_local_data`` expects (ascending), so a mesh
    whose device order interleaves hosts still gets each row from the host that holds it.
    """
    if sharding is None:
        local = global_batch_size // process_count
        return np.arange(process_index * local, (process_index + 1) * local)
    rank = len(sharding.spec) if isinstance(sharding, jax.sharding.NamedSharding) else 1
    trailing = (1,) * max(rank - 1, 0)
    # The number of batch shards, probed with a length every shard count of the mesh divides.
    probe = sharding.num_devices
    num_shards = len({index[0].indices(probe) for index in sharding.devices_indices_map((probe,) + trailing).values()})
    if global_batch_size % num_shards:
        raise ValueError(
            f"data.batch_size={global_batch_size} does not split evenly over the {num_shards} batch shards of the "
            f"sharding; use a multiple of {num_shards}"
        )
    shape = (global_batch_size,) + trailing
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    return np.array(sorted(rows), dtype=np.int64)


class GlobalBatchIterator:
    """Iterator of global batches with a checkpointable position (see the module docstring)."""

    def __init__(self, config, *, source, sharding, process_index, process_count, start_step):
        self.config, self.source, self.sharding = config, source, sharding
        self.process_index, self.process_count = process_index, process_count
        self.global_batch_size = config.batch_size
        _check_batch_sizes(len(source), self.global_batch_size, process_count)
        self.rows = host_rows(
            self.global_batch_size, sharding, process_index=process_index, process_count=process_count
        )
        self.local_batch_size = len(self.rows)
        self.steps_per_epoch = len(source) // self.global_batch_size
        dropped = len(source) - self.steps_per_epoch * self.global_batch_size
        if dropped:
            logger.warning(
                "data %s/%s: %d examples, global batch %d -> %d steps per epoch; the last %d examples of every "
                "epoch's order are dropped",
                config.name, config.split, len(source), self.global_batch_size, self.steps_per_epoch, dropped,
            )
        self.num_steps = (
            _ENDLESS_STEPS if config.num_epochs is None else int(config.num_epochs) * self.steps_per_epoch
        )
        self._loader = _ExampleLoader(
            source, ExampleTransform(config), seed=config.seed, shuffle=config.shuffle,
            global_batch_size=self.global_batch_size, rows=self.rows,
        )
        self._start(start_step)

    def _start(self, step: int) -> None:
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"data step {step} is outside the {self.num_steps} steps of this pipeline")
        self.step = step
        dataset = (
            grain.MapDataset.range(step * self.local_batch_size, self.num_steps * self.local_batch_size)
            .map(self._loader)
            .batch(self.local_batch_size, drop_remainder=True)
            .to_iter_dataset(
                grain.ReadOptions(
                    num_threads=self.config.num_threads, prefetch_buffer_size=self.config.prefetch_buffer_size
                )
            )
        )
        if self.config.num_workers > 0:
            # grain's worker processes read absl flags; outside an absl app (notebooks, tests) nobody parsed them.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.config.num_workers))
        self._iterator = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self):
        host_batch = next(self._iterator)
        self.step += 1
        if self.sharding is None:
            return host_batch
        return jax.tree.map(self._to_global_array, host_batch)

    def _to_global_array(self, local: np.ndarray) -> jax.Array:
        global_shape = (self.global_batch_size,) + local.shape[1:]
        return jax.make_array_from_process_local_data(self.sharding, local, global_shape)

    def _fingerprint(self) -> dict:
        return {
            "name": self.config.name,
            "seed": int(self.config.seed),
            "global_batch_size": int(self.global_batch_size),
            "num_records": int(len(self.source)),
        }

    def get_state(self) -> dict:
        """What a checkpoint stores: the next step plus the settings that fix the order (checked on restore)."""
        return {"step": int(self.step), **self._fingerprint()}

    def set_state(self, state: dict) -> None:
        """Continues from a ``get_state()`` result; refuses a state taken with a different order."""
        mismatched = {k: (v, state.get(k)) for k, v in self._fingerprint().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(
                "the checkpointed data state was taken with other data settings (now, checkpoint): "
                f"{mismatched}; restore with the same data.name, data.seed and data.batch_size and data set"
            )
        self._start(int(state["step"]))


def build_pipeline(
    config: ml_collections.ConfigDict,
    *,
    sharding: jax.sharding.Sharding | None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
) -> GlobalBatchIterator:
    """Builds the iterator of global batches of ``config`` (a ``data`` block), starting at ``start_step``.

    Args:
      sharding: how to place each global batch (it must split only the leading batch axis, e.g.
        ``NamedSharding(mesh, P("data"))``); ``None`` yields this host's numpy batches instead.
      process_index, process_count: this host and the host count (default: jax's); tests simulate hosts with them.
      start_step: the first global step to produce (a resumed run passes its checkpointed step).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if sharding is not None and process_count != jax.process_count():
        raise ValueError(
            f"process_count={process_count} differs from jax.process_count()={jax.process_count()}: global arrays "
            "need the real host count (pass sharding=None to simulate hosts)"
        )
    source = build_source(config)
    return GlobalBatchIterator(
        config, source=source, sharding=sharding, process_index=process_index, process_count=process_count,
        start_step=start_step,
    )
