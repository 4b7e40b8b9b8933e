"""Building blocks of the NCSN++ U-Net (docs/method.md, 'Models'), written for flax.linen in NHWC layout.

Every block takes a compute ``dtype`` (convolutions and matmuls run in it) while parameters stay float32 and group
norms, softmaxes and time embeddings run in `at_least_float32(dtype)`.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

# GroupNorm epsilon of the NCSN++ family (PyTorch's default would be 1e-5).
GROUP_NORM_EPS = 1e-6
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
# The attention block's query, key and value layers (NIN layers in NCSN++) start at a tenth of the DDPM scale.
_NIN_INIT_SCALE = 0.1


def at_least_float32(compute_dtype: DTypeLike) -> jnp.dtype:
    """The dtype of norms, softmax logits, embeddings and outputs: float32, or float64 in a float64 model.

    bfloat16 and float16 compute keep these in float32, where the small differences they carry survive.
    """
    return jnp.promote_types(compute_dtype, jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Initialisers
# ----------------------------------------------------------------------------------------------------------------


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a dense (in, out) or HWIO conv kernel: receptive field times in/out channels."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def _flat_uniform(key: jax.Array, shape: Sequence[int], bound: float, dtype: DTypeLike) -> jax.Array:
    """uniform(-bound, bound) of `shape`, drawn as one flat vector and reshaped.

    Same distribution as drawing the shape directly, but XLA:CPU compiles the rank-1 random-bit generator far faster
    than rank-4 ones, which dominates model init time (and test time) on CPU.
    """
    size = int(np.prod(shape))
    return jax.random.uniform(key, (size,), dtype, minval=-bound, maxval=bound).reshape(shape)


def ddpm_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDPM variance-scaling initialiser: fan_avg, uniform; a scale of 0 becomes 1e-10 (near-zero, not zero).

    Bound sqrt(3 * scale / fan_avg). A literal zero would make the layer's gradient w.r.t. its input vanish; 1e-10
    keeps it alive while the block still starts as an identity.
    """
    scale = 1e-10 if scale == 0 else scale

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = _fans(shape)
        return _flat_uniform(key, shape, math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0)), dtype)

    return init


def torch_linear_kernel_init() -> nn.initializers.Initializer:
    """PyTorch's default Linear/Conv weight init, Kaiming-uniform(a=sqrt 5), i.e. uniform(+-1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        fan_in, _ = _fans(shape)
        return _flat_uniform(key, shape, 1.0 / math.sqrt(fan_in), dtype)

    return init


def _symmetric_uniform(bound: float) -> nn.initializers.Initializer:
    """uniform(-bound, bound) initialiser."""

    def init(key, shape, dtype=jnp.float32):
        return _flat_uniform(key, shape, bound, dtype)

    return init


def normal_init(stddev: float = 1.0) -> nn.initializers.Initializer:
    """N(0, stddev^2) initialiser drawn flat and reshaped (see `_flat_uniform` for why)."""

    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)

    return init


class TorchLinear(nn.Module):
    """Dense layer with PyTorch's default init: weights and bias uniform(+-1/sqrt(fan_in)).

    flax's ``bias_init`` never sees the fan-in, so the bias is drawn here where the input size is known.
    """

    features: int
    use_bias: bool = True
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., fan_in) -> (..., features)."""
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_linear_kernel_init(), (fan_in, self.features), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bound = 1.0 / math.sqrt(fan_in)
            bias = self.param("bias", _symmetric_uniform(bound), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


# ----------------------------------------------------------------------------------------------------------------
# Small layer factories (each returns an unbound flax module; names are given by the caller)
# ----------------------------------------------------------------------------------------------------------------


def group_norm(num_channels: int, *, dtype: DTypeLike = jnp.float32, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm with min(C // 4, 32) groups and eps 1e-6, computed and returned in `at_least_float32(dtype)`."""
    return nn.GroupNorm(
        num_groups=min(num_channels // 4, 32), epsilon=GROUP_NORM_EPS, dtype=at_least_float32(dtype), name=name
    )


def ddpm_conv(
    features: int, kernel_size: int, *, init_scale: float = 1.0, dtype: DTypeLike = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """Stride-1 convolution with bias, zero 'same' padding and DDPM init (1x1 for shortcuts, 3x3 elsewhere)."""
    return nn.Conv(
        features, (kernel_size, kernel_size), padding="SAME", kernel_init=ddpm_init(init_scale), dtype=dtype,
        param_dtype=jnp.float32, name=name,
    )


def ddpm_dense(
    features: int, *, init_scale: float = 1.0, dtype: DTypeLike = jnp.float32, name: str | None = None
) -> nn.Dense:
    """Dense layer over the last axis with DDPM init and zero bias: the conditioning MLP and NIN layers."""
    return nn.Dense(features, kernel_init=ddpm_init(init_scale), dtype=dtype, param_dtype=jnp.float32, name=name)


# ----------------------------------------------------------------------------------------------------------------
# Resampling: FIR (upfirdn with a separable kernel) and naive
# ----------------------------------------------------------------------------------------------------------------


def _fir_filter_2d(kernel_1d: Sequence[float], gain: float) -> np.ndarray:
    """Normalised separable 2-D FIR kernel: outer(k, k) / sum * gain, shape (K, K)."""
    k = np.asarray(kernel_1d, dtype=np.float64)
    k2 = np.outer(k, k)
    return k2 / k2.sum() * gain


def _depthwise_fir(x: jax.Array, kernel_2d: np.ndarray, *, stride: int, lhs_dilation: int, padding) -> jax.Array:
    """Applies the same (K, K) filter to every channel of x (B, H, W, C) in x's dtype."""
    channels = x.shape[-1]
    # The filter is correlated, not convolved; flipping makes it a true convolution (upfirdn semantics) even for
    # asymmetric kernels.
    k = np.ascontiguousarray(kernel_2d[::-1, ::-1])
    rhs = jnp.asarray(np.tile(k[:, :, None, None], (1, 1, 1, channels)), dtype=x.dtype)
    return jax.lax.conv_general_dilated(
        x, rhs, window_strides=(stride, stride), padding=padding, lhs_dilation=(lhs_dilation, lhs_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
    )


def fir_upsample_2d(x: jax.Array, kernel_1d: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> jax.Array:
    """FIR upsampling (StyleGAN2 / NCSN++): zero-insert by `factor`, then filter with gain factor**2.

    x: (B, H, W, C) -> (B, factor*H, factor*W, C). With the kernel [1, 3, 3, 1] this is the bilinear-like
    up-sampler of NCSN++; constants stay constant.
    """
    k = _fir_filter_2d(kernel_1d, gain=factor**2)
    p = k.shape[0] - factor
    pad_lo, pad_hi = (p + 1) // 2 + factor - 1, p // 2
    # lhs_dilation leaves out the factor-1 trailing zeros that upfirdn inserts after the last sample; add them
    # to the high-side padding so the output has exactly factor*H rows.
    pad = ((pad_lo, pad_hi + factor - 1),) * 2
    return _depthwise_fir(x, k, stride=1, lhs_dilation=factor, padding=pad)


def fir_downsample_2d(x: jax.Array, kernel_1d: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> jax.Array:
    """FIR downsampling: filter with unit gain, keep every `factor`-th sample. (B, H, W, C) -> (B, H/f, W/f, C)."""
    k = _fir_filter_2d(kernel_1d, gain=1.0)
    p = k.shape[0] - factor
    pad = (((p + 1) // 2, p // 2),) * 2
    return _depthwise_fir(x, k, stride=factor, lhs_dilation=1, padding=pad)


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling. (B, H, W, C) -> (B, f*H, f*W, C)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Average pooling over non-overlapping f x f windows. (B, H, W, C) -> (B, H/f, W/f, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample_2d(x: jax.Array, *, fir: bool, fir_kernel: Sequence[float]) -> jax.Array:
    """Factor-2 upsampling, FIR or naive as configured."""
    return fir_upsample_2d(x, fir_kernel) if fir else naive_upsample_2d(x)


def downsample_2d(x: jax.Array, *, fir: bool, fir_kernel: Sequence[float]) -> jax.Array:
    """Factor-2 downsampling, FIR or naive as configured."""
    return fir_downsample_2d(x, fir_kernel) if fir else naive_downsample_2d(x)


# ----------------------------------------------------------------------------------------------------------------
# Time embeddings
# ----------------------------------------------------------------------------------------------------------------


def sinusoidal_embedding(timesteps: jax.Array, dim: int, max_positions: int = 10000) -> jax.Array:
    """Transformer-style embedding of scalar times: [sin(t w_k), cos(t w_k)], w_k = max_positions^(-k/(dim/2-1)).

    timesteps: (B,) -> (B, dim) in `at_least_float32(timesteps.dtype)`. Odd `dim` gets one zero column at the end.
    """
    dtype = at_least_float32(timesteps.dtype)
    half = dim // 2
    log_step = math.log(max_positions) / (half - 1)
    freqs = jnp.exp(-log_step * jnp.arange(half, dtype=dtype))
    args = timesteps.astype(dtype)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar: [sin(2 pi w x), cos(2 pi w x)] with fixed w ~ N(0, scale^2).

    The frequencies live in 'params' (so checkpoints and parameter counts match the reference, which registers them
    as a non-trainable parameter) but no gradient ever reaches them.
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B,) -> (B, 2 * embedding_size) in `at_least_float32(x.dtype)`."""
        w = self.param("frequencies", normal_init(self.scale), (self.embedding_size,), jnp.float32)
        w = jax.lax.stop_gradient(w)
        proj = x.astype(at_least_float32(x.dtype))[:, None] * w[None, :] * (2.0 * np.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------


def _residual_out(x: jax.Array, h: jax.Array, skip_rescale: bool) -> jax.Array:
    """x + h in h's (compute) dtype, divided by sqrt(2) when `skip_rescale`. x, h: (B, H, W, C)."""
    out = x.astype(h.dtype) + h
    # A Python float keeps bfloat16 activations bfloat16 (a NumPy scalar would promote them to float32).
    return out * _INV_SQRT2 if skip_rescale else out


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block of NCSN++, optionally resampling by 2 (docs/method.md, 'Models').

    h = conv3(up/down(act(GN(x)))) [+ Dense(act(temb))]; h = conv3_init_scale(dropout(act(GN(h))));
    out = (shortcut(up/down(x)) + h) / sqrt(2).
    """

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    fir: bool = False
    fir_kernel: Sequence[float] = (1, 3, 3, 1)
    init_scale: float = 0.0
    skip_rescale: bool = True
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, train: bool = False) -> jax.Array:
        """x: (B, H, W, C_in); temb: (B, T) or None -> (B, H', W', out_ch) with H' = 2H (up), H/2 (down) or H."""
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = nn.silu(group_norm(in_ch, dtype=self.dtype, name="norm_0")(x)).astype(self.dtype)
        if self.up:
            h = upsample_2d(h, fir=self.fir, fir_kernel=self.fir_kernel)
            x = upsample_2d(x, fir=self.fir, fir_kernel=self.fir_kernel)
        elif self.down:
            h = downsample_2d(h, fir=self.fir, fir_kernel=self.fir_kernel)
            x = downsample_2d(x, fir=self.fir, fir_kernel=self.fir_kernel)
        h = ddpm_conv(out_ch, 3, dtype=self.dtype, name="conv_0")(h)
        if temb is not None:
            h = h + ddpm_dense(out_ch, dtype=self.dtype, name="temb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(out_ch, dtype=self.dtype, name="norm_1")(h)).astype(self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = ddpm_conv(out_ch, 3, init_scale=self.init_scale, dtype=self.dtype, name="conv_1")(h)
        if in_ch != out_ch or self.up or self.down:
            x = ddpm_conv(out_ch, 1, dtype=self.dtype, name="shortcut")(x)
        return _residual_out(x, h, self.skip_rescale)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with a residual (docs/method.md, 'Models')."""

    init_scale: float = 0.0
    skip_rescale: bool = True
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, height, width, c = x.shape
        h = group_norm(c, dtype=self.dtype, name="norm")(x)
        q, k, v = (
            ddpm_dense(c, init_scale=_NIN_INIT_SCALE, dtype=self.dtype, name=name)(h).reshape(b, height * width, c)
            for name in ("query", "key", "value")
        )
        # Logits and softmax in at least float32 whatever the compute dtype: bf16 logits lose the small differences.
        logits_dtype = at_least_float32(self.dtype)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=logits_dtype) * (c**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, height, width, c)
        h = ddpm_dense(c, init_scale=self.init_scale, dtype=self.dtype, name="out")(h)
        return _residual_out(x, h, self.skip_rescale)


class Combine(nn.Module):
    """Input-skip combine, method 'sum': conv1x1(pyramid) + h."""

    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, pyramid: jax.Array, h: jax.Array) -> jax.Array:
        """pyramid: (B, H, W, C_p), h: (B, H, W, C) -> (B, H, W, C)."""
        return ddpm_conv(h.shape[-1], 1, dtype=self.dtype, name="conv")(pyramid) + h.astype(self.dtype)


def zero_images(batch_size: int, image_size: int | None, num_channels: int, *, model: str) -> jax.Array:
    """Float32 zeros (batch_size, image_size, image_size, num_channels): the example input of an image model."""
    if image_size is None:
        raise ValueError(f"{model} takes images: pass image_size to example_inputs")
    return jnp.zeros((batch_size, image_size, image_size, num_channels), jnp.float32)
