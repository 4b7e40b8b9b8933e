"""The input pipelines: source -> per-example transform -> per-host batch (grain) -> sharded global ``jax.Array``.

``build_pipeline`` streams training batches; ``build_eval_pipeline`` makes one padded, masked pass over a split.
"""

from __future__ import annotations

import logging
from typing import Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from lzn_jax.data import augment, digits, folders, tfds_source, transforms
from lzn_jax.data.config import check_config, default_config
from lzn_jax.data.device import model_inputs_fn
from lzn_jax.data.sources import Source, check_source
from lzn_jax.parallel.sharding import host_rows

__all__ = [
    "EvalBatches",
    "ExampleTransform",
    "TrainBatches",
    "build_eval_pipeline",
    "build_pipeline",
    "build_source",
    "default_config",
    "epoch_permutation",
    "eval_num_batches",
    "example_rng",
    "two_view_options",
]

# Streams of the per-example random generators; a new random use gets a new tag so old streams never shift.
_AUGMENT_STREAM = 1
_ENDLESS_STEPS = 2**40

logger = logging.getLogger(__name__)


def build_source(config: ml_collections.ConfigDict) -> Source:
    """The source of data set ``config.name`` (split ``config.split``, under ``config.data_dir``)."""
    name = config.name
    if name == "digits":
        return digits.digits_source(config.split, image_size=config.image_size, num_channels=config.num_channels)
    if name in tfds_source.TFDS_DATASETS:
        return tfds_source.tfds_source(name, config.split, config.data_dir)
    if name in folders.FOLDER_DATASETS:
        return folders.folder_source(name, config.data_dir, max_bad_fraction=config.max_bad_fraction)
    known = ["digits", *tfds_source.TFDS_DATASETS, *folders.FOLDER_DATASETS]
    raise ValueError(f"unknown data set data.name={name!r}; use one of {known}")


# ---------------------------------------------------------------------------------------------------------------
# Order and randomness: pure functions of (seed, epoch) and (seed, step, row), never of hosts or workers.
# ---------------------------------------------------------------------------------------------------------------


def epoch_permutation(num_records: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Record order of one training epoch: ``int64 (num_records,)``, a permutation seeded by ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(num_records)
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def example_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The augmentation generator of row ``row`` of global batch ``step``."""
    return np.random.default_rng([seed, _AUGMENT_STREAM, step, row])


# ---------------------------------------------------------------------------------------------------------------
# The per-example transform.
# ---------------------------------------------------------------------------------------------------------------


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
    """``(record, rng) -> example``: the per-example transform of ``config.augmentation`` (picklable for workers).

    Examples: ``{"image": uint8 (S, S, C), ...}`` for "none" and "flip"; ``{"views": uint8 (2, S, S, 3), ...}``
    for "two_view", plus ``"augment"`` (per-view photometric parameters, leading shape (2,)) when they are left to
    the device. Other record keys (``"label"``) pass through.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        check_config(config)
        self.augmentation = config.augmentation
        self.augment_on = config.augment_on
        self.image_size = config.image_size
        self.resize_size = config.resize_size
        self.flip_probability = config.flip_probability
        self.two_view = two_view_options(config)

    def _fit(self, image: np.ndarray) -> np.ndarray:
        if self.image_size is None:
            return image
        return transforms.resize_and_center_crop(image, self.image_size, resize_to=self.resize_size)

    def __call__(self, record: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = record["image"]
        example = {key: value for key, value in record.items() if key != "image"}
        if self.augmentation == "none":
            example["image"] = self._fit(image)
        elif self.augmentation == "flip":
            example["image"] = np.ascontiguousarray(
                transforms.random_horizontal_flip(self._fit(image), rng, probability=self.flip_probability)
            )
        else:
            if image.shape[-1] == 1:
                image = np.repeat(image, 3, axis=-1)
            if self.augment_on == "host":
                example["views"] = augment.two_view_host(image, rng, self.two_view)
            else:
                example["views"], example["augment"] = augment.two_view_crops(image, rng, self.two_view)
        return example


# ---------------------------------------------------------------------------------------------------------------
# Host-local example number -> example (what grain maps over; picklable for worker processes).
# ---------------------------------------------------------------------------------------------------------------


def _global_position(local_number: int, rows: np.ndarray) -> tuple[int, int]:
    """``(step, row)``: host-local example ``local_number`` is row ``row`` of global batch ``step``."""
    step, local_row = divmod(int(local_number), len(rows))
    return step, int(rows[local_row])


class _TrainExamples:
    """Row ``row`` of global batch ``s`` is record ``permutation(e)[k * B + row]``, where ``e, k = divmod(s, S)``."""

    def __init__(self, source, transform, *, seed, shuffle, global_batch_size, rows):
        self.source, self.transform = source, transform
        self.seed, self.shuffle = seed, shuffle
        self.global_batch_size = global_batch_size
        self.rows = rows
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
            # Keep two epochs: grain's read-ahead straddles an epoch boundary.
            self._permutations = {epoch: permutation, **{e: p for e, p in self._permutations.items() if e > epoch - 2}}
        return permutation

    def source_index(self, step: int, row: int) -> int:
        """Index into the source of row ``row`` (global numbering) of global batch ``step``."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        return int(self._permutation(epoch)[step_in_epoch * self.global_batch_size + row])

    def __call__(self, local_number: int) -> dict[str, np.ndarray]:
        step, row = _global_position(local_number, self.rows)
        record = self.source[self.source_index(step, row)]
        return self.transform(record, example_rng(self.seed, step, row))


class _EvalExamples:
    """Row ``row`` of global batch ``s`` is record ``s * B + row`` (file order), or padding past the last record."""

    def __init__(self, source, transform, *, seed, global_batch_size, rows):
        self.source, self.transform = source, transform
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.rows = rows
        self._padding = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_padding"] = None
        return state

    def _padding_example(self) -> dict:
        """Zeros with the shapes of an example (those of record 0), made once per process."""
        if self._padding is None:
            example = self.transform(self.source[0], example_rng(self.seed, 0, 0))
            self._padding = jax.tree.map(np.zeros_like, example)
        return self._padding

    def __call__(self, local_number: int) -> dict[str, np.ndarray]:
        step, row = _global_position(local_number, self.rows)
        position = step * self.global_batch_size + row
        if position < len(self.source):
            example = self.transform(self.source[position], example_rng(self.seed, step, row))
        else:
            example = dict(self._padding_example())
        example["mask"] = np.bool_(position < len(self.source))
        return example


# ---------------------------------------------------------------------------------------------------------------
# Per-host batches (grain) and global arrays.
# ---------------------------------------------------------------------------------------------------------------


def _allow_grain_workers_outside_absl() -> None:
    """Lets grain start worker processes when no absl app has parsed the command line (notebooks, tests).

    grain reads one of its absl flags (``--grain_enable_multiprocess_worker_profiling``) when it starts workers,
    and absl refuses to read any flag before the command line is parsed. Under ``absl.app.run`` (``lzn_jax.main``)
    flags are parsed and this does nothing. Elsewhere it marks them parsed, so every flag keeps its default.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _host_batches(examples, *, first_step: int, stop_step: int, local_batch_size: int, config) -> Iterator[dict]:
    """This host's batches of global steps ``[first_step, stop_step)``: ``examples`` mapped and batched by grain."""
    dataset = (
        grain.MapDataset.range(first_step * local_batch_size, stop_step * local_batch_size)
        .map(examples)
        .batch(local_batch_size, drop_remainder=True)
        .to_iter_dataset(
            grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size)
        )
    )
    if config.num_workers > 0:
        _allow_grain_workers_outside_absl()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return iter(dataset)


def _to_global_arrays(host_batch: dict, sharding: jax.sharding.Sharding, global_batch_size: int) -> dict:
    """Every leaf ``(B_local, ...)`` of this host becomes a global ``jax.Array`` ``(B, ...)`` placed by ``sharding``."""
    return jax.tree.map(
        lambda local: jax.make_array_from_process_local_data(sharding, local, (global_batch_size,) + local.shape[1:]),
        host_batch,
    )


def _rows_of_this_host(config, sharding, *, process_index: int, process_count: int) -> np.ndarray:
    rows = host_rows(config.batch_size, sharding, process_index=process_index, process_count=process_count)
    if len(rows) == 0:
        raise ValueError(
            f"process {process_index} holds no device of the batch sharding, so it would read no rows; "
            "shard the batch over devices of every process"
        )
    return rows


class TrainBatches:
    """Endless (or ``num_epochs``-long) iterator of training batches with a checkpointable position.

    Global batch ``s`` is the slice ``[k B, (k + 1) B)`` of the permutation of epoch ``s // S`` (``k = s % S``,
    ``S = N // B`` steps per epoch; the last ``N - S B`` records of every epoch's order are dropped, as the
    reference's sampler does, and the count is logged). Host ``p`` reads only its rows of each global batch
    (``lzn_jax.parallel.sharding.host_rows``), and every random choice comes from ``example_rng(seed, s, row)``:
    the batches do not depend on the number of hosts or grain workers, or on where a run was resumed.

    Yields ``{"image": uint8 (B, H, W, C), ["label": int32 (B,)]}`` or the two-view keys (``ExampleTransform``),
    as numpy arrays of this host's ``B_local`` rows without a sharding, else as global ``jax.Array``s.
    ``to_model_inputs`` is ``model_inputs_fn(config)``.
    """

    def __init__(self, config, *, source, sharding, process_index, process_count, start_step):
        check_config(config)
        check_source(source)
        self.config, self.source, self.sharding = config, source, sharding
        self.global_batch_size = config.batch_size
        self.rows = _rows_of_this_host(config, sharding, process_index=process_index, process_count=process_count)
        if len(source) < self.global_batch_size:
            raise ValueError(
                f"the data set has {len(source)} examples, fewer than one global batch of {self.global_batch_size}; "
                "lower data.batch_size"
            )
        self.local_batch_size = len(self.rows)
        self.steps_per_epoch = len(source) // self.global_batch_size
        dropped = len(source) - self.steps_per_epoch * self.global_batch_size
        if dropped:
            logger.warning(
                "data %s/%s: %d examples, global batch %d -> %d steps per epoch; the last %d examples of every "
                "epoch's order are dropped (evaluation passes, build_eval_pipeline, keep them)",
                config.name, config.split, len(source), self.global_batch_size, self.steps_per_epoch, dropped,
            )
        self.num_steps = (
            _ENDLESS_STEPS if config.num_epochs is None else int(config.num_epochs) * self.steps_per_epoch
        )
        self.to_model_inputs = model_inputs_fn(config)
        self._examples = _TrainExamples(
            source, ExampleTransform(config), seed=config.seed, shuffle=config.shuffle,
            global_batch_size=self.global_batch_size, rows=self.rows,
        )
        self._start(start_step)

    def _start(self, step: int) -> None:
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"data step {step} is outside the {self.num_steps} steps of this pipeline")
        self.step = step
        self._iterator = _host_batches(
            self._examples, first_step=step, stop_step=self.num_steps, local_batch_size=self.local_batch_size,
            config=self.config,
        )

    def __iter__(self):
        return self

    def __next__(self):
        host_batch = next(self._iterator)
        self.step += 1
        if self.sharding is None:
            return host_batch
        return _to_global_arrays(host_batch, self.sharding, self.global_batch_size)

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


def eval_num_batches(num_records: int, global_batch_size: int) -> int:
    """Global batches of one evaluation pass: ``ceil(N / B)``, the last one padded. The same on every host."""
    return -(-num_records // global_batch_size)


class EvalBatches:
    """One pass over a split in file order, every record exactly once; iterating again starts a new pass.

    Global batch ``s`` holds records ``[s B, (s + 1) B)``; the rows past the last record are padding (zeros of an
    example's shapes). Every batch also holds ``"mask"`` bool ``(B,)``, False exactly on padding: sum a metric
    over ``mask`` and divide by ``num_examples``. All hosts see ``len(self)`` batches, so collectives in the
    evaluation step line up; each host reads only its own rows. Shuffling and ``num_epochs`` do not apply; random
    augmentations, if configured, draw from ``example_rng(seed, s, row)`` as in training.
    """

    def __init__(self, config, *, source, sharding, process_index, process_count):
        check_config(config)
        check_source(source)
        self.config, self.source, self.sharding = config, source, sharding
        self.global_batch_size = config.batch_size
        self.rows = _rows_of_this_host(config, sharding, process_index=process_index, process_count=process_count)
        self.local_batch_size = len(self.rows)
        self.num_examples = len(source)
        self.num_batches = eval_num_batches(self.num_examples, self.global_batch_size)
        self.to_model_inputs = model_inputs_fn(config)
        self._examples = _EvalExamples(
            source, ExampleTransform(config), seed=config.seed, global_batch_size=self.global_batch_size,
            rows=self.rows,
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        batches = _host_batches(
            self._examples, first_step=0, stop_step=self.num_batches, local_batch_size=self.local_batch_size,
            config=self.config,
        )
        for host_batch in batches:
            yield host_batch if self.sharding is None else _to_global_arrays(
                host_batch, self.sharding, self.global_batch_size
            )


# ---------------------------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------------------------


def _processes(sharding, process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """This host and the host count: jax's unless given; a sharding needs the real count."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if sharding is not None and process_count != jax.process_count():
        raise ValueError(
            f"process_count={process_count} differs from jax.process_count()={jax.process_count()}: global arrays "
            "need the real host count (pass sharding=None to simulate hosts)"
        )
    return process_index, process_count


def build_pipeline(
    config: ml_collections.ConfigDict,
    *,
    sharding: jax.sharding.Sharding | None = None,
    source: Source | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
) -> TrainBatches:
    """The training batches of data config ``config``, from global step ``start_step`` on.

    In a trainer::

        batches = data.build_pipeline(config.data, sharding=NamedSharding(mesh, P("data")), start_step=step)
        batch = next(batches)                      # {"image": uint8 (B, H, W, C) jax.Array, "label": int32 (B,)}
        inputs = batches.to_model_inputs(batch)    # inside the jitted step: float32 in [-1, 1]
        checkpoint["data"] = batches.get_state()   # JSON-able; batches.set_state(...) resumes

    Args:
      sharding: how to place each global batch (it must split only the leading batch axis, e.g.
        ``NamedSharding(mesh, P("data"))``); ``None`` yields this host's numpy batches (a notebook's default).
      source: records to read instead of data set ``config.name`` (e.g. an ``ArraySource`` in a notebook).
      process_index, process_count: this host and the host count (default: jax's); tests simulate hosts with them.
      start_step: the first global step to produce (a resumed run passes its checkpointed step).
    """
    process_index, process_count = _processes(sharding, process_index, process_count)
    return TrainBatches(
        config, source=build_source(config) if source is None else source, sharding=sharding,
        process_index=process_index, process_count=process_count, start_step=start_step,
    )


def build_eval_pipeline(
    config: ml_collections.ConfigDict,
    *,
    sharding: jax.sharding.Sharding | None = None,
    source: Source | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalBatches:
    """One padded, masked pass over the split of ``config``, for FID statistics, accuracies and linear probes.

    In an evaluator::

        passes = data.build_eval_pipeline(eval_data_config, sharding=NamedSharding(mesh, P("data")))
        for batch in passes:                       # len(passes) batches on every host
            inputs = passes.to_model_inputs(batch)
            correct += jnp.sum((predict(inputs) == inputs["label"]) & inputs["mask"])
        accuracy = correct / passes.num_examples

    Arguments as ``build_pipeline``'s.
    """
    process_index, process_count = _processes(sharding, process_index, process_count)
    return EvalBatches(
        config, source=build_source(config) if source is None else source, sharding=sharding,
        process_index=process_index, process_count=process_count,
    )
