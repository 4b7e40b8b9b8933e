"""The one map from config names to model classes: `build(config)` returns an unbound Flax module and
`example_inputs(config, ...)` the arguments that `init` and `jax.eval_shape` need for it."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
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
# Every Linen module has these dataclass fields; neither is a hyper-parameter a config may set.
_LINEN_FIELDS = ("parent", "name")


def _normalise(value: Any) -> Any:
    """Lists become tuples (module attributes must be hashable for remat/jit caching)."""
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    return value


def _hyper_parameters(cls: type[nn.Module]) -> tuple[str, ...]:
    """The attributes a config may set on the model class `cls`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name not in _LINEN_FIELDS)


def build(config: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Builds the model named by `config['name']` with the remaining keys (and `overrides`) as its attributes.

    `config` is a plain mapping or an ml_collections ConfigDict. `dtype` may be a string ('float32', 'bfloat16',
    'float16'); lists become tuples. An unknown name or attribute raises ValueError listing the valid ones.
    """
    kwargs = dict(config.items())
    kwargs.update(overrides)
    name = kwargs.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    valid = _hyper_parameters(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"{name} ({cls.__name__}) has no attribute {', '.join(unknown)}; valid: {', '.join(valid)}")
    kwargs = {key: _normalise(value) for key, value in kwargs.items()}
    if isinstance(kwargs.get("dtype"), str):
        if kwargs["dtype"] not in _DTYPES:
            raise ValueError(f"unknown dtype {kwargs['dtype']!r}; use one of {', '.join(_DTYPES)}")
        kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
    return cls(**kwargs)


def example_inputs(
    config: Mapping[str, Any], batch_size: int, image_size: int | None = None, *, num_channels: int = 3
) -> tuple[jax.Array | None, ...]:
    """Float32 placeholder arguments of the model `config` names, so that for every model

        variables = model.init(rng, *example_inputs(config, batch_size, image_size))
        shapes = jax.eval_shape(model.init, rng, *example_inputs(config, batch_size, image_size))

    Images (encoders): `(zeros (B, image_size, image_size, num_channels),)`. Decoder: `(x_t, t, latent,
    label_onehot)` with t = 1/2 and None for the conditioning it does not take. Label anchors: `()`. Image models
    need `image_size` (the encoder's head widths depend on it); the label anchors ignore it.
    """
    return build(config).example_inputs(batch_size, image_size, num_channels)
