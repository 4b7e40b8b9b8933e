"""Independent float64 NumPy versions of the layers and of whole NCSN++ networks composed from them, for tests."""

from __future__ import annotations

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def conv2d(x, w, b=None, *, stride=1, padding=((0, 0), (0, 0))):
    """Cross-correlation. x (B, H, W, C) NHWC, w (kh, kw, C, O) HWIO, explicit zero padding -> (B, H', W', O)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), padding[0], padding[1], (0, 0)))
    w = np.asarray(w, np.float64)
    kh, kw = w.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]
            out += np.einsum("bhwc,co->bhwo", patch, w[i, j])
    if b is not None:
        out += np.asarray(b, np.float64)
    return out


def group_norm(x, num_groups, scale, bias, eps):
    """GroupNorm over (spatial..., channels-in-group) for x (B, ..., C)."""
    x = np.asarray(x, np.float64)
    shape = x.shape
    g = x.reshape(shape[0], -1, num_groups, shape[-1] // num_groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(shape) * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def upfirdn2d(x, kernel_2d, *, up=1, down=1, pad=(0, 0)):
    """Literal upfirdn: zero-insert by `up` (after every sample), pad, convolve with the kernel, keep every `down`."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    z = np.zeros((b, h * up, w * up, c))
    z[:, ::up, ::up, :] = x
    z = np.pad(z, ((0, 0), pad, pad, (0, 0)))
    k = np.asarray(kernel_2d, np.float64)
    kh, kw = k.shape
    out_h, out_w = z.shape[1] - kh + 1, z.shape[2] - kw + 1
    out = np.zeros((b, out_h, out_w, c))
    for y in range(out_h):
        for xx in range(out_w):
            window = z[:, y : y + kh, xx : xx + kw, :]
            # True convolution: the kernel is flipped.
            out[:, y, xx, :] = np.einsum("bijc,ij->bc", window, k[::-1, ::-1])
    return out[:, ::down, ::down, :]


def _fir_kernel_2d(kernel_1d=(1, 3, 3, 1)):
    k = np.outer(kernel_1d, kernel_1d).astype(np.float64)
    return k / k.sum()


def upsample(x, *, fir):
    """Factor-2 up: FIR [1, 3, 3, 1] as upfirdn (gain 4, pads (2, 1)) or nearest neighbour."""
    if fir:
        return upfirdn2d(x, 4 * _fir_kernel_2d(), up=2, pad=(2, 1))
    return np.asarray(x, np.float64).repeat(2, axis=1).repeat(2, axis=2)


def downsample(x, *, fir):
    """Factor-2 down: FIR [1, 3, 3, 1] as upfirdn (gain 1, pads (1, 1)) or 2x2 average."""
    x = np.asarray(x, np.float64)
    if fir:
        return upfirdn2d(x, _fir_kernel_2d(), down=2, pad=(1, 1))
    return x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, x.shape[3]).mean(axis=(2, 4))


def dense(p, x):
    return np.asarray(x, np.float64) @ p["kernel"] + p["bias"]


def conv_same(p, x):
    """Stride-1 conv with bias and symmetric zero padding (k - 1) / 2 (1x1 and 3x3)."""
    pad = (p["kernel"].shape[0] - 1) // 2
    return conv2d(x, p["kernel"], p["bias"], padding=((pad, pad), (pad, pad)))


def ncsnpp_group_norm(p, x):
    return group_norm(x, min(x.shape[-1] // 4, 32), p["scale"], p["bias"], 1e-6)


def resnet_block_biggan(p, x, temb=None, *, resample=None, fir=False, skip_rescale=True):
    """BigGAN residual block from its flax params, eval mode; `resample` is None, 'up' or 'down'."""
    x = np.asarray(x, np.float64)
    h = silu(ncsnpp_group_norm(p["norm_0"], x))
    if resample is not None:
        resample_fn = upsample if resample == "up" else downsample
        h, x = resample_fn(h, fir=fir), resample_fn(x, fir=fir)
    h = conv_same(p["conv_0"], h)
    if temb is not None:
        h = h + dense(p["temb_proj"], silu(np.asarray(temb, np.float64)))[:, None, None]
    h = conv_same(p["conv_1"], silu(ncsnpp_group_norm(p["norm_1"], h)))
    if "shortcut" in p:
        x = conv_same(p["shortcut"], x)
    out = x + h
    return out / np.sqrt(2.0) if skip_rescale else out


def attn_block(p, x):
    """Single-head self-attention block from its flax params."""
    b, hh, ww, c = x.shape
    x = np.asarray(x, np.float64)
    h = group_norm(x, min(c // 4, 32), p["norm"]["scale"], p["norm"]["bias"], 1e-6).reshape(b, hh * ww, c)
    q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in ("query", "key", "value"))
    logits = np.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    h = np.einsum("bqk,bkc->bqc", weights, v) @ p["out"]["kernel"] + p["out"]["bias"]
    return (x + h.reshape(b, hh, ww, c)) / np.sqrt(2.0)


def count_parameters(tree):
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    import jax

    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def to_numpy(tree):
    """Nested dict of arrays -> nested dict of float64 numpy arrays."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def random_params(module, *args, seed=0, **kwargs):
    """Float32 params of `module` with the right tree, drawn by NumPy instead of `module.init`.

    Tests that check values (not initialisation) use these: they avoid compiling hundreds of random-number kernels,
    and unlike the near-zero `init_scale` layers they make every layer matter. Kernels ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2).
    """
    import jax

    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1])
        if "scale" in name:
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        else:
            value = 0.1 * rng.standard_normal(leaf.shape)
        return np.asarray(value, np.float32)

    return {"params": jax.tree_util.tree_map_with_path(draw, shapes)}


def bottleneck_block(p, x, *, stride, eps=1e-5):
    """ResNet v1.5 GroupNorm bottleneck from its flax params (PyTorch padding (k - 1) // 2)."""
    gn = lambda h, q: group_norm(h, 32, q["scale"], q["bias"], eps)
    relu = lambda h: np.maximum(h, 0.0)
    shortcut = np.asarray(x, np.float64)
    if "proj_conv" in p:
        shortcut = gn(conv2d(x, p["proj_conv"]["kernel"], stride=stride), p["proj_norm"])
    h = relu(gn(conv2d(x, p["conv_0"]["kernel"]), p["norm_0"]))
    h = relu(gn(conv2d(h, p["conv_1"]["kernel"], stride=stride, padding=((1, 1), (1, 1))), p["norm_1"]))
    h = gn(conv2d(h, p["conv_2"]["kernel"]), p["norm_2"])
    return relu(shortcut + h)


def assert_trees_equal_up_to_float32_rounding(actual, desired):
    """Leaf-wise equality up to float32 re-association (e.g. a rematerialised block compiled as a whole vs op by op).

    The absolute tolerance is relative to the largest entry of the whole tree: some gradients are exactly zero in
    exact arithmetic (a bias right before a normalisation) and hold only rounding noise.
    """
    import jax

    scale = max(float(np.abs(np.asarray(leaf)).max()) for leaf in jax.tree_util.tree_leaves(desired))
    jax.tree_util.tree_map(
        lambda a, d: np.testing.assert_allclose(a, d, rtol=1e-4, atol=1e-5 * scale), actual, desired
    )


# ----------------------------------------------------------------------------------------------------------------
# Whole NCSN++ networks composed from the blocks above (eval mode). `config` is the dict the Flax model was built
# from and must spell out every architectural key: nothing here falls back on the Flax defaults.
# ----------------------------------------------------------------------------------------------------------------


def latent_head(p, feature_map):
    """conv1x1 -> SiLU -> channel-major flatten -> Linear layers with SiLU between them. -> (B, D)."""
    h = silu(conv_same(p["conv"], feature_map))
    h = h.transpose(0, 3, 1, 2).reshape(h.shape[0], -1)
    num_dense = len(p) - 1
    for i in range(num_dense - 1):
        h = silu(dense(p[f"dense_{i}"], h))
    return dense(p[f"dense_{num_dense - 1}"], h)


def _output_conv(p, name, h):
    return conv_same(p[f"{name}_conv"], silu(ncsnpp_group_norm(p[f"{name}_norm"], h)))


def _maps_by_level(p, x, temb, config):
    """The down path's feature maps grouped by level, and the middle block's output.

    Level l's list holds the map that enters the level (the input conv's output at level 0, the down block's output,
    plus the input-skip combine, after that) and then each residual block's output, all at level l's resolution.
    """
    fir = config["fir"]
    num_levels = len(config["ch_mult"])
    pyramid = np.asarray(x, np.float64)
    entering = conv_same(p["conv_in"], x)
    levels = []
    for level in range(num_levels):
        maps = [entering]
        for block in range(config["num_res_blocks"]):
            h = resnet_block_biggan(p[f"down_{level}_block_{block}"], maps[-1], temb, fir=fir)
            if h.shape[1] in config["attn_resolutions"]:
                h = attn_block(p[f"down_{level}_attn_{block}"], h)
            maps.append(h)
        levels.append(maps)
        if level < num_levels - 1:
            entering = resnet_block_biggan(p[f"down_{level}_resample"], maps[-1], temb, resample="down", fir=fir)
            if config["progressive_input"] == "input_skip":
                pyramid = downsample(pyramid, fir=fir)
                entering = entering + conv_same(p[f"down_{level}_combine"]["conv"], pyramid)
    middle = resnet_block_biggan(p["mid_block_0"], levels[-1][-1], temb)
    middle = resnet_block_biggan(p["mid_block_1"], attn_block(p["mid_attn"], middle), temb)
    return levels, middle


def ncsnpp_encoder(p, x, config, *, swap_heads=None):
    """Anchors (B, D): the sum of head_i(map_i) over the feature maps in order (every level's maps, then the middle).

    `swap_heads=(i, j)` feeds head i map j and head j map i: a wrong wiring, for the test that shows it is caught.
    """
    levels, middle = _maps_by_level(p, x, None, config)
    maps = [m for level_maps in levels for m in level_maps] + [middle]
    if swap_heads is not None:
        i, j = swap_heads
        maps[i], maps[j] = maps[j], maps[i]
    resolutions = config["latent_transformation_resolutions"]
    anchors = 0.0
    for i, feature_map in enumerate(maps):
        if resolutions is None or feature_map.shape[1] in resolutions:
            anchors = anchors + latent_head(p[f"head_{i}"], feature_map)
    return anchors


def _conditioning(p, t_scaled, latent, label_onehot, config):
    """Dense(SiLU(Dense(concat[latent, one-hot, time embedding]))) -> (B, 4 nf)."""
    if config["embedding_type"] == "positional":
        half = config["nf"] // 2
        angles = t_scaled[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    else:
        angles = 2 * np.pi * np.log(t_scaled)[:, None] * p["time_fourier"]["frequencies"]
    parts = [np.asarray(a, np.float64) for a in (latent, label_onehot) if a is not None]
    cond = np.concatenate(parts + [np.sin(angles), np.cos(angles)], axis=1)
    return dense(p["cond_dense_1"], silu(dense(p["cond_dense_0"], cond)))


def ncsnpp_decoder(p, x_t, t, latent, label_onehot, config, *, swap_skips=None):
    """Velocity (B, H, W, C) of the rectified-flow U-Net.

    Level l of the up path runs one residual block per map the down path left at level l's resolution, taking them
    last first, each on concat[h, map]. `swap_skips=(level, i, j)` exchanges two of those maps: a wrong wiring, for
    the test that shows it is caught.
    """
    fir = config["fir"]
    t_scaled = np.clip(np.asarray(t, np.float64), 0.0, 1.0) * 999.0
    temb = _conditioning(p, t_scaled, latent, label_onehot, config)
    levels, h = _maps_by_level(p, x_t, temb, config)
    if swap_skips is not None:
        level, i, j = swap_skips
        levels[level][i], levels[level][j] = levels[level][j], levels[level][i]
    output_pyramid = None
    for level in reversed(range(len(levels))):
        for block, skip in enumerate(reversed(levels[level])):
            h = resnet_block_biggan(p[f"up_{level}_block_{block}"], np.concatenate([h, skip], axis=-1), temb, fir=fir)
        if h.shape[1] in config["attn_resolutions"]:
            h = attn_block(p[f"up_{level}_attn"], h)
        if config["progressive"] == "output_skip":
            out = _output_conv(p, f"up_{level}_pyramid", h)
            output_pyramid = out if output_pyramid is None else upsample(output_pyramid, fir=fir) + out
        if level > 0:
            h = resnet_block_biggan(p[f"up_{level}_resample"], h, temb, resample="up", fir=fir)
    out = output_pyramid if config["progressive"] == "output_skip" else _output_conv(p, "out", h)
    return out / t_scaled[:, None, None, None] if config["scale_by_sigma"] else out


def trace_model(config, image_size):
    """``(output, params)`` of a model built from ``config`` in bfloat16, as shapes only (``jax.eval_shape``)."""
    import jax

    from lzn_jax import models

    module = models.build(config, dtype="bfloat16")
    inputs = models.example_inputs(config, 2, image_size)
    output, variables = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), *inputs))
    return output, variables["params"]
