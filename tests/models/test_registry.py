"""The model registry builds every model by its config name."""

import jax.numpy as jnp
import ml_collections
import pytest

from lzn_jax import models


@pytest.mark.parametrize(
    "config, cls",
    [
        (models.cifar10_encoder_config(), models.NCSNppEncoder),
        (models.image256_encoder_config(), models.NCSNppEncoder),
        (models.cifar10_decoder_config(num_classes=10), models.NCSNppDecoder),
        (models.image256_decoder_config(), models.NCSNppDecoder),
        (models.resnet50_gn_config(), models.ResNetGN),
        (models.label_anchors_config(), models.LabelAnchors),
    ],
)
def test_build_by_name_passes_every_hyper_parameter(config, cls):
    module = models.build(config)
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


def test_unknown_names_and_attributes_are_refused():
    with pytest.raises(ValueError, match="known models: label_anchors, ncsnpp_decoder, ncsnpp_encoder, resnet50_gn"):
        models.build({"name": "unet"})
    with pytest.raises(ValueError, match="unknown dtype"):
        models.build({"name": "label_anchors", "dtype": "float8"})
    with pytest.raises(TypeError):
        models.build({"name": "label_anchors", "latent_size": 3})
