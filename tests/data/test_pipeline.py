"""Pipeline order, resumption, host sharding and global arrays, checked against independent computations."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lzn_jax.data import augment, device, digits, pipeline, sources


def _config(**overrides):
    config = pipeline.default_config()
    config.image_size = 8
    config.batch_size = 10
    config.num_threads = 2
    config.prefetch_buffer_size = 16
    config.update(overrides)
    return config


def _numbered_source(num_records=103, size=8):
    """Records whose label is their index and whose image is random (so flips are visible)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num_records, size, size, 3), dtype=np.uint8)
    return sources.ArraySource(images, np.arange(num_records, dtype=np.int32))


def _iterator(config, source, *, process_index=0, process_count=1, start_step=0, sharding=None):
    return pipeline.build_pipeline(
        config, source=source, sharding=sharding, process_index=process_index, process_count=process_count,
        start_step=start_step,
    )


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same(expected, got):
    """Equal pytrees of arrays: same keys, same values (also the augmentation parameters of two-view batches)."""
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Both random transforms: a flip, and the two-view crops whose photometric parameters travel in the batch.
RANDOM_AUGMENTATIONS = [{"augmentation": "flip"}, {"augmentation": "two_view", "augment_on": "device"}]


def test_each_epoch_visits_every_kept_record_once_and_logs_the_dropped_rest(caplog):
    source = _numbered_source(103)
    with caplog.at_level(logging.WARNING):
        batches = _take(_iterator(_config(augmentation="none"), source), 20)
    assert "the last 3 examples" in caplog.text
    epochs = [np.concatenate([b["label"] for b in batches[e * 10 : (e + 1) * 10]]) for e in range(2)]
    for labels in epochs:
        assert len(np.unique(labels)) == 100 and labels.min() >= 0 and labels.max() < 103
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    for batch in batches:
        np.testing.assert_array_equal(batch["image"], source.images[batch["label"]])


def test_unshuffled_order_is_the_file_order():
    batches = _take(_iterator(_config(augmentation="none", shuffle=False), _numbered_source(103)), 11)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches[:10]]), np.arange(100))
    np.testing.assert_array_equal(batches[10]["label"], np.arange(10))  # epoch 2 restarts, 100..102 dropped


def test_order_depends_only_on_the_seed():
    source = _numbered_source()
    first = _take(_iterator(_config(seed=3), source), 12)
    again = _take(_iterator(_config(seed=3, num_threads=1), source), 12)
    other = _take(_iterator(_config(seed=4), source), 12)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert any(not np.array_equal(a["label"], c["label"]) for a, c in zip(first, other))


@pytest.mark.parametrize("augmentation", RANDOM_AUGMENTATIONS, ids=["flip", "two_view"])
@pytest.mark.parametrize("resume_step", [7, 10, 13])
def test_resumed_run_sees_the_batches_of_an_uninterrupted_run(resume_step, augmentation):
    source = _numbered_source()
    config = _config(**augmentation)
    uninterrupted = _take(_iterator(config, source), 24)
    interrupted = _iterator(config, source)
    _take(interrupted, resume_step)
    state = interrupted.get_state()
    assert state["step"] == resume_step
    restored = _iterator(config, source)  # a new process: fresh pipeline, then the checkpointed state
    restored.set_state(state)
    by_start_step = _iterator(config, source, start_step=resume_step)
    for expected, got, got_too in zip(uninterrupted[resume_step:], _take(restored, 24 - resume_step),
                                      _take(by_start_step, 24 - resume_step)):
        _assert_same(expected, got)
        _assert_same(expected, got_too)


def test_flip_is_applied_to_about_half_the_examples_and_is_a_mirror():
    source = _numbered_source()
    batches = _take(_iterator(_config(augmentation="flip"), source), 30)
    flipped = 0
    for batch in batches:
        for image, label in zip(batch["image"], batch["label"]):
            original = source.images[label]
            if np.array_equal(image, original[:, ::-1]):
                flipped += 1
            else:
                np.testing.assert_array_equal(image, original)
    assert 110 <= flipped <= 190  # 300 fair coins: mean 150, sd 8.7; the bounds are 4.6 sd


def test_a_record_seen_again_in_a_later_epoch_gets_fresh_random_choices():
    source = _numbered_source(100)
    batches = _take(_iterator(_config(augmentation="flip", shuffle=False), source), 20)
    first = np.concatenate([b["image"] for b in batches[:10]])  # without shuffling, epoch 2 repeats the rows
    second = np.concatenate([b["image"] for b in batches[10:]])
    differently_flipped = sum(not np.array_equal(a, b) for a, b in zip(first, second))
    assert 25 <= differently_flipped <= 75  # 100 fair coins: mean 50, sd 5


@pytest.mark.parametrize("augmentation", RANDOM_AUGMENTATIONS, ids=["flip", "two_view"])
def test_two_simulated_hosts_read_disjoint_shards_that_rebuild_the_global_batch(augmentation):
    source = _numbered_source()
    config = _config(batch_size=10, **augmentation)
    single = _take(_iterator(config, source), 10)
    hosts = [_take(_iterator(config, source, process_index=p, process_count=2), 10) for p in range(2)]
    seen = []
    for step in range(10):
        host0, host1 = hosts[0][step], hosts[1][step]
        assert host0["label"].shape == (5,)
        assert not set(host0["label"]) & set(host1["label"])
        # Augmentation too is independent of the host count.
        _assert_same(single[step], jax.tree.map(lambda a, b: np.concatenate([a, b]), host0, host1))
        seen.extend(host0["label"].tolist() + host1["label"].tolist())
    assert len(set(seen)) == 100  # the two shards cover the epoch


def test_host_two_view_batches_use_the_generator_of_their_step_and_row():
    source = _numbered_source(40, size=12)
    config = _config(augmentation="two_view", augment_on="host", image_size=10, batch_size=4, seed=9)
    options = pipeline.two_view_options(config)
    for step, batch in enumerate(_take(_iterator(config, source, start_step=11), 2), start=11):
        assert batch["views"].shape == (4, 2, 10, 10, 3) and batch["views"].dtype == np.uint8
        for row, (views, label) in enumerate(zip(batch["views"], batch["label"])):
            expected = augment.two_view_host(source.images[label], pipeline.example_rng(9, step, row), options)
            np.testing.assert_array_equal(views, expected)


def _data_sharding(order=tuple(range(8))):
    devices = np.array(jax.devices())[list(order)]
    assert len(devices) == 8
    return NamedSharding(jax.sharding.Mesh(devices, ("data",)), PartitionSpec("data"))


@pytest.mark.parametrize("order", [tuple(range(8)), (3, 0, 7, 1, 6, 2, 5, 4)], ids=["in_order", "permuted_mesh"])
def test_global_batches_are_sharded_arrays_with_each_device_holding_its_rows(order):
    sharding = _data_sharding(order)
    source = _numbered_source(100)
    config = _config(augmentation="flip", batch_size=16)
    host = _take(_iterator(config, source), 2)
    global_batches = _take(_iterator(config, source, sharding=sharding), 2)
    for expected, batch in zip(host, global_batches):
        assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (16, 8, 8, 3)
        assert batch["image"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(batch["image"]), expected["image"])
        for shard in batch["label"].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expected["label"][shard.index])
            assert shard.data.shape == (2,)
        floats = jax.jit(device.to_float_images)(batch["image"])
        assert floats.sharding.is_equivalent_to(sharding, 4)
        np.testing.assert_allclose(np.asarray(floats), expected["image"] / 255.0 * 2.0 - 1.0, atol=1e-6)


def test_device_two_view_batches_finish_on_device_as_the_host_variant_does():
    source = _numbered_source(40, size=12)
    device_config = _config(augmentation="two_view", augment_on="device", image_size=10, batch_size=8)
    host_config = _config(augmentation="two_view", augment_on="host", image_size=10, batch_size=8)
    batches = _iterator(device_config, source, sharding=_data_sharding())
    batch = next(batches)
    assert batch["augment"]["sigma"].shape == (8, 2) and batch["augment"]["flip"].dtype == bool
    inputs = jax.jit(batches.to_model_inputs)(batch)
    assert set(inputs) == {"views", "label"}  # the parameters are used up
    views = inputs["views"]
    assert views.shape == (8, 2, 10, 10, 3) and len(views.sharding.device_set) == 8
    host_views = next(_iterator(host_config, source))["views"]
    # The host variant rounds to uint8 once at the end; the device variant keeps floats.
    np.testing.assert_allclose((np.asarray(views) + 1.0) * 127.5, host_views, atol=0.5 + 1e-3)


def test_build_pipeline_reads_digits_by_name():
    config = _config(name="digits", image_size=16, batch_size=64, augmentation="none", shuffle=False, num_epochs=1)
    batches = list(pipeline.build_pipeline(config, sharding=None))
    images, labels = digits.load_digits_split("train")
    assert len(batches) == 1438 // 64
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images[: 22 * 64])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels[: 22 * 64])


def test_two_workers_give_the_same_batches_as_in_process_reading():
    source = _numbered_source()
    expected = _take(_iterator(_config(augmentation="flip"), source), 6)
    got = _take(_iterator(_config(augmentation="flip", num_workers=2), source), 6)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_bad_settings_fail_with_clear_messages():
    source = _numbered_source(103)
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        _iterator(_config(batch_size=10), source, process_count=3)
    with pytest.raises(ValueError, match="does not split evenly over the 8 batch shards"):
        _iterator(_config(batch_size=12), source, sharding=_data_sharding())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _iterator(_config(batch_size=200), source)
    with pytest.raises(ValueError, match="augmentation"):
        _iterator(_config(augmentation="mixup"), source)
    with pytest.raises(ValueError, match="unknown data set"):
        pipeline.build_pipeline(_config(name="mnist"), sharding=None)
    iterator = _iterator(_config(seed=1), source)
    state = iterator.get_state()
    with pytest.raises(ValueError, match="seed"):
        _iterator(_config(seed=2), source).set_state(state)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation passes: every record exactly once, padded and masked, the same on any number of hosts.
# ---------------------------------------------------------------------------------------------------------------


def _eval_batches(config, source, *, process_index=0, process_count=1, sharding=None):
    return pipeline.build_eval_pipeline(
        config, source=source, sharding=sharding, process_index=process_index, process_count=process_count
    )


def _concatenate_hosts(host_batches):
    return jax.tree.map(lambda *parts: np.concatenate(parts), *host_batches)


@pytest.mark.parametrize(
    "num_records, process_count",
    [(23, 2), (17, 3), (19, 3), (24, 3), (4, 2)],
    ids=["2_hosts", "3_hosts", "3_hosts_two_all_padding", "3_hosts_no_padding", "fewer_records_than_a_batch"],
)
def test_eval_pass_visits_every_record_once_over_simulated_hosts(num_records, process_count):
    source = _numbered_source(num_records)
    config = _config(augmentation="none", batch_size=6)
    num_batches = -(-num_records // 6)
    hosts = [_eval_batches(config, source, process_index=p, process_count=process_count) for p in range(process_count)]
    assert [len(host) for host in hosts] == [num_batches] * process_count
    per_host = [list(host) for host in hosts]
    assert [len(batches) for batches in per_host] == [num_batches] * process_count
    seen = []
    for step in range(num_batches):
        assert {per_host[p][step]["mask"].shape for p in range(process_count)} == {(6 // process_count,)}
        batch = _concatenate_hosts([per_host[p][step] for p in range(process_count)])
        mask, labels = batch["mask"], batch["label"]
        assert mask.dtype == bool and mask.shape == (6,)
        # File order, and padding only after the last record.
        positions = np.arange(step * 6, (step + 1) * 6)
        np.testing.assert_array_equal(mask, positions < num_records)
        np.testing.assert_array_equal(labels[mask], positions[mask])
        np.testing.assert_array_equal(batch["image"][mask], source.images[labels[mask]])
        assert not batch["image"][~mask].any() and not labels[~mask].any()
        seen.extend(labels[mask].tolist())
    assert sorted(seen) == list(range(num_records))  # every record exactly once, the last partial batch kept


def test_eval_batches_do_not_depend_on_the_host_count_even_with_random_augmentation():
    source = _numbered_source(29, size=12)
    config = _config(augmentation="two_view", augment_on="device", image_size=8, batch_size=6)
    single = list(_eval_batches(config, source))
    three_hosts = [list(_eval_batches(config, source, process_index=p, process_count=3)) for p in range(3)]
    assert len(single) == 5
    for step, expected in enumerate(single):
        _assert_same(expected, _concatenate_hosts([host[step] for host in three_hosts]))
    last = single[-1]
    np.testing.assert_array_equal(last["mask"], [True, True, True, True, True, False])
    assert not last["views"][5].any() and not last["augment"]["sigma"][5].any()
    inputs = jax.jit(_eval_batches(config, source).to_model_inputs)(last)
    assert set(inputs) == {"views", "label", "mask"} and inputs["views"].shape == (6, 2, 8, 8, 3)
    assert bool(jax.numpy.isfinite(inputs["views"]).all())


def test_a_second_iteration_starts_a_new_identical_pass():
    source = _numbered_source(13)
    batches = _eval_batches(_config(augmentation="flip", batch_size=4), source)
    first, second = list(batches), list(batches)
    assert len(first) == len(second) == 4
    for a, b in zip(first, second):
        _assert_same(a, b)


def test_sharded_eval_batches_count_every_record_once_on_device():
    sharding = _data_sharding((3, 0, 7, 1, 6, 2, 5, 4))
    source = _numbered_source(37)
    batches = _eval_batches(_config(augmentation="none", batch_size=16), source, sharding=sharding)
    host_batches = list(_eval_batches(_config(augmentation="none", batch_size=16), source))
    assert len(batches) == 3 and batches.num_examples == 37
    count_and_sum = jax.jit(lambda b: (b["mask"].sum(), jax.numpy.where(b["mask"], b["label"], 0).sum()))
    count, total = 0, 0
    for batch, expected in zip(batches, host_batches):
        assert batch["mask"].sharding == sharding and batch["mask"].shape == (16,)
        _assert_same(expected, batch)
        batch_count, batch_total = count_and_sum(batch)
        count, total = count + int(batch_count), total + int(batch_total)
    assert (count, total) == (37, sum(range(37)))
