"""ResNet-50 with GroupNorm and a projection head: the image encoder of case study 2 (docs/method.md, 'Models').

v1.5 bottlenecks (stride on the 3x3 conv), GroupNorm(32, eps 1e-5) everywhere instead of BatchNorm, PyTorch-default
initialisation, the last norm of every block starting at zero, and inputs mapped from [-1, 1] back to [0, 1].
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from lzn_jax.models import layers

RESNET_GROUP_NORM_EPS = 1e-5  # PyTorch's GroupNorm default, used by the reference ResNet.


def _conv(features: int, kernel: int, stride: int = 1, *, dtype: DTypeLike, name: str) -> nn.Conv:
    """Bias-free conv with PyTorch's symmetric padding (k-1)//2 and default init uniform(+-1/sqrt(fan_in)).

    Explicit padding matters for stride 2: flax's 'SAME' would pad only on the bottom/right.
    """
    pad = (kernel - 1) // 2
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
        kernel_init=layers.torch_linear_kernel_init(), dtype=dtype, param_dtype=jnp.float32, name=name,
    )


def _group_norm(*, dtype: DTypeLike, zero_scale: bool = False, num_groups: int = 32, name: str) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-5) in `at_least_float32(dtype)`; `zero_scale` starts gamma at 0 (a silent branch)."""
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=RESNET_GROUP_NORM_EPS, dtype=layers.at_least_float32(dtype),
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones, name=name,
    )


class ResNetOutput(NamedTuple):
    """What `ResNetGN` returns: the contrastive step uses the anchors, the linear probe the features."""

    anchors: jax.Array  # (B, latent_dim): the projection head's output (the features when there is no head)
    features: jax.Array  # (B, 2048 * width_multiplier): globally pooled backbone features


class BottleneckBlock(nn.Module):
    """1x1 -> GN -> ReLU -> 3x3(stride) -> GN -> ReLU -> 1x1(4w) -> GN(gamma 0); out = ReLU(shortcut + branch)."""

    width: int
    stride: int = 1
    use_projection: bool = False
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H / stride, W / stride, 4 * width)."""
        shortcut = x
        if self.use_projection:
            shortcut = _conv(4 * self.width, 1, self.stride, dtype=self.dtype, name="proj_conv")(x)
            shortcut = _group_norm(dtype=self.dtype, name="proj_norm")(shortcut)
        h = _conv(self.width, 1, dtype=self.dtype, name="conv_0")(x)
        h = nn.relu(_group_norm(dtype=self.dtype, name="norm_0")(h))
        h = _conv(self.width, 3, self.stride, dtype=self.dtype, name="conv_1")(h)
        h = nn.relu(_group_norm(dtype=self.dtype, name="norm_1")(h))
        h = _conv(4 * self.width, 1, dtype=self.dtype, name="conv_2")(h)
        h = _group_norm(dtype=self.dtype, zero_scale=True, name="norm_2")(h)
        return nn.relu(shortcut.astype(h.dtype) + h).astype(self.dtype)


class ResNetGN(nn.Module):
    """ResNet with GroupNorm (SimCLRv2 layout, no selective kernels) and a contrastive projection head.

    `head_num_layers`: 0 returns the backbone features as anchors; 1 = Linear(->D, no bias) -> GN;
    2 = Linear(->2048, no bias) -> GN -> ReLU -> Linear(->D, no bias) -> GN (the configured head).
    """

    latent_dim: int = 256
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width_multiplier: int = 1
    head_num_layers: int = 2
    head_num_groups: int = 32
    dtype: DTypeLike = jnp.float32
    remat: bool = False

    def _backbone(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) in [-1, 1] -> globally pooled features (B, 2048 * width_multiplier) at least float32."""
        float_dtype = layers.at_least_float32(self.dtype)
        # The reference feeds [0, 1] images without ImageNet mean/std normalisation.
        h = ((x.astype(float_dtype) + 1.0) / 2.0).astype(self.dtype)
        base = 64 * self.width_multiplier
        h = _conv(base, 7, 2, dtype=self.dtype, name="stem_conv")(h)
        h = nn.relu(_group_norm(dtype=self.dtype, name="stem_norm")(h)).astype(self.dtype)
        h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block_cls = nn.remat(BottleneckBlock) if self.remat else BottleneckBlock
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                h = block_cls(
                    width=base * 2**stage, stride=2 if (stage > 0 and block == 0) else 1,
                    use_projection=block == 0, dtype=self.dtype, name=f"stage_{stage}_block_{block}",
                )(h)
        return jnp.mean(h.astype(float_dtype), axis=(1, 2))

    def _head(self, features: jax.Array) -> jax.Array:
        """(B, F) -> (B, latent_dim) at least float32."""
        h = features
        for i in range(self.head_num_layers):
            last = i == self.head_num_layers - 1
            width = self.latent_dim if last else features.shape[-1]
            h = layers.TorchLinear(width, use_bias=False, dtype=self.dtype, name=f"head_dense_{i}")(h)
            h = _group_norm(dtype=self.dtype, num_groups=self.head_num_groups, name=f"head_norm_{i}")(h)
            if not last:
                h = nn.relu(h)
        return h.astype(layers.at_least_float32(self.dtype))

    @nn.nowrap
    def example_inputs(
        self, batch_size: int, image_size: int | None = None, num_channels: int = 3
    ) -> tuple[jax.Array]:
        """Zero images (B, image_size, image_size, num_channels): `init(rng, *example_inputs(...))`."""
        return (layers.zero_images(batch_size, image_size, num_channels, model="ResNetGN"),)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> ResNetOutput:
        """x: (B, H, W, C) in [-1, 1] -> ResNetOutput(anchors (B, latent_dim), features (B, 2048 * width_multiplier)).

        Both are float32 (float64 in a float64 model). `train` is accepted for interface uniformity; GroupNorm and no
        dropout make both modes identical.
        """
        del train
        features = self._backbone(x)
        anchors = self._head(features) if self.head_num_layers > 0 else features
        return ResNetOutput(anchors=anchors, features=features)
