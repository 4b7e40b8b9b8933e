"""clean-fid's resize (PIL bicubic on float pixels) and the input normalisations."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lzn_jax.evaluation import preprocess


def _pil_float_resize(image: np.ndarray, size: int = 299) -> np.ndarray:
    """What clean-fid does: each channel as a PIL 'F' image, bicubic resize, clip to [0, 255]."""
    channels = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=-1).clip(0, 255)


SIZES = [(32, 32), (64, 48), (256, 256), (400, 350)]  # up-sampling, unequal axes, and antialiased down-sampling


@pytest.mark.parametrize("height, width", SIZES)
def test_weights_reproduce_pil_exactly_and_the_jax_resize_to_float32_rounding(height, width):
    image = np.random.default_rng(height + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = _pil_float_resize(image)
    # The coefficients are PIL's: with float64 passes rounded to float32 after each (as PIL stores them), bit-equal.
    rows, cols = preprocess.pil_bicubic_weights(height, 299), preprocess.pil_bicubic_weights(width, 299)
    passed = np.einsum("ow,hwc->hoc", cols, image.astype(np.float64)).astype(np.float32)
    passed = np.einsum("oh,hwc->owc", rows, passed.astype(np.float64)).astype(np.float32).clip(0, 255)
    np.testing.assert_array_equal(passed, expected)
    # The on-device float32 matmuls: a few float32 ulps of 255.
    actual = np.asarray(preprocess.resize_bicubic(image[None]))[0]
    assert actual.dtype == np.float32 and actual.shape == (299, 299, 3)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_weight_rows_sum_to_one_and_equal_sizes_are_the_identity():
    for size in (7, 32, 299, 512):
        np.testing.assert_allclose(preprocess.pil_bicubic_weights(size, 299).sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(preprocess.pil_bicubic_weights(299, 299), np.eye(299))


def test_normalizations_and_the_uint8_contract():
    pixels = jnp.asarray([0.0, 128.0, 255.0])
    np.testing.assert_allclose(preprocess.normalize(pixels, "clean"), [-1.0, 0.0, 127 / 128])
    np.testing.assert_allclose(preprocess.normalize(pixels, "pytorch_fid"), [-1.0, 1 / 255, 1.0], atol=1e-6)
    images = np.zeros((1, 299, 299, 3), np.uint8)
    assert preprocess.preprocess(images, resize="none").shape == (1, 299, 299, 3)
    with pytest.raises(TypeError, match="uint8"):
        preprocess.preprocess(images.astype(np.float32))
    with pytest.raises(ValueError, match="299x299"):
        preprocess.preprocess(np.zeros((1, 32, 32, 3), np.uint8), resize="none")
