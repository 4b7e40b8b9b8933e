"""An independent float64 NumPy forward pass of the FID Inception-V3, written from torchvision's layer list and
pytorch-fid's patches, reading the same variable tree ({"params", "batch_stats"}) as the Linen module."""

from __future__ import annotations

import numpy as np

from tests.models.numpy_reference import conv2d

BN_EPS = 1e-3


def conv_bn_relu(x, params, stats, *, stride=1, padding=(0, 0)):
    """x (B, H, W, C) float64; params {"conv": {"kernel" HWIO}, "bn": {"scale", "bias"}}, stats {"bn": {mean, var}}."""
    y = conv2d(x, params["conv"]["kernel"], stride=stride, padding=((padding[0],) * 2, (padding[1],) * 2))
    bn, moments = params["bn"], stats["bn"]
    y = (y - np.asarray(moments["mean"], np.float64)) / np.sqrt(np.asarray(moments["var"], np.float64) + BN_EPS)
    y = y * bn["scale"] + bn["bias"]
    return np.maximum(y, 0.0)


def _windows(x, size, stride, pad, fill):
    """All pooling windows: (B, H', W', size*size, C) with `fill` in the padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    out_h = (x.shape[1] - size) // stride + 1
    out_w = (x.shape[2] - size) // stride + 1
    parts = [
        x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]
        for i in range(size)
        for j in range(size)
    ]
    return np.stack(parts, axis=3)


def avg_pool_exclude_padding(x):
    """3x3/1, pad 1, divide each window's sum by the number of real pixels in it."""
    sums = _windows(np.asarray(x, np.float64), 3, 1, 1, 0.0).sum(axis=3)
    counts = _windows(np.ones(x.shape[:3] + (1,)), 3, 1, 1, 0.0).sum(axis=3)
    return sums / counts


def max_pool(x, *, stride, pad):
    return _windows(np.asarray(x, np.float64), 3, stride, pad, -np.inf).max(axis=3)


def _unit(x, variables, name, **kwargs):
    return conv_bn_relu(x, variables["params"][name], variables["batch_stats"][name], **kwargs)


def _sub(variables, name):
    return {"params": variables["params"][name], "batch_stats": variables["batch_stats"][name]}


def block_a(x, v):
    b1 = _unit(x, v, "branch1x1")
    b5 = _unit(_unit(x, v, "branch5x5_1"), v, "branch5x5_2", padding=(2, 2))
    b3 = _unit(_unit(_unit(x, v, "branch3x3dbl_1"), v, "branch3x3dbl_2", padding=(1, 1)), v, "branch3x3dbl_3",
               padding=(1, 1))
    bp = _unit(avg_pool_exclude_padding(x), v, "branch_pool")
    return np.concatenate([b1, b5, b3, bp], axis=-1)


def block_b(x, v):
    b3 = _unit(x, v, "branch3x3", stride=2)
    bd = _unit(_unit(_unit(x, v, "branch3x3dbl_1"), v, "branch3x3dbl_2", padding=(1, 1)), v, "branch3x3dbl_3",
               stride=2)
    return np.concatenate([b3, bd, max_pool(x, stride=2, pad=0)], axis=-1)


def block_c(x, v):
    b1 = _unit(x, v, "branch1x1")
    b7 = _unit(x, v, "branch7x7_1")
    b7 = _unit(b7, v, "branch7x7_2", padding=(0, 3))
    b7 = _unit(b7, v, "branch7x7_3", padding=(3, 0))
    bd = _unit(x, v, "branch7x7dbl_1")
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)]):
        bd = _unit(bd, v, f"branch7x7dbl_{i}", padding=pad)
    bp = _unit(avg_pool_exclude_padding(x), v, "branch_pool")
    return np.concatenate([b1, b7, bd, bp], axis=-1)


def block_d(x, v):
    b3 = _unit(_unit(x, v, "branch3x3_1"), v, "branch3x3_2", stride=2)
    b7 = _unit(x, v, "branch7x7x3_1")
    b7 = _unit(b7, v, "branch7x7x3_2", padding=(0, 3))
    b7 = _unit(b7, v, "branch7x7x3_3", padding=(3, 0))
    b7 = _unit(b7, v, "branch7x7x3_4", stride=2)
    return np.concatenate([b3, b7, max_pool(x, stride=2, pad=0)], axis=-1)


def block_e(x, v, pool):
    b1 = _unit(x, v, "branch1x1")
    b3 = _unit(x, v, "branch3x3_1")
    b3 = np.concatenate([_unit(b3, v, "branch3x3_2a", padding=(0, 1)), _unit(b3, v, "branch3x3_2b", padding=(1, 0))],
                        axis=-1)
    bd = _unit(_unit(x, v, "branch3x3dbl_1"), v, "branch3x3dbl_2", padding=(1, 1))
    bd = np.concatenate([_unit(bd, v, "branch3x3dbl_3a", padding=(0, 1)),
                         _unit(bd, v, "branch3x3dbl_3b", padding=(1, 0))], axis=-1)
    pooled = avg_pool_exclude_padding(x) if pool == "avg" else max_pool(x, stride=1, pad=1)
    bp = _unit(pooled, v, "branch_pool")
    return np.concatenate([b1, b3, bd, bp], axis=-1)


def inception_v3(x, v):
    """x (B, H, W, 3) -> (pool (B, 2048), spatial (B, 7*h*w), logits (B, 1008), logits without bias)."""
    x = np.asarray(x, np.float64)
    x = _unit(x, v, "Conv2d_1a_3x3", stride=2)
    x = _unit(x, v, "Conv2d_2a_3x3")
    x = _unit(x, v, "Conv2d_2b_3x3", padding=(1, 1))
    x = max_pool(x, stride=2, pad=0)
    x = _unit(x, v, "Conv2d_3b_1x1")
    x = _unit(x, v, "Conv2d_4a_3x3")
    x = max_pool(x, stride=2, pad=0)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = block_a(x, _sub(v, name))
    x = block_b(x, _sub(v, "Mixed_6a"))
    x = block_c(x, _sub(v, "Mixed_6b"))
    x = block_c(x, _sub(v, "Mixed_6c"))
    spatial = _unit(x, _sub(v, "Mixed_6d"), "branch1x1")[..., :7]
    x = block_c(x, _sub(v, "Mixed_6d"))
    x = block_c(x, _sub(v, "Mixed_6e"))
    x = block_d(x, _sub(v, "Mixed_7a"))
    x = block_e(x, _sub(v, "Mixed_7b"), "avg")
    x = block_e(x, _sub(v, "Mixed_7c"), "max")
    pool = x.mean(axis=(1, 2))
    fc = v["params"]["fc"]
    unbiased = pool @ np.asarray(fc["kernel"], np.float64)
    return pool, spatial.reshape(spatial.shape[0], -1), unbiased + fc["bias"], unbiased
