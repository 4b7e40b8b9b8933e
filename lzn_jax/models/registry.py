"""Maps config names to model classes: `build(config.model.encoder)` returns an unbound Flax module."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from lzn_jax.models.label_anchors import LabelAnchors
from lzn_jax.models.ncsnpp import NCSNppDecoder, NCSNppEncoder
from lzn_jax.models.resnet import ResNetGN

MODELS: dict[str, type[nn.Module]] = {
    "ncsnpp_encoder": NCSNppEncoder,
    "ncsnpp_decoder": NCSNppDecoder,
    "resnet50_gn": ResNetGN,
    "label_anchors": LabelAnchors,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _normalise(value: Any) -> Any:
    """Lists become tuples (module attributes must be hashable for remat/jit caching)."""
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    return value


def build(config: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Builds the model named by `config['name']` with the remaining keys (and `overrides`) as its attributes.

    `dtype` may be given as a string ('float32', 'bfloat16'). Unknown names raise ValueError listing known ones.
    """
    kwargs = dict(config.items()) if hasattr(config, "items") else dict(config)
    kwargs.update(overrides)
    name = kwargs.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(sorted(MODELS))}")
    kwargs = {key: _normalise(value) for key, value in kwargs.items()}
    if isinstance(kwargs.get("dtype"), str):
        if kwargs["dtype"] not in _DTYPES:
            raise ValueError(f"unknown dtype {kwargs['dtype']!r}; use one of {', '.join(_DTYPES)}")
        kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
    return MODELS[name](**kwargs)
