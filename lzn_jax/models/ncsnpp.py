"""NCSN++ image encoder (anchors from latent heads on every feature map) and rectified-flow decoder.

Both share the downsampling trunk of the NCSN++ U-Net with BigGAN residual blocks (docs/method.md, 'Models'). NHWC
throughout; the encoder's heads flatten channel-major so that released PyTorch weights map one to one.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from lzn_jax.models import layers

# The reference multiplies the rectified-flow time in [0, 1] by 999 before embedding it (Rectified Flow's
# discrete-time range); the 256x256 models also divide their output by this scaled time (`scale_by_sigma`).
TIME_SCALE = 999.0


def _scaled_time(t: jax.Array, dtype: DTypeLike) -> jax.Array:
    """Rectified-flow time (B,) clamped to [0, 1] and scaled by TIME_SCALE, in `dtype`."""
    return jnp.clip(t.astype(dtype), 0.0, 1.0) * TIME_SCALE


class _NCSNppTrunk(nn.Module):
    """Hyper-parameters and the downsampling half shared by the NCSN++ encoder and decoder."""

    nf: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.15
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    progressive_input: str = "none"
    dtype: DTypeLike = jnp.float32
    remat: bool = False

    def _resblock(self, name: str, **kwargs) -> layers.ResnetBlockBigGAN:
        """A BigGAN residual block with the trunk's settings, rematerialised when `remat` is set."""
        # static_argnums counts `self` as 0: (x=1, temb=2, train=3); `train` picks Python control flow.
        cls = nn.remat(layers.ResnetBlockBigGAN, static_argnums=(3,)) if self.remat else layers.ResnetBlockBigGAN
        return cls(
            dropout=self.dropout, fir=self.fir, fir_kernel=tuple(self.fir_kernel), init_scale=self.init_scale,
            skip_rescale=self.skip_rescale, dtype=self.dtype, name=name, **kwargs,
        )

    def _attn(self, name: str) -> layers.AttnBlock:
        """An attention block with the trunk's settings, rematerialised when `remat` is set."""
        # Its (B, HW, HW) logits and softmax stay float32 in any dtype: with only the residual blocks rematerialised,
        # the attention blocks held a fifth of CIFAR10's remaining activations (docs/scaling.md, "Global batch 65,536").
        cls = nn.remat(layers.AttnBlock) if self.remat else layers.AttnBlock
        return cls(init_scale=self.init_scale, skip_rescale=self.skip_rescale, dtype=self.dtype, name=name)

    def _downsampling_path(self, x: jax.Array, temb: jax.Array | None, train: bool) -> list[jax.Array]:
        """Runs the input conv, the residual levels and the down blocks; returns every feature map in order.

        x: (B, H, W, C) -> list of (B, H / 2^level, W / 2^level, C_level): the input conv output, each residual block
        output (after its attention block), each down-block output (after the input-skip combine).
        """
        if self.progressive_input not in ("none", "input_skip"):
            raise ValueError(f"progressive_input must be 'none' or 'input_skip', got {self.progressive_input!r}")
        input_pyramid = x
        hs = [layers.ddpm_conv(self.nf, 3, dtype=self.dtype, name="conv_in")(x)]
        num_levels = len(self.ch_mult)
        for level in range(num_levels):
            for block in range(self.num_res_blocks):
                h = self._resblock(f"down_{level}_block_{block}", out_ch=self.nf * self.ch_mult[level])(
                    hs[-1], temb, train
                )
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn(f"down_{level}_attn_{block}")(h)
                hs.append(h)
            if level != num_levels - 1:
                h = self._resblock(f"down_{level}_resample", down=True)(hs[-1], temb, train)
                if self.progressive_input == "input_skip":
                    input_pyramid = layers.downsample_2d(input_pyramid, fir=self.fir, fir_kernel=self.fir_kernel)
                    h = layers.Combine(dtype=self.dtype, name=f"down_{level}_combine")(input_pyramid, h)
                hs.append(h)
        return hs

    def _middle(self, h: jax.Array, temb: jax.Array | None, train: bool) -> jax.Array:
        """ResBlock -> attention -> ResBlock at the lowest resolution; shape preserved."""
        h = self._resblock("mid_block_0")(h, temb, train)
        h = self._attn("mid_attn")(h)
        return self._resblock("mid_block_1")(h, temb, train)


class LatentHead(nn.Module):
    """Maps one feature map to a D-dim contribution to the anchor: conv1x1 -> SiLU -> flatten -> MLP.

    The conv has `num_base_channels` outputs; the MLP has `num_latent_transformation_layers` >= 2 PyTorch-initialised
    linear layers (hidden width `num_base_units`, SiLU between them). The reference builds two layers even when asked
    for fewer, so fewer are refused rather than silently changed. Field names are the encoder's, which passes them on.
    """

    latent_dim: int
    num_base_channels: int = 20
    num_base_units: int = 200
    num_latent_transformation_layers: int = 2
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, feature_map: jax.Array) -> jax.Array:
        """feature_map: (B, r, r, C) -> (B, latent_dim) float32 (float64 in a float64 model)."""
        num_layers = self.num_latent_transformation_layers
        if num_layers < 2:
            raise ValueError(
                f"LatentHead.num_latent_transformation_layers must be >= 2 (the reference always builds two linear "
                f"layers), got {num_layers}"
            )
        h = nn.silu(layers.ddpm_conv(self.num_base_channels, 1, dtype=self.dtype, name="conv")(feature_map))
        # Channel-major (NCHW) flatten, as the reference does, so its first Linear's weights load unchanged.
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)
        for i in range(num_layers - 1):
            h = nn.silu(layers.TorchLinear(self.num_base_units, dtype=self.dtype, name=f"dense_{i}")(h))
        out = layers.TorchLinear(self.latent_dim, dtype=self.dtype, name=f"dense_{num_layers - 1}")(h)
        return out.astype(layers.at_least_float32(self.dtype))


class NCSNppEncoder(_NCSNppTrunk):
    """NCSN++ image encoder: the downsampling half of the U-Net with no time input plus a latent head per feature map.

    The anchor is the sum of the heads over all feature maps (input conv, every residual and down block, the middle
    block); with `latent_transformation_resolutions` set, maps at other resolutions have no head.
    """

    latent_dim: int = 200
    num_base_channels: int = 20
    num_base_units: int = 200
    num_latent_transformation_layers: int = 2
    latent_transformation_resolutions: Sequence[int] | None = None

    @nn.nowrap
    def example_inputs(
        self, batch_size: int, image_size: int | None = None, num_channels: int = 3
    ) -> tuple[jax.Array]:
        """Zero images (B, image_size, image_size, num_channels): `init(rng, *example_inputs(...))`."""
        return (layers.zero_images(batch_size, image_size, num_channels, model="NCSNppEncoder"),)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """x: (B, H, W, C) images in [-1, 1] -> anchors (B, latent_dim) float32 (float64 in a float64 model).

        `train=True` enables dropout and then needs the 'dropout' RNG stream.
        """
        feature_maps = self._downsampling_path(x, None, train)
        feature_maps.append(self._middle(feature_maps[-1], None, train))
        anchors = jnp.zeros((x.shape[0], self.latent_dim), layers.at_least_float32(self.dtype))
        for i, fmap in enumerate(feature_maps):
            resolutions = self.latent_transformation_resolutions
            if resolutions is not None and fmap.shape[1] not in resolutions:
                continue
            anchors = anchors + LatentHead(
                latent_dim=self.latent_dim, num_base_channels=self.num_base_channels,
                num_base_units=self.num_base_units,
                num_latent_transformation_layers=self.num_latent_transformation_layers, dtype=self.dtype,
                name=f"head_{i}",
            )(fmap)
        return anchors


class NCSNppDecoder(_NCSNppTrunk):
    """Rectified-flow NCSN++ U-Net predicting the velocity x1 - x0, conditioned on [latent, one-hot class, time].

    `latent_dim=0` gives the plain Rectified Flow baseline; `num_classes>0` adds a one-hot class input.
    """

    latent_dim: int = 200
    num_classes: int = 0
    conditional: bool = True
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    progressive: str = "none"
    scale_by_sigma: bool = False

    def _conditioning(self, t: jax.Array, latent: jax.Array | None, label_onehot: jax.Array | None) -> jax.Array | None:
        """Builds the vector fed to every residual block: Dense(4nf)(SiLU(Dense(4nf)(concat[...]))). (B, 4nf)."""
        dtype = layers.at_least_float32(self.dtype)
        t_scaled = _scaled_time(t, dtype)
        parts = []
        if self.latent_dim > 0:
            if latent is None:
                raise ValueError(f"this decoder has latent_dim={self.latent_dim}; pass `latent` of shape (B, D)")
            parts.append(latent.astype(dtype))
        elif latent is not None:
            raise ValueError("this decoder has latent_dim=0 (plain rectified flow) but a latent was given")
        if self.num_classes > 0:
            if label_onehot is None:
                raise ValueError(f"this decoder has num_classes={self.num_classes}; pass `label_onehot` (B, C)")
            parts.append(label_onehot.astype(dtype))
        if self.conditional:
            if self.embedding_type == "positional":
                parts.append(layers.sinusoidal_embedding(t_scaled, self.nf))
            elif self.embedding_type == "fourier":
                fourier = layers.GaussianFourierProjection(self.nf, self.fourier_scale, name="time_fourier")
                parts.append(fourier(jnp.log(t_scaled)))
            else:
                raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {self.embedding_type!r}")
        if not parts:
            return None
        cond = jnp.concatenate(parts, axis=-1)
        cond = layers.ddpm_dense(4 * self.nf, dtype=self.dtype, name="cond_dense_0")(cond)
        return layers.ddpm_dense(4 * self.nf, dtype=self.dtype, name="cond_dense_1")(nn.silu(cond))

    def _output_conv(self, h: jax.Array, channels: int, name: str) -> jax.Array:
        """GN -> SiLU -> conv3x3 to image channels with the near-zero `init_scale`."""
        h = nn.silu(layers.group_norm(h.shape[-1], dtype=self.dtype, name=f"{name}_norm")(h))
        return layers.ddpm_conv(channels, 3, init_scale=self.init_scale, dtype=self.dtype, name=f"{name}_conv")(h)

    @nn.nowrap
    def example_inputs(
        self, batch_size: int, image_size: int | None = None, num_channels: int = 3
    ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """(x_t, t, latent, label_onehot) as `__call__` takes them: zero images, t = 1/2, zero conditioning or None.

        t is an interior time because t = 0 would make the Fourier embedding's log-time -inf.
        """
        images = layers.zero_images(batch_size, image_size, num_channels, model="NCSNppDecoder")
        t = jnp.full((batch_size,), 0.5, jnp.float32)
        latent = jnp.zeros((batch_size, self.latent_dim), jnp.float32) if self.latent_dim > 0 else None
        label_onehot = jnp.zeros((batch_size, self.num_classes), jnp.float32) if self.num_classes > 0 else None
        return images, t, latent, label_onehot

    @nn.compact
    def __call__(
        self,
        x_t: jax.Array,
        t: jax.Array,
        latent: jax.Array | None = None,
        label_onehot: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Velocity of the image rectified flow (time 0 = noise, 1 = data).

        x_t: (B, H, W, C) noisy images; t: (B,) in [0, 1]; latent: (B, latent_dim) or None;
        label_onehot: (B, num_classes) or None. Returns (B, H, W, C) float32 (float64 in a float64 model).
        """
        if self.progressive not in ("none", "output_skip"):
            raise ValueError(f"progressive must be 'none' or 'output_skip', got {self.progressive!r}")
        temb = self._conditioning(t, latent, label_onehot)
        hs = self._downsampling_path(x_t, temb, train)
        h = self._middle(hs[-1], temb, train)

        channels = x_t.shape[-1]
        pyramid = None
        num_levels = len(self.ch_mult)
        for level in reversed(range(num_levels)):
            for block in range(self.num_res_blocks + 1):
                h = self._resblock(f"up_{level}_block_{block}", out_ch=self.nf * self.ch_mult[level])(
                    jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1), temb, train
                )
            if h.shape[1] in self.attn_resolutions:
                h = self._attn(f"up_{level}_attn")(h)
            if self.progressive == "output_skip":
                skip = self._output_conv(h, channels, f"up_{level}_pyramid")
                if pyramid is None:
                    pyramid = skip
                else:
                    pyramid = layers.upsample_2d(pyramid, fir=self.fir, fir_kernel=self.fir_kernel) + skip
            if level != 0:
                h = self._resblock(f"up_{level}_resample", up=True)(h, temb, train)
        assert not hs, "every skip connection must be consumed"

        out = pyramid if self.progressive == "output_skip" else self._output_conv(h, channels, "out")
        dtype = layers.at_least_float32(self.dtype)
        out = out.astype(dtype)
        if self.scale_by_sigma:
            out = out / _scaled_time(t, dtype)[:, None, None, None]
        return out
