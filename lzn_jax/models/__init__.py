"""Flax Linen models of LZN: NCSN++ encoder/decoder, ResNet-50-GN, label anchors, a registry and the paper presets.

The presets are plain Python and load with the package; the Flax modules load on first use, so that a config file
can import `lzn_jax.models.presets` without importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lzn_jax.models.presets import (
    cifar10_decoder_config,
    cifar10_encoder_config,
    image256_decoder_config,
    image256_encoder_config,
    label_anchors_config,
    resnet50_gn_config,
)

if TYPE_CHECKING:
    from lzn_jax.models.label_anchors import LabelAnchors
    from lzn_jax.models.ncsnpp import NCSNppDecoder, NCSNppEncoder
    from lzn_jax.models.registry import MODELS, build, example_inputs
    from lzn_jax.models.resnet import ResNetGN, ResNetOutput

# Public name -> the submodule that defines it, imported on first access.
_LAZY = {
    "LabelAnchors": "label_anchors",
    "NCSNppDecoder": "ncsnpp",
    "NCSNppEncoder": "ncsnpp",
    "ResNetGN": "resnet",
    "ResNetOutput": "resnet",
    "MODELS": "registry",
    "build": "registry",
    "example_inputs": "registry",
}

__all__ = [
    "MODELS",
    "LabelAnchors",
    "NCSNppDecoder",
    "NCSNppEncoder",
    "ResNetGN",
    "ResNetOutput",
    "build",
    "cifar10_decoder_config",
    "cifar10_encoder_config",
    "example_inputs",
    "image256_decoder_config",
    "image256_encoder_config",
    "label_anchors_config",
    "resnet50_gn_config",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
