"""Independent float64 NumPy implementations of the layers, written from the paper's description, for tests."""

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


def resnet_block_biggan(p, x, temb=None, *, down=False, skip_rescale=True):
    """BigGAN residual block (naive 2x2 average down when `down`) from its flax params, eval mode."""
    c_in = x.shape[-1]
    out_ch = p["conv_0"]["kernel"].shape[-1]
    h = silu(group_norm(x, min(c_in // 4, 32), p["norm_0"]["scale"], p["norm_0"]["bias"], 1e-6))
    if down:
        pool = lambda a: a.reshape(a.shape[0], a.shape[1] // 2, 2, a.shape[2] // 2, 2, a.shape[3]).mean(axis=(2, 4))
        h, x = pool(h), pool(np.asarray(x, np.float64))
    h = conv2d(h, p["conv_0"]["kernel"], p["conv_0"]["bias"], padding=((1, 1), (1, 1)))
    if temb is not None:
        h = h + (silu(np.asarray(temb, np.float64)) @ p["temb_proj"]["kernel"] + p["temb_proj"]["bias"])[:, None, None]
    h = silu(group_norm(h, min(out_ch // 4, 32), p["norm_1"]["scale"], p["norm_1"]["bias"], 1e-6))
    h = conv2d(h, p["conv_1"]["kernel"], p["conv_1"]["bias"], padding=((1, 1), (1, 1)))
    if "shortcut" in p:
        x = conv2d(x, p["shortcut"]["kernel"], p["shortcut"]["bias"])
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
