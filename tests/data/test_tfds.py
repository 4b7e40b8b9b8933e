"""TFDS path under ``tfds.testing.mock_data``; fast failure with the preparation command; the prepare CLI."""

import os
import shlex
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lzn_jax.data import pipeline, prepare, tfds_source


def _config(**overrides):
    config = pipeline.default_config()
    config.update(num_threads=2, prefetch_buffer_size=16, augment_on="host")
    config.update(overrides)
    return config


def test_cifar10_batches_are_the_tfds_records(tmp_path):
    data_dir = str(tmp_path)
    config = _config(name="cifar10", data_dir=data_dir, image_size=32, batch_size=8, augmentation="none",
                     shuffle=False, num_epochs=1)
    with tfds.testing.mock_data(num_examples=20):
        batches = list(pipeline.build_pipeline(config, sharding=None))
        direct = tfds.data_source("cifar10", split="train", data_dir=data_dir, download=False)
        expected_images = np.stack([direct[i]["image"] for i in range(16)])
        expected_labels = np.array([direct[i]["label"] for i in range(16)])
    assert len(batches) == 2  # 20 examples, batch 8: 4 dropped
    assert batches[0]["image"].shape == (8, 32, 32, 3) and batches[0]["image"].dtype == np.uint8
    assert batches[0]["label"].dtype == np.int32
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), expected_images)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), expected_labels)


def test_cifar10_shuffled_epoch_is_a_permutation_of_the_records(tmp_path):
    config = _config(name="cifar10", data_dir=str(tmp_path), image_size=32, batch_size=5, augmentation="none")
    with tfds.testing.mock_data(num_examples=20):
        iterator = pipeline.build_pipeline(config, sharding=None)
        epoch = np.concatenate([next(iterator)["image"] for _ in range(4)])
        direct = tfds.data_source("cifar10", split="train", data_dir=str(tmp_path), download=False)
        records = np.stack([direct[i]["image"] for i in range(20)])
    keys = sorted(r.tobytes() for r in records)
    assert sorted(e.tobytes() for e in epoch) == keys
    assert not np.array_equal(epoch, records)


def test_imagenet_eval_and_two_view_transforms_give_fixed_shapes(tmp_path):
    with tfds.testing.mock_data(num_examples=3):  # mock ImageNet images have random sizes of tens of pixels
        evaluation = pipeline.build_eval_pipeline(
            _config(name="imagenet2012", split="validation", data_dir=str(tmp_path), image_size=224,
                    resize_size=256, batch_size=2, augmentation="none"))
        batches = list(evaluation)
        assert len(batches) == 2 and batches[0]["image"].shape == (2, 224, 224, 3)
        assert batches[1]["mask"].tolist() == [True, False] and batches[1]["label"].shape == (2,)
        two_view = pipeline.build_pipeline(
            _config(name="imagenet2012", data_dir=str(tmp_path), image_size=224, batch_size=2,
                    augmentation="two_view", augment_on="device"), sharding=None)
        batch = next(two_view)
    assert batch["views"].shape == (2, 2, 224, 224, 3) and batch["views"].dtype == np.uint8
    assert batch["augment"]["factors"].shape == (2, 2, 4) and batch["augment"]["order"].shape == (2, 2, 4)


def test_unprepared_dataset_fails_without_touching_the_network_and_names_the_prepare_command(tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("this test forbids network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    data_source_calls = []
    opened = tfds.data_source

    def recording_data_source(*args, **kwargs):
        data_source_calls.append(kwargs)
        return opened(*args, **kwargs)

    monkeypatch.setattr(tfds, "data_source", recording_data_source)
    data_dir = os.path.join(str(tmp_path), "tfds")
    with pytest.raises(tfds_source.DatasetNotPreparedError) as error:
        pipeline.build_pipeline(_config(name="cifar10", data_dir=data_dir, image_size=32), sharding=None)
    assert attempts == []  # no connection, not even a name lookup: no download retries
    assert data_source_calls and all(call.get("download") is False for call in data_source_calls)
    message = str(error.value)
    command = f"python -m lzn_jax.data.prepare cifar10 --data_dir={data_dir}"
    assert command in message
    arguments = prepare.parse_arguments(shlex.split(command)[3:])  # the printed command is one prepare accepts
    assert (arguments.name, arguments.data_dir) == ("cifar10", data_dir)


def test_imagenet_preparation_requires_the_manual_archives(tmp_path):
    assert "--manual_dir=" in tfds_source.prepare_command("imagenet2012", "/data")
    with pytest.raises(SystemExit, match="ILSVRC2012_img_train.tar"):
        prepare.check_manual_dir("imagenet2012", None)
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(SystemExit, match="lacks \\['ILSVRC2012_img_train.tar'\\]"):
        prepare.check_manual_dir("imagenet2012", str(tmp_path))
    (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(b"")
    prepare.check_manual_dir("imagenet2012", str(tmp_path))
    with pytest.raises(SystemExit):
        prepare.parse_arguments(["mnist"])

