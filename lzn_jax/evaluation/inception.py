"""Inception-V3 for FID-type metrics: the FID variant of the 2015-12-05 network, as ported by pytorch-fid, in Linen.

One forward pass gives the pool3 features (FID, precision/recall), the sFID spatial features and the 1008-way logits
(Inception Score). Layer names follow pytorch-fid's state dict so that its weights file maps onto the parameters
one to one (docs/evaluation.md, "The Inception network").
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_CLASSES = 1008  # the 2015-12-05 graph's classifier: 1000 ImageNet classes plus 8 unused outputs
POOL_FEATURES = 2048
# sFID keeps the first 7 of the 192 channels of "mixed_6/conv" (docs/evaluation.md, "sFID features").
SPATIAL_CHANNELS = 7
BN_EPSILON = 1e-3  # TensorFlow's batch-norm epsilon in the original graph (torch's default would be 1e-5)
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75  # smallest square input for which every valid convolution and pooling still has an output
# Parameters in the sense of torch's `parameters()` (kernels, BN scale and bias, classifier); the BN running means
# and variances live in the "batch_stats" collection and are not counted.
NUM_PARAMS = 23_850_960

_HIGHEST = jax.lax.Precision.HIGHEST


class InceptionOutputs(NamedTuple):
    """What `InceptionV3` returns for a batch of B images."""

    pool: jax.Array  # (B, 2048): global average of the last mixed block ("pool_3"), the FID features
    spatial: jax.Array  # (B, 7 * h * w): "mixed_6/conv"[..., :7] flattened in (h, w, c) order; h = w = 17 at 299
    logits: jax.Array  # (B, 1008): pool @ W + b, the network's classifier
    logits_unbiased: jax.Array  # (B, 1008): pool @ W, what the Inception Score uses (docs/evaluation.md, "Metrics")


# ----------------------------------------------------------------------------------------------------------------
# Pooling: the two places where the FID network differs from torchvision's Inception-V3
# ----------------------------------------------------------------------------------------------------------------


def avg_pool_3x3_exclude_padding(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average with one pixel of padding, dividing by the number of *real* pixels in each window.

    TensorFlow's SAME average pool ignores the padding, so border outputs are means over 4 or 6 pixels, not 9
    (torch's `count_include_pad=False`). x: (B, H, W, C) -> (B, H, W, C).
    """
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 max with one pixel of -inf padding: the pool branch of the last block (Mixed_7c).

    The original graph uses a max pool there where the paper's architecture has an average; the FID numbers of the
    literature are computed with this quirk, so it is kept. x: (B, H, W, C) -> (B, H, W, C).
    """
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """3x3 stride-2 max without padding. x: (B, H, W, C) -> (B, (H - 3) // 2 + 1, (W - 3) // 2 + 1, C)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


# ----------------------------------------------------------------------------------------------------------------
# Layers and blocks. Every block returns its branches; the caller concatenates them along channels.
# ----------------------------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """Bias-free convolution, inference batch norm (eps 1e-3), ReLU: torchvision's `BasicConv2d`.

    Symmetric explicit padding `(pad_h, pad_w)`, as torch's; x: (B, H, W, C_in) -> (B, H', W', features).
    """

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: jax.lax.Precision | None = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad_h, pad_w = self.padding
        x = nn.Conv(
            self.features, self.kernel, strides=(self.stride, self.stride),
            padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, precision=self.precision, name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _unit(features, kernel, *, stride=1, padding=(0, 0), precision, name):
    """A `ConvBNReLU` with an int kernel/padding expanded to pairs."""
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return ConvBNReLU(features, kernel, stride, padding, precision, name=name)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool (padding excluded) -> 1x1.

    x: (B, H, W, C) -> branches with 64, 64, 96 and `pool_features` channels, spatial size unchanged.
    """

    pool_features: int
    precision: jax.lax.Precision | None = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        p = self.precision
        branch1x1 = _unit(64, 1, precision=p, name="branch1x1")(x)
        branch5x5 = _unit(48, 1, precision=p, name="branch5x5_1")(x)
        branch5x5 = _unit(64, 5, padding=2, precision=p, name="branch5x5_2")(branch5x5)
        branch3x3dbl = _unit(64, 1, precision=p, name="branch3x3dbl_1")(x)
        branch3x3dbl = _unit(96, 3, padding=1, precision=p, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = _unit(96, 3, padding=1, precision=p, name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = _unit(self.pool_features, 1, precision=p, name="branch_pool")(avg_pool_3x3_exclude_padding(x))
        return branch1x1, branch5x5, branch3x3dbl, branch_pool


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max-pool 3x3/2 (the input passes through).

    x: (B, H, W, C) -> branches with 384, 96 and C channels at ((H - 3) // 2 + 1, (W - 3) // 2 + 1).
    """

    precision: jax.lax.Precision | None = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        p = self.precision
        branch3x3 = _unit(384, 3, stride=2, precision=p, name="branch3x3")(x)
        branch3x3dbl = _unit(64, 1, precision=p, name="branch3x3dbl_1")(x)
        branch3x3dbl = _unit(96, 3, padding=1, precision=p, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = _unit(96, 3, stride=2, precision=p, name="branch3x3dbl_3")(branch3x3dbl)
        return branch3x3, branch3x3dbl, max_pool_3x3_stride2(x)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions and an avg-pool branch (padding excluded).

    x: (B, H, W, C) -> four branches of 192 channels each, spatial size unchanged. The first branch of Mixed_6d
    is the graph's "mixed_6/conv", whose first channels are the sFID features.
    """

    channels_7x7: int
    precision: jax.lax.Precision | None = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        p, c7 = self.precision, self.channels_7x7
        branch1x1 = _unit(192, 1, precision=p, name="branch1x1")(x)
        branch7x7 = _unit(c7, 1, precision=p, name="branch7x7_1")(x)
        branch7x7 = _unit(c7, (1, 7), padding=(0, 3), precision=p, name="branch7x7_2")(branch7x7)
        branch7x7 = _unit(192, (7, 1), padding=(3, 0), precision=p, name="branch7x7_3")(branch7x7)
        dbl = _unit(c7, 1, precision=p, name="branch7x7dbl_1")(x)
        dbl = _unit(c7, (7, 1), padding=(3, 0), precision=p, name="branch7x7dbl_2")(dbl)
        dbl = _unit(c7, (1, 7), padding=(0, 3), precision=p, name="branch7x7dbl_3")(dbl)
        dbl = _unit(c7, (7, 1), padding=(3, 0), precision=p, name="branch7x7dbl_4")(dbl)
        dbl = _unit(192, (1, 7), padding=(0, 3), precision=p, name="branch7x7dbl_5")(dbl)
        branch_pool = _unit(192, 1, precision=p, name="branch_pool")(avg_pool_3x3_exclude_padding(x))
        return branch1x1, branch7x7, dbl, branch_pool


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max-pool 3x3/2.

    x: (B, H, W, C) -> branches with 320, 192 and C channels at ((H - 3) // 2 + 1, (W - 3) // 2 + 1).
    """

    precision: jax.lax.Precision | None = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        p = self.precision
        branch3x3 = _unit(192, 1, precision=p, name="branch3x3_1")(x)
        branch3x3 = _unit(320, 3, stride=2, precision=p, name="branch3x3_2")(branch3x3)
        branch7x7x3 = _unit(192, 1, precision=p, name="branch7x7x3_1")(x)
        branch7x7x3 = _unit(192, (1, 7), padding=(0, 3), precision=p, name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = _unit(192, (7, 1), padding=(3, 0), precision=p, name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = _unit(192, 3, stride=2, precision=p, name="branch7x7x3_4")(branch7x7x3)
        return branch3x3, branch7x7x3, max_pool_3x3_stride2(x)


class FIDInceptionE(nn.Module):
    """8x8 block (Mixed_7b with an average pool that excludes padding, Mixed_7c with a max pool).

    Branches: 1x1 (320) | 1x1 -> {1x3, 3x1} (384 + 384) | 1x1 -> 3x3 -> {1x3, 3x1} (384 + 384) | pool -> 1x1 (192),
    returned as six arrays in torch's concatenation order. x: (B, H, W, C) -> spatial size unchanged, 2048 channels.
    """

    pool: str  # "avg" (Mixed_7b) or "max" (Mixed_7c)
    precision: jax.lax.Precision | None = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if self.pool not in ("avg", "max"):
            raise ValueError(f"FIDInceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
        p = self.precision
        branch1x1 = _unit(320, 1, precision=p, name="branch1x1")(x)
        branch3x3 = _unit(384, 1, precision=p, name="branch3x3_1")(x)
        branch3x3_a = _unit(384, (1, 3), padding=(0, 1), precision=p, name="branch3x3_2a")(branch3x3)
        branch3x3_b = _unit(384, (3, 1), padding=(1, 0), precision=p, name="branch3x3_2b")(branch3x3)
        dbl = _unit(448, 1, precision=p, name="branch3x3dbl_1")(x)
        dbl = _unit(384, 3, padding=1, precision=p, name="branch3x3dbl_2")(dbl)
        dbl_a = _unit(384, (1, 3), padding=(0, 1), precision=p, name="branch3x3dbl_3a")(dbl)
        dbl_b = _unit(384, (3, 1), padding=(1, 0), precision=p, name="branch3x3dbl_3b")(dbl)
        pooled = avg_pool_3x3_exclude_padding(x) if self.pool == "avg" else max_pool_3x3_same(x)
        branch_pool = _unit(192, 1, precision=p, name="branch_pool")(pooled)
        return branch1x1, branch3x3_a, branch3x3_b, dbl_a, dbl_b, branch_pool


class Classifier(nn.Module):
    """The 2048 -> 1008 fully connected layer, returning its output with and without the bias."""

    features: int = NUM_CLASSES
    precision: jax.lax.Precision | None = _HIGHEST

    @nn.compact
    def __call__(self, pool: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        unbiased = jnp.dot(pool, kernel, precision=self.precision)
        return unbiased + bias, unbiased


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------


def _cat(branches: tuple[jax.Array, ...]) -> jax.Array:
    return jnp.concatenate(branches, axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-V3 (23,850,960 parameters plus BN statistics in "batch_stats"), evaluation mode only.

    Input: (B, H, W, 3) float32 already resized and normalised to the network's range (`preprocess.py`); the
    metrics use 299 x 299, any square size >= 75 runs (tests use small ones). Output: `InceptionOutputs`.
    `precision` applies to every convolution and the classifier; HIGHEST keeps float32 on accelerators whose
    default would round the operands (TF32 on NVIDIA GPUs), which moves features by ~1e-3 relative.
    """

    precision: jax.lax.Precision | None = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> InceptionOutputs:
        p = self.precision
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects images (B, H, W, 3), got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"InceptionV3 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {x.shape}")
        x = _unit(32, 3, stride=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = _unit(32, 3, precision=p, name="Conv2d_2a_3x3")(x)
        x = _unit(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)
        x = max_pool_3x3_stride2(x)
        x = _unit(80, 1, precision=p, name="Conv2d_3b_1x1")(x)
        x = _unit(192, 3, precision=p, name="Conv2d_4a_3x3")(x)
        x = max_pool_3x3_stride2(x)
        x = _cat(FIDInceptionA(32, p, name="Mixed_5b")(x))
        x = _cat(FIDInceptionA(64, p, name="Mixed_5c")(x))
        x = _cat(FIDInceptionA(64, p, name="Mixed_5d")(x))
        x = _cat(InceptionB(p, name="Mixed_6a")(x))
        x = _cat(FIDInceptionC(128, p, name="Mixed_6b")(x))
        x = _cat(FIDInceptionC(160, p, name="Mixed_6c")(x))
        branches = FIDInceptionC(160, p, name="Mixed_6d")(x)
        spatial = branches[0][..., :SPATIAL_CHANNELS]
        x = _cat(branches)
        x = _cat(FIDInceptionC(192, p, name="Mixed_6e")(x))
        x = _cat(InceptionD(p, name="Mixed_7a")(x))
        x = _cat(FIDInceptionE("avg", p, name="Mixed_7b")(x))
        x = _cat(FIDInceptionE("max", p, name="Mixed_7c")(x))
        pool = jnp.mean(x, axis=(1, 2))
        logits, logits_unbiased = Classifier(NUM_CLASSES, p, name="fc")(pool)
        return InceptionOutputs(
            pool=pool, spatial=spatial.reshape(spatial.shape[0], -1), logits=logits, logits_unbiased=logits_unbiased
        )


@functools.lru_cache(maxsize=4)
def abstract_variables(input_size: int = INPUT_SIZE) -> dict:
    """The variable tree {"params", "batch_stats"} of `InceptionV3` as ShapeDtypeStructs (nothing is computed).

    Cached: treat the result as read-only. Parameter shapes do not depend on `input_size`.
    """
    images = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), images)


def count_params(params) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
