"""Batches to model inputs: one jittable function per kind of batch, float32 in [-1, 1], other keys untouched."""

import jax
import numpy as np
import pytest

from lzn_jax.data import augment, config as data_config, device


def _config(**overrides):
    config = data_config.default_config()
    config.update(overrides)
    return config


def _batch(*, views=False, augment_parameters=False, batch_size=4, size=8):
    rng = np.random.default_rng(0)
    shape = (batch_size, 2, size, size, 3) if views else (batch_size, size, size, 3)
    batch = {
        "views" if views else "image": rng.integers(0, 256, shape, dtype=np.uint8),
        "label": np.arange(batch_size, dtype=np.int32),
        "mask": np.arange(batch_size) < batch_size - 1,
    }
    if augment_parameters:
        options = augment.TwoViewOptions(crop_size=size, blur_kernel_size=5)
        samples = [[augment.sample_view_parameters(rng, options) for _ in range(2)] for _ in range(batch_size)]
        batch["augment"] = {key: np.array([[s[v][key] for v in range(2)] for s in samples]) for key in samples[0][0]}
    return batch


def _scaled(pixels):
    return pixels.astype(np.float64) / 255.0 * 2.0 - 1.0


@pytest.mark.parametrize("augmentation", ["none", "flip"])
def test_image_batches_become_floats_in_the_model_range(augmentation):
    batch = _batch()
    inputs = jax.jit(device.model_inputs_fn(_config(augmentation=augmentation)))(batch)
    assert set(inputs) == {"image", "label", "mask"} and inputs["image"].dtype == np.float32
    np.testing.assert_allclose(np.asarray(inputs["image"]), _scaled(batch["image"]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(inputs["label"]), batch["label"])
    np.testing.assert_array_equal(np.asarray(inputs["mask"]), batch["mask"])


def test_host_augmented_views_become_floats_in_the_model_range():
    batch = _batch(views=True)
    inputs = jax.jit(device.model_inputs_fn(_config(augmentation="two_view", augment_on="host")))(batch)
    assert set(inputs) == {"views", "label", "mask"}
    np.testing.assert_allclose(np.asarray(inputs["views"]), _scaled(batch["views"]), atol=1e-6)


def test_device_augmented_views_get_the_photometric_ops_of_their_parameters():
    batch = _batch(views=True, augment_parameters=True)
    config = _config(augmentation="two_view", augment_on="device")
    config.two_view.blur_kernel_size = 5  # the function must take the kernel size from the config
    inputs = jax.jit(device.model_inputs_fn(config))(batch)
    assert set(inputs) == {"views", "label", "mask"}
    expected = augment.apply_photometric_host(batch["views"], batch["augment"], blur_kernel_size=5)
    np.testing.assert_allclose(np.asarray(inputs["views"]), expected, atol=5e-5)
    np.testing.assert_array_equal(np.asarray(inputs["mask"]), batch["mask"])


def test_an_invalid_config_is_refused_before_any_batch():
    with pytest.raises(ValueError, match="augmentation"):
        device.model_inputs_fn(_config(augmentation="mixup"))
