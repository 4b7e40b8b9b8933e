"""Flax Linen models of LZN: NCSN++ encoder/decoder, ResNet-50-GN, label anchors, and a registry by name."""

from lzn_jax.models.label_anchors import LabelAnchors, label_anchors_config
from lzn_jax.models.ncsnpp import (
    NCSNppDecoder,
    NCSNppEncoder,
    cifar10_decoder_config,
    cifar10_encoder_config,
    image256_decoder_config,
    image256_encoder_config,
)
from lzn_jax.models.registry import MODELS, build
from lzn_jax.models.resnet import ResNetGN, resnet50_gn_config

__all__ = [
    "MODELS",
    "LabelAnchors",
    "NCSNppDecoder",
    "NCSNppEncoder",
    "ResNetGN",
    "build",
    "cifar10_decoder_config",
    "cifar10_encoder_config",
    "image256_decoder_config",
    "image256_encoder_config",
    "label_anchors_config",
    "resnet50_gn_config",
]
