"""The model registry: every model by its config name, with its example inputs; the presets import without JAX."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from lzn_jax import models
from lzn_jax.models import presets

TINY_TRUNK = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
# One tiny config per registered model; the last test fails when a model is registered without one.
TINY_CONFIGS = {
    "ncsnpp_encoder": dict(name="ncsnpp_encoder", latent_dim=6, num_base_channels=4, num_base_units=12, **TINY_TRUNK),
    "ncsnpp_decoder": dict(name="ncsnpp_decoder", latent_dim=6, num_classes=3, **TINY_TRUNK),
    "resnet50_gn": dict(name="resnet50_gn", latent_dim=64, stage_sizes=(1,)),
    "label_anchors": dict(name="label_anchors", num_classes=3, latent_dim=6),
}
# name -> the output shapes of a batch of 2 at 8x8.
EXPECTED_OUTPUT_SHAPES = {
    "ncsnpp_encoder": (2, 6),
    "ncsnpp_decoder": (2, 8, 8, 3),
    "resnet50_gn": ((2, 64), (2, 256)),
    "label_anchors": (3, 6),
}


@pytest.mark.parametrize(
    "config, cls",
    [
        (presets.cifar10_encoder_config(), models.NCSNppEncoder),
        (presets.image256_encoder_config(), models.NCSNppEncoder),
        (presets.cifar10_decoder_config(num_classes=10), models.NCSNppDecoder),
        (presets.image256_decoder_config(), models.NCSNppDecoder),
        (presets.resnet50_gn_config(), models.ResNetGN),
        (presets.label_anchors_config(), models.LabelAnchors),
    ],
)
def test_build_by_name_passes_every_hyper_parameter_of_a_plain_dict_or_config_dict(config, cls):
    assert type(config) is dict
    for spelled in (config, ml_collections.ConfigDict(config)):
        module = models.build(spelled)
        assert type(module) is cls
        for key, value in config.items():
            if key != "name":
                assert getattr(module, key) == value, key


def test_build_normalises_lists_and_dtype_names_and_applies_overrides():
    config = ml_collections.ConfigDict(
        dict(name="ncsnpp_encoder", ch_mult=[1, 2], attn_resolutions=[], dtype="bfloat16")
    )
    module = models.build(config, remat=True)
    assert module.ch_mult == (1, 2) and module.attn_resolutions == ()
    assert module.dtype == jnp.bfloat16 and module.remat is True
    assert models.build({"name": "label_anchors", "num_classes": 3}).num_classes == 3


def test_unknown_names_attributes_and_dtypes_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="known models: label_anchors, ncsnpp_decoder, ncsnpp_encoder, resnet50_gn"):
        models.build({"name": "unet"})
    with pytest.raises(ValueError, match="unknown dtype 'float8'; use one of float32, bfloat16, float16"):
        models.build({"name": "ncsnpp_encoder", "dtype": "float8"})
    with pytest.raises(ValueError, match=r"label_anchors \(LabelAnchors\) has no attribute latent_size; "
                                         r"valid: num_classes, latent_dim$"):
        models.build({"name": "label_anchors", "latent_size": 3})
    with pytest.raises(ValueError, match="has no attribute head_layers, parent; valid: latent_dim, stage_sizes"):
        models.build(presets.resnet50_gn_config(), head_layers=1, parent=None)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_example_inputs_initialise_every_model_in_one_line(name):
    config = TINY_CONFIGS[name]
    model = models.build(config)
    inputs = models.example_inputs(config, 2, 8)
    variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    assert set(variables) == {"params"}
    # Every model takes `train` as a keyword, as the trainer calls them.
    output = jax.eval_shape(lambda v: model.apply(v, *inputs, train=True), variables)
    shapes = jax.tree_util.tree_map(lambda leaf: leaf.shape, output)
    assert (tuple(shapes) if name == "resnet50_gn" else shapes) == EXPECTED_OUTPUT_SHAPES[name]


def test_example_inputs_follow_the_decoder_conditioning_and_the_channel_count():
    x_t, t, latent, label_onehot = models.example_inputs(TINY_CONFIGS["ncsnpp_decoder"], 4, 16, num_channels=1)
    assert (x_t.shape, t.shape, latent.shape, label_onehot.shape) == ((4, 16, 16, 1), (4,), (4, 6), (4, 3))
    assert 0 < float(t[0]) < 1  # an interior time: log(999 t) of the Fourier embedding stays finite
    plain = dict(TINY_CONFIGS["ncsnpp_decoder"], latent_dim=0, num_classes=0)
    assert models.example_inputs(plain, 4, 16)[2:] == (None, None)
    assert models.example_inputs(TINY_CONFIGS["label_anchors"], 4) == ()


def test_example_inputs_of_an_image_model_need_the_image_size():
    with pytest.raises(ValueError, match="ResNetGN takes images: pass image_size"):
        models.example_inputs(TINY_CONFIGS["resnet50_gn"], 2)


def test_every_registered_model_has_a_tiny_config_here():
    assert set(TINY_CONFIGS) == set(models.MODELS) == set(EXPECTED_OUTPUT_SHAPES)


def test_every_exported_name_resolves():
    for name in models.__all__:
        assert getattr(models, name) is not None, name
    with pytest.raises(AttributeError):
        models.not_a_model  # noqa: B018


def test_presets_import_without_jax_or_flax():
    """Config files import the presets; parsing a config must not pay for importing JAX."""
    code = "import sys, lzn_jax.models.presets; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
    repository = pathlib.Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=repository, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
