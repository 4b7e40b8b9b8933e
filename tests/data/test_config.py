"""The data config: cheap to import, overridable from the command line, one source of defaults, clear refusals."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from lzn_jax.data import augment, config as data_config, pipeline, sources


def test_importing_the_config_pulls_in_no_array_or_data_library():
    code = (
        "import sys\n"
        "from lzn_jax.data.config import default_config\n"
        "default_config()\n"
        "print(sorted(m for m in ('jax', 'grain', 'numpy', 'tensorflow', 'PIL', 'scipy') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_unset_keys_can_be_overridden_on_the_command_line():
    argv = ["main", "--data.data_dir=/data/tfds", "--data.resize_size=256", "--data.num_epochs=3"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("data", data_config.default_config(), flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert (flag_values.data.data_dir, flag_values.data.resize_size, flag_values.data.num_epochs) == (
        "/data/tfds", 256, 3
    )


def test_two_view_defaults_are_the_augmentation_defaults():
    options = augment.TwoViewOptions()
    block = data_config.default_config().two_view
    assert set(block.keys()) == {f.name for f in dataclasses.fields(options)} - {"crop_size", "flip_probability"}
    for key in block.keys():
        assert tuple(np.atleast_1d(block[key])) == tuple(np.atleast_1d(getattr(options, key))), key
    assert data_config.default_config().flip_probability == options.flip_probability


def test_the_old_pipeline_path_still_gives_the_defaults():
    assert pipeline.default_config() == data_config.default_config()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"augmentation": "eval"}, "augmentation='none' with data.resize_size"),
        ({"augmentation": "mixup"}, "unknown data.augmentation='mixup'"),
        ({"augment_on": "tpu"}, "augment_on must be one of"),
        ({"resize_size": 12, "image_size": 16}, "resize_size=12 must be at least data.image_size=16"),
        ({"resize_size": 256, "augmentation": "two_view"}, "does not apply to two_view"),
        ({"batch_size": 0}, "batch_size must be positive"),
    ],
)
def test_bad_values_are_refused_with_the_fix(overrides, message):
    config = data_config.default_config()
    config.update(overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data_config.check_config(config)


def test_unknown_and_renamed_keys_are_refused():
    config = data_config.default_config()
    config.eval_resize_size = 256
    with pytest.raises(ValueError, match="now data.resize_size"):
        data_config.check_config(config)
    config = data_config.default_config()
    config.two_view.blur_sigmas = (0.1, 2.0)
    with pytest.raises(ValueError, match=r"unknown data config keys \['two_view.blur_sigmas'\]"):
        data_config.check_config(config)


def test_sources_are_checked_before_reading():
    images, labels = np.zeros((10, 8, 8, 3), np.uint8), np.zeros(10, np.int32)
    with pytest.raises(TypeError, match="needs __len__ and __getitem__"):
        pipeline.build_pipeline(data_config.default_config(), source=iter(images))
    with pytest.raises(TypeError, match="must be a dict with an 'image'.*ArraySource"):
        pipeline.build_eval_pipeline(data_config.default_config(), source=(images, labels))
    with pytest.raises(ValueError, match="uint8 images of shape"):
        sources.ArraySource(np.zeros((10, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="one label per image"):
        sources.ArraySource(np.zeros((10, 8, 8, 3), np.uint8), np.zeros(9))
    assert isinstance(sources.ArraySource(np.zeros((1, 2, 2, 1), np.uint8)), sources.Source)
