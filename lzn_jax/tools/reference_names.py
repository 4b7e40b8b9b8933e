"""Where every tensor of the PyTorch reference's model state dicts lives in our params, and in which layout.

One pure function per model walks its architecture in the order in which the reference registers the parameters,
so the list it returns is also the order of the reference's ``parameters()``, which its EMA shadows follow
(docs/design.md, "Importing the reference's checkpoints").
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Layouts of the reference's tensors and how each maps onto ours.
CONV = "conv"  # OIHW kernel -> our HWIO
LINEAR = "linear"  # (out, in) weight -> our (in, out) kernel
SAME = "same"  # biases, norm scales, NIN weights (already (in, out)), the label-anchor table, Fourier frequencies

# Buffers of the reference that have no counterpart here: the decoder's noise-level table, which its rectified-flow
# models never read.
IGNORED_BUFFERS = ("sigmas",)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One tensor of a reference state dict.

    Attributes:
      name: its state-dict name below the ``model.module.`` prefix, e.g. ``all_modules.3.Conv_0.weight``.
      path: the path of the matching leaf in our module's params, e.g. ``("down_0_block_0", "conv_0", "kernel")``.
      layout: CONV, LINEAR or SAME.
      trainable: False for the Fourier time frequencies, which the reference's EMA does not shadow.
    """

    name: str
    path: tuple[str, ...]
    layout: str
    trainable: bool = True


def to_ours(value: np.ndarray, layout: str) -> np.ndarray:
    """A reference tensor in our layout: OIHW (O, I, kh, kw) -> HWIO (kh, kw, I, O); (out, in) -> (in, out)."""
    if layout == CONV:
        return np.ascontiguousarray(np.transpose(value, (2, 3, 1, 0)))
    if layout == LINEAR:
        return np.ascontiguousarray(value.T)
    return value


def reference_shape(our_shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """The reference's shape of a tensor whose shape here is ``our_shape`` (the inverse of `to_ours`)."""
    shape = tuple(int(n) for n in our_shape)
    if layout == CONV:
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if layout == LINEAR:
        return shape[::-1]
    return shape


# ---------------------------------------------------------------------------------------------------------------
# Layers. Each returns its leaves in the reference's registration order (weight before bias).
# ---------------------------------------------------------------------------------------------------------------


def _conv(name: str, path: tuple[str, ...], *, bias: bool = True) -> list[Leaf]:
    leaves = [Leaf(f"{name}.weight", (*path, "kernel"), CONV)]
    return leaves + ([Leaf(f"{name}.bias", (*path, "bias"), SAME)] if bias else [])


def _linear(name: str, path: tuple[str, ...], *, bias: bool = True) -> list[Leaf]:
    leaves = [Leaf(f"{name}.weight", (*path, "kernel"), LINEAR)]
    return leaves + ([Leaf(f"{name}.bias", (*path, "bias"), SAME)] if bias else [])


def _group_norm(name: str, path: tuple[str, ...]) -> list[Leaf]:
    return [Leaf(f"{name}.weight", (*path, "scale"), SAME), Leaf(f"{name}.bias", (*path, "bias"), SAME)]


def _nin(name: str, path: tuple[str, ...]) -> list[Leaf]:
    # NIN layers store W as (in, out) and compute x @ W, as a Dense kernel does.
    return [Leaf(f"{name}.W", (*path, "kernel"), SAME), Leaf(f"{name}.b", (*path, "bias"), SAME)]


def _resnet_block(name: str, ours: str, *, time: bool, shortcut: bool) -> list[Leaf]:
    """BigGAN residual block: norm, conv, [time projection], norm, conv, [1x1 shortcut]."""
    path = (ours,)
    leaves = _group_norm(f"{name}.GroupNorm_0", (*path, "norm_0")) + _conv(f"{name}.Conv_0", (*path, "conv_0"))
    if time:
        leaves += _linear(f"{name}.Dense_0", (*path, "temb_proj"))
    leaves += _group_norm(f"{name}.GroupNorm_1", (*path, "norm_1")) + _conv(f"{name}.Conv_1", (*path, "conv_1"))
    if shortcut:
        leaves += _conv(f"{name}.Conv_2", (*path, "shortcut"))
    return leaves


def _combine(name: str, ours: str) -> list[Leaf]:
    """Input-skip combine ('sum'): a 1x1 conv of the image pyramid."""
    return _conv(f"{name}.Conv_0", (ours, "conv"))


def _fourier_projection(name: str) -> list[Leaf]:
    """The Gaussian Fourier time frequencies: a parameter without gradient, so the EMA has no shadow of it."""
    return [Leaf(f"{name}.W", ("time_fourier", "frequencies"), SAME, trainable=False)]


def _attention(name: str, ours: str) -> list[Leaf]:
    leaves = _group_norm(f"{name}.GroupNorm_0", (ours, "norm"))
    for index, part in enumerate(("query", "key", "value", "out")):
        leaves += _nin(f"{name}.NIN_{index}", (ours, part))
    return leaves


# ---------------------------------------------------------------------------------------------------------------
# NCSN++ trunk, encoder heads, decoder.
# ---------------------------------------------------------------------------------------------------------------


class _ModuleList:
    """Numbers the entries of the reference's ``all_modules`` list as they are appended."""

    def __init__(self):
        self.leaves: list[Leaf] = []
        self._count = 0

    def add(self, make, *args, **kwargs) -> None:
        self.leaves += make(f"all_modules.{self._count}", *args, **kwargs)
        self._count += 1


def _downsampling_half(modules: _ModuleList, model, image_size: int, *, time: bool) -> list[int]:
    """The input conv, residual levels, down blocks (and input-skip combines), then the middle blocks.

    Returns the channel count of every feature map in order: the skip connections of the decoder's up path.
    """
    nf, attn = model.nf, tuple(model.attn_resolutions)
    modules.add(_conv, ("conv_in",))
    channels, skips = nf, [nf]
    num_levels = len(model.ch_mult)
    for level in range(num_levels):
        resolution = image_size // 2**level
        for block in range(model.num_res_blocks):
            out = nf * model.ch_mult[level]
            modules.add(_resnet_block, f"down_{level}_block_{block}", time=time, shortcut=channels != out)
            channels = out
            if resolution in attn:
                modules.add(_attention, f"down_{level}_attn_{block}")
            skips.append(channels)
        if level != num_levels - 1:
            modules.add(_resnet_block, f"down_{level}_resample", time=time, shortcut=True)
            if model.progressive_input == "input_skip":
                modules.add(_combine, f"down_{level}_combine")
            skips.append(channels)
    modules.add(_resnet_block, "mid_block_0", time=time, shortcut=False)
    modules.add(_attention, "mid_attn")
    modules.add(_resnet_block, "mid_block_1", time=time, shortcut=False)
    return skips


def feature_map_resolutions(model, image_size: int) -> list[int]:
    """Resolution of each encoder feature map, in the order the heads are numbered."""
    resolutions = [image_size]
    num_levels = len(model.ch_mult)
    for level in range(num_levels):
        resolutions += [image_size // 2**level] * model.num_res_blocks
        if level != num_levels - 1:
            resolutions.append(image_size // 2 ** (level + 1))
    return resolutions + [image_size // 2 ** (num_levels - 1)]


def ncsnpp_encoder_leaves(model, image_size: int) -> list[Leaf]:
    """Leaves of the reference's ``NCSNPPEncoder``: every head's 1x1 conv, every head's linear layers, the trunk.

    ``model`` is our `NCSNppEncoder` (its hyper-parameters are read); ``image_size`` the side of its input images.
    """
    heads = [
        index for index, resolution in enumerate(feature_map_resolutions(model, image_size))
        if model.latent_transformation_resolutions is None or resolution in model.latent_transformation_resolutions
    ]
    leaves = []
    for index in heads:
        leaves += _conv(f"spatial_transformations.{index}.0", (f"head_{index}", "conv"))
    for index in heads:
        # Linear layers alternate with activations inside the reference's Sequential.
        for layer in range(model.num_latent_transformation_layers):
            leaves += _linear(f"latent_transformations.{index}.{2 * layer}", (f"head_{index}", f"dense_{layer}"))
    modules = _ModuleList()
    _downsampling_half(modules, model, image_size, time=False)
    return leaves + modules.leaves


def ncsnpp_decoder_leaves(model, image_size: int) -> list[Leaf]:
    """Leaves of the reference's ``NCSNPPDecoder`` (its ``sigmas`` buffer excepted): time embedding, conditioning
    MLP, the U-Net's down path, middle, up path and output.

    ``model`` is our `NCSNppDecoder`; only time-conditional decoders exist in the reference's settings.
    """
    if not model.conditional:
        raise ValueError("only time-conditional decoders (conditional=True) have a reference counterpart")
    if model.scale_by_sigma and model.embedding_type != "fourier":
        # There the reference divides by an entry of its noise-level table, not by the scaled time as ours does.
        raise ValueError("a positional-embedding decoder with scale_by_sigma has no reference counterpart")
    modules = _ModuleList()
    if model.embedding_type == "fourier":
        modules.add(_fourier_projection)
    modules.add(_linear, ("cond_dense_0",))
    modules.add(_linear, ("cond_dense_1",))
    skips = _downsampling_half(modules, model, image_size, time=True)

    nf, attn, channels = model.nf, tuple(model.attn_resolutions), skips[-1]
    output_skip = model.progressive == "output_skip"
    for level in reversed(range(len(model.ch_mult))):
        for block in range(model.num_res_blocks + 1):
            out = nf * model.ch_mult[level]
            modules.add(_resnet_block, f"up_{level}_block_{block}", time=True,
                        shortcut=channels + skips.pop() != out)
            channels = out
        if image_size // 2**level in attn:
            modules.add(_attention, f"up_{level}_attn")
        if output_skip:
            modules.add(_group_norm, (f"up_{level}_pyramid_norm",))
            modules.add(_conv, (f"up_{level}_pyramid_conv",))
        if level != 0:
            modules.add(_resnet_block, f"up_{level}_resample", time=True, shortcut=True)
    if not output_skip:
        modules.add(_group_norm, ("out_norm",))
        modules.add(_conv, ("out_conv",))
    return modules.leaves


# ---------------------------------------------------------------------------------------------------------------
# ResNet-GN and label anchors.
# ---------------------------------------------------------------------------------------------------------------


def resnet_leaves(model) -> list[Leaf]:
    """Leaves of the reference's SimCLRv2-style ``ResNet`` (no selective kernels): stem, stages, projection head.

    ``model`` is our `ResNetGN`.
    """
    leaves = _conv("net.0.0", ("stem_conv",), bias=False) + _group_norm("net.0.1.0", ("stem_norm",))
    for stage, num_blocks in enumerate(model.stage_sizes):
        for block in range(num_blocks):
            name, ours = f"net.{stage + 1}.blocks.{block}", f"stage_{stage}_block_{block}"
            if block == 0:
                leaves += _conv(f"{name}.projection.shortcut", (ours, "proj_conv"), bias=False)
                leaves += _group_norm(f"{name}.projection.bn.0", (ours, "proj_norm"))
            for index in range(3):
                # The block's Sequential alternates conv (2 i) and norm-with-activation (2 i + 1).
                leaves += _conv(f"{name}.net.{2 * index}", (ours, f"conv_{index}"), bias=False)
                leaves += _group_norm(f"{name}.net.{2 * index + 1}.0", (ours, f"norm_{index}"))
    for layer in range(model.head_num_layers):
        # Linear, norm and (except after the last) an activation per head layer.
        leaves += _linear(f"head.layers.{3 * layer}", (f"head_dense_{layer}",), bias=False)
        leaves += _group_norm(f"head.layers.{3 * layer + 1}", (f"head_norm_{layer}",))
    return leaves


def label_anchor_leaves(model) -> list[Leaf]:
    """The reference's ``LabelAnchor`` is one (num_classes, latent_dim) table, as ours is."""
    del model
    return [Leaf("anchor", ("anchors",), SAME)]


def module_leaves(model, image_size: int) -> list[Leaf]:
    """The leaves of any of our models that has a reference counterpart (by its class name)."""
    kind = type(model).__name__
    if kind == "NCSNppEncoder":
        return ncsnpp_encoder_leaves(model, image_size)
    if kind == "NCSNppDecoder":
        return ncsnpp_decoder_leaves(model, image_size)
    if kind == "ResNetGN":
        return resnet_leaves(model)
    if kind == "LabelAnchors":
        return label_anchor_leaves(model)
    raise ValueError(f"{kind} has no counterpart in the reference")
