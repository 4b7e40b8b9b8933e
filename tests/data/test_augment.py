"""Augmentations against closed forms, independent float64 / stdlib computations and each other (host vs device)."""

import colorsys
import math

import jax
import numpy as np
import pytest
from PIL import Image

from lzn_jax.data import augment, device, transforms


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_flip_mirrors_the_width_axis():
    image = _image(5, 7)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(transforms.random_horizontal_flip(image, rng, probability=1.0), image[:, ::-1])
    np.testing.assert_array_equal(transforms.random_horizontal_flip(image, rng, probability=0.0), image)
    twice = transforms.random_horizontal_flip(
        transforms.random_horizontal_flip(image, rng, probability=1.0), rng, probability=1.0)
    np.testing.assert_array_equal(twice, image)


def _accepted_area_cdf(points, low=0.08, high=1.0, ratio=4.0 / 3.0):
    """CDF of the kept area fraction on a square image: s ~ U(low, high) is kept with P(|log r| <= -log s)."""
    grid = np.linspace(low, high, 200001)
    density = np.minimum(1.0, -np.log(grid) / math.log(ratio))
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    return np.interp(points, grid, cumulative / cumulative[-1])


def test_resized_crop_boxes_follow_the_scale_and_ratio_distribution():
    rng = np.random.default_rng(0)
    boxes = np.array([transforms.sample_resized_crop_box(1000, 1000, rng) for _ in range(4000)])
    top, left, height, width = boxes.T
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + height <= 1000) and np.all(left + width <= 1000)
    areas = height * width / 1e6
    ratios = width / height
    assert areas.min() >= 0.079 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 * 0.99 and ratios.max() <= 4 / 3 * 1.01
    # Kolmogorov-Smirnov distance to the closed-form distribution; 0.03 is above the 1% critical value (0.026).
    sorted_areas = np.sort(areas)
    empirical = np.arange(1, len(areas) + 1) / len(areas)
    assert np.max(np.abs(empirical - _accepted_area_cdf(sorted_areas))) < 0.03
    assert abs(np.mean(np.log(ratios))) < 0.01  # log-uniform ratio is symmetric around 1


def test_resized_crop_falls_back_to_a_centre_crop_with_clamped_ratio():
    rng = np.random.default_rng(0)
    box = transforms.sample_resized_crop_box(10, 1000, rng, scale=(0.99, 1.0))
    assert box == (0, (1000 - 13) // 2, 10, 13)


def test_crop_and_resize_and_eval_transform_match_pil():
    image = _image(300, 400)
    pil = Image.fromarray(image)
    np.testing.assert_array_equal(
        transforms.crop_and_resize(image, (10, 20, 100, 150), 64),
        np.asarray(pil.crop((20, 10, 170, 110)).resize((64, 64), Image.BILINEAR)),
    )
    evaluation = transforms.resize_and_center_crop(image, 224, resize_to=256)
    resized = np.asarray(pil.resize((341, 256), Image.BILINEAR))
    np.testing.assert_array_equal(evaluation, resized[16:240, 58:282])
    assert evaluation.shape == (224, 224, 3)


def _blur_float64(image, sigma, size):
    """Direct 2-D correlation with the outer-product kernel and reflect padding, in float64."""
    offsets = np.arange(size) - (size - 1) / 2
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    half = size // 2
    padded = np.pad(image.astype(np.float64), ((half, half), (half, half), (0, 0)), mode="reflect")
    out = np.zeros(image.shape)
    for dy in range(size):
        for dx in range(size):
            out += kernel[dy, dx] * padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    return out


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_a_direct_float64_convolution_and_keeps_the_mean(sigma):
    image = _image(40, 36).astype(np.float32) / 255.0
    blurred = augment.gaussian_blur_host(image, sigma, 23)
    np.testing.assert_allclose(blurred, _blur_float64(image, sigma, 23), atol=2e-6)
    kernel = augment.gaussian_kernel(np.float32(sigma), 23, np)
    assert abs(float(kernel.sum()) - 1.0) < 1e-6 and np.allclose(kernel, kernel[::-1])
    constant = np.full((30, 30, 3), 0.37, np.float32)
    np.testing.assert_allclose(augment.gaussian_blur_host(constant, sigma, 23), constant, atol=1e-6)
    large = _image(224, 224, seed=3).astype(np.float32) / 255.0
    assert abs(float(augment.gaussian_blur_host(large, sigma, 23).mean() - large.mean())) < 1e-3


def test_hsv_conversions_and_hue_shift_match_colorsys():
    pixels = np.random.default_rng(1).random((500, 3)).astype(np.float32)
    pixels[:5] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0, 0], [0.2, 0.9, 0.9]]  # grey, black, white, ties
    expected_hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels.astype(np.float64)])
    hsv = augment.rgb_to_hsv(pixels, np)
    np.testing.assert_allclose(hsv, expected_hsv, atol=1e-6)
    np.testing.assert_allclose(augment.hsv_to_rgb(hsv, np), pixels, atol=1e-6)
    shifted = augment.adjust_hue(pixels[None], np.float32(-0.3), np)[0]
    expected = np.array([colorsys.hsv_to_rgb((h - 0.3) % 1.0, s, v) for h, s, v in expected_hsv])
    np.testing.assert_allclose(shifted, expected, atol=1e-5)


def test_brightness_contrast_saturation_closed_forms():
    image = _image(8, 9).astype(np.float32) / 255.0
    luma = image @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(augment.adjust_brightness(image, 1.5, np), np.clip(image * 1.5, 0, 1), atol=1e-7)
    np.testing.assert_allclose(augment.adjust_contrast(image, 0.0, np), np.full_like(image, luma.mean()), atol=1e-6)
    np.testing.assert_allclose(augment.adjust_saturation(image, 0.0, np), np.repeat(luma[..., None], 3, -1), atol=1e-6)
    np.testing.assert_allclose(augment.adjust_saturation(image, 1.0, np), image, atol=1e-7)


def test_view_parameters_have_the_configured_probabilities_and_ranges():
    rng = np.random.default_rng(0)
    options = augment.TwoViewOptions()
    samples = [augment.sample_view_parameters(rng, options) for _ in range(2000)]
    frequency = {key: np.mean([s[key] for s in samples]) for key in ("flip", "jitter", "grayscale", "blur")}
    # 2000 draws: sd of a frequency <= 0.011, bounds are > 3.5 sd.
    assert abs(frequency["flip"] - 0.5) < 0.04 and abs(frequency["jitter"] - 0.8) < 0.04
    assert abs(frequency["grayscale"] - 0.2) < 0.04 and frequency["blur"] == 1.0
    factors = np.array([s["factors"] for s in samples])
    assert factors[:, :3].min() >= 0.2 and factors[:, :3].max() <= 1.8
    assert factors[:, 3].min() >= -0.2 and factors[:, 3].max() <= 0.2
    sigmas = np.array([s["sigma"] for s in samples])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    assert all(sorted(s["order"].tolist()) == [0, 1, 2, 3] for s in samples)
    half = augment.sample_view_parameters(np.random.default_rng(1), augment.TwoViewOptions(blur_probability=0.0))
    assert not half["blur"]


def _views_and_parameters(options, count, seed=5):
    """``uint8 (count, 2, S, S, 3)`` crops of random images and their stacked photometric parameters."""
    rng = np.random.default_rng(seed)
    views, parameters = [], []
    for image_seed in range(count):
        crops, params = augment.two_view_crops(_image(48, 40, seed=image_seed), rng, options)
        views.append(crops)
        parameters.append(params)
    return np.stack(views), {key: np.stack([p[key] for p in parameters]) for key in parameters[0]}


def test_host_and_device_photometric_paths_agree():
    options = augment.TwoViewOptions(crop_size=32, jitter_probability=0.9, grayscale_probability=0.2)
    views, parameters = _views_and_parameters(options, 12)  # 24 views: many of the 24 jitter orders
    assert set(np.argmax(parameters["order"][parameters["jitter"]] == augment.HUE, axis=-1).tolist()) == {0, 1, 2, 3}
    # Jitted, as in a training step: XLA fuses and may recompute an input with different rounding in two places,
    # which eager execution never shows.
    on_device = np.asarray(jax.jit(device.apply_photometric_device)(views, parameters))
    on_host = augment.apply_photometric_host(views, parameters)
    for images in (on_device, on_host):
        assert images.shape == (12, 2, 32, 32, 3) and images.dtype == np.float32
        # The model's range, used at both ends (random pixels reach black and white).
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert images.min() < -0.95 and images.max() > 0.95
    np.testing.assert_allclose(on_device, on_host, atol=5e-5)
    one_view = augment.apply_photometric_host(views[3, 1], {key: value[3, 1] for key, value in parameters.items()})
    np.testing.assert_array_equal(one_view, on_host[3, 1])


def test_photometric_ops_with_neutral_parameters_are_the_model_input_conversion():
    options = augment.TwoViewOptions(crop_size=16)
    views, parameters = _views_and_parameters(options, 3)
    neutral = {key: np.zeros_like(value) for key, value in parameters.items()}  # no flip, jitter, grayscale, blur
    expected = views.astype(np.float64) / 255.0 * 2.0 - 1.0
    np.testing.assert_allclose(augment.apply_photometric_host(views, neutral), expected, atol=1e-6)
    on_device = jax.jit(device.apply_photometric_device)  # compiled once for both parameter sets
    np.testing.assert_allclose(np.asarray(on_device(views, neutral)), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(device.to_float_images(views)), expected, atol=1e-6)
    flipped = dict(neutral, flip=np.ones_like(neutral["flip"]))
    np.testing.assert_allclose(augment.apply_photometric_host(views, flipped), expected[..., ::-1, :], atol=1e-6)
    np.testing.assert_allclose(np.asarray(on_device(views, flipped)), expected[..., ::-1, :], atol=1e-6)


def test_host_views_are_the_host_model_inputs_rounded_to_uint8():
    options = augment.TwoViewOptions(crop_size=24)
    image = _image(40, 50, seed=7)
    views = augment.two_view_host(image, np.random.default_rng(3), options)
    crops, parameters = augment.two_view_crops(image, np.random.default_rng(3), options)
    floats = augment.apply_photometric_host(crops, parameters)
    np.testing.assert_allclose(views, (floats + 1.0) * 127.5, atol=0.5 + 1e-3)


def test_two_view_host_gives_two_different_uint8_views_of_the_crop_size():
    views = augment.two_view_host(_image(256, 320), np.random.default_rng(0), augment.TwoViewOptions())
    assert views.shape == (2, 224, 224, 3) and views.dtype == np.uint8
    assert not np.array_equal(views[0], views[1])
    floats = np.asarray(device.to_float_images(views))
    assert floats.min() >= -1.0 and floats.max() <= 1.0
