"""Image folders: every PIL-readable mode becomes RGB, bad files are skipped and counted, errors name the path."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from lzn_jax.data import folders, pipeline


def _write_folder(root):
    """AFHQ layout (train/cat) with RGB JPEGs, grayscale PNG, CMYK TIFF, RGBA PNG, a corrupt file, a text file."""
    folder = os.path.join(root, "train", "cat")
    os.makedirs(os.path.join(folder, "more"))
    rng = np.random.default_rng(1)
    arrays = {}
    for i in range(5):
        arrays[f"rgb{i}.png"] = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(arrays[f"rgb{i}.png"]).save(os.path.join(folder, f"rgb{i}.png"))
    arrays["gray.png"] = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    Image.fromarray(arrays["gray.png"]).save(os.path.join(folder, "gray.png"))
    cmyk = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    cmyk[..., 3] = 0  # no black ink: RGB = 255 - (C, M, Y) exactly
    arrays["more/cmyk.tif"] = cmyk
    Image.fromarray(cmyk, mode="CMYK").save(os.path.join(folder, "more", "cmyk.tif"))
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(20)[:, None] < 10, 0, 255)
    arrays["rgba.png"] = rgba
    Image.fromarray(rgba, mode="RGBA").save(os.path.join(folder, "rgba.png"))
    Image.fromarray(arrays["rgb0.png"]).save(os.path.join(folder, "photo.jpg"), quality=95)
    with open(os.path.join(folder, "broken.jpg"), "wb") as file:
        file.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
    with open(os.path.join(folder, "notes.txt"), "w") as file:
        file.write("not an image")
    return folder, arrays


def test_listing_finds_image_files_recursively_and_ignores_others(tmp_path):
    folder, _ = _write_folder(str(tmp_path))
    paths, ignored = folders.list_image_files(folder)
    names = [os.path.relpath(p, folder) for p in paths]
    assert names == sorted(names) and len(names) == 10 and ignored == 1
    assert "more/cmyk.tif" in names and "broken.jpg" in names and "notes.txt" not in names


def test_grayscale_cmyk_and_alpha_files_decode_to_rgb(tmp_path):
    folder, arrays = _write_folder(str(tmp_path))
    gray = folders.decode_rgb(os.path.join(folder, "gray.png"))
    assert gray.shape == (24, 24, 3) and gray.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(gray[..., channel], arrays["gray.png"])
    cmyk = folders.decode_rgb(os.path.join(folder, "more", "cmyk.tif"))
    np.testing.assert_array_equal(cmyk, 255 - arrays["more/cmyk.tif"][..., :3])
    rgba = folders.decode_rgb(os.path.join(folder, "rgba.png"))
    np.testing.assert_array_equal(rgba[:10], np.full((10, 20, 3), 255, np.uint8))  # transparent -> white
    np.testing.assert_array_equal(rgba[10:], arrays["rgba.png"][10:, :, :3])  # opaque -> unchanged
    np.testing.assert_array_equal(folders.decode_rgb(os.path.join(folder, "rgb3.png")), arrays["rgb3.png"])


def test_corrupt_file_is_skipped_counted_and_logged(tmp_path, caplog):
    folder, _ = _write_folder(str(tmp_path))
    source = folders.ImageFolderSource(folder, max_bad_fraction=0.2)
    broken = source.paths.index(os.path.join(folder, "broken.jpg"))
    with caplog.at_level(logging.WARNING):
        record = source[broken]
    assert os.path.join(folder, "broken.jpg") in caplog.text
    assert source.bad_paths == {os.path.join(folder, "broken.jpg")}
    # Deterministic substitute: the next file in the listing.
    np.testing.assert_array_equal(record["image"], folders.decode_rgb(source.paths[broken + 1]))
    for index in range(len(source)):
        assert source[index]["image"].shape[-1] == 3
    assert len(source.bad_paths) == 1


def test_too_many_bad_files_stop_the_run(tmp_path):
    folder, _ = _write_folder(str(tmp_path))
    source = folders.ImageFolderSource(folder, max_bad_fraction=0.05)
    with pytest.raises(folders.TooManyBadFilesError, match="broken.jpg.*max_bad_fraction"):
        for index in range(len(source)):
            source[index]


def test_missing_and_empty_folders_name_the_path(tmp_path):
    missing = os.path.join(str(tmp_path), "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        folders.ImageFolderSource(missing)
    empty = os.path.join(str(tmp_path), "empty")
    os.makedirs(empty)
    with open(os.path.join(empty, "readme.txt"), "w") as file:
        file.write("x")
    with pytest.raises(FileNotFoundError, match="empty.*no image file"):
        folders.ImageFolderSource(empty)
    with pytest.raises(FileNotFoundError, match="train/cat"):
        folders.folder_source("afhq_cat", str(tmp_path))


def test_pipeline_resizes_folder_images_like_pil(tmp_path):
    root = str(tmp_path)
    folder, _ = _write_folder(root)
    config = pipeline.default_config()
    config.update(name="afhq_cat", data_dir=root, image_size=16, batch_size=3, augmentation="none",
                  shuffle=False, num_epochs=1, max_bad_fraction=0.2, num_threads=1)
    batches = list(pipeline.build_pipeline(config, sharding=None))
    assert len(batches) == 3
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (9, 16, 16, 3) and set(batches[0]) == {"image"}
    paths = folders.list_image_files(folder)[0]
    broken = paths.index(os.path.join(folder, "broken.jpg"))
    paths[broken] = paths[broken + 1]  # a bad file's slot is filled by the next file of the listing
    for image, path in zip(images, paths[:9]):
        rgb = Image.fromarray(folders.decode_rgb(path))  # decoding is checked above; here the geometry
        width, height = rgb.size
        size = (16, int(16 * height / width)) if width <= height else (int(16 * width / height), 16)
        resized = np.asarray(rgb.resize(size, Image.BILINEAR)) if min(width, height) != 16 else np.asarray(rgb)
        top = int(round((resized.shape[0] - 16) / 2))
        left = int(round((resized.shape[1] - 16) / 2))
        np.testing.assert_array_equal(image, resized[top : top + 16, left : left + 16])
