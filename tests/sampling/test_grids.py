"""Sample grids: one row per class whatever the order of the labels, and the PNG holds the picture."""

import numpy as np
import pytest
from PIL import Image

from lzn_jax import sampling


def labelled_images(labels):
    """uint8 (N, 2, 3, 1) images whose pixels all equal 10 * label + index: a cell names its image."""
    values = 10 * np.asarray(labels) + np.arange(len(labels))
    return np.broadcast_to(values[:, None, None, None], (len(labels), 2, 3, 1)).astype(np.uint8)


def cell(picture, row, column, height=2, width=3):
    return picture[row * (height + 1):row * (height + 1) + height, column * (width + 1):column * (width + 1) + width]


def test_class_grid_puts_each_class_on_its_row_in_order_padded_white():
    labels = np.array([2, 0, 1, 0, 2, 0])
    images = labelled_images(labels)
    picture = sampling.class_grid(images, labels, num_classes=4)
    assert picture.shape == (4 * 3 - 1, 3 * 4 - 1, 1)  # 4 class rows, 3 columns (class 0 has three images)
    expected_rows = {0: [1, 3, 5], 1: [2], 2: [0, 4], 3: []}
    for k, members in expected_rows.items():
        for column in range(3):
            want = images[members[column]] if column < len(members) else np.full((2, 3, 1), 255, np.uint8)
            np.testing.assert_array_equal(cell(picture, k, column), want)


def test_class_grid_refuses_labels_that_do_not_fit():
    images = labelled_images([0, 1])
    with pytest.raises(ValueError, match="labels"):
        sampling.class_grid(images, np.array([0, 5]), num_classes=3)
    with pytest.raises(ValueError, match="labels"):
        sampling.class_grid(images, np.array([0]), num_classes=3)


def test_write_grid_png_holds_the_picture(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 4, 5, 3)).astype(np.float32)
    labels = np.array([1, 0, 1, 2, 2, 1])
    path = sampling.write_grid(tmp_path / "grid.png", images, labels=labels)
    expected = sampling.class_grid(sampling.to_uint8(images), labels, num_classes=3)
    written = np.asarray(Image.open(path))
    scale = written.shape[1] // expected.shape[1]  # the writer enlarges small pictures by whole pixels
    np.testing.assert_array_equal(written[::scale, ::scale], expected)

    plain = np.asarray(Image.open(sampling.write_grid(tmp_path / "plain.png", images, columns=4)))
    expected = sampling.image_grid(sampling.to_uint8(images), columns=4)
    scale = plain.shape[1] // expected.shape[1]
    np.testing.assert_array_equal(plain[::scale, ::scale], expected)
