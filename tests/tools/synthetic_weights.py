"""Deterministic stand-in weights for reference-parity fixtures that are too large to store (NumPy only, no torch).

The fixture script fills the reference's model with these values and stores only the names, shapes and the
reference's outputs; the test rebuilds the very same arrays. Integer hashing (no random generator, no float
transcendental) gives the same bits on every platform and NumPy version.
"""

from __future__ import annotations

import collections

import numpy as np

_MULTIPLIER = np.uint64(6364136223846793005)
_INCREMENT = np.uint64(1442695040888963407)


def hashed_uniform(size: int, salt: int) -> np.ndarray:
    """(size,) float32 values in [-1, 1) from an integer hash of (index, salt): the same bits everywhere."""
    with np.errstate(over="ignore"):
        index = np.arange(size, dtype=np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        mixed = index * _MULTIPLIER + _INCREMENT
        mixed ^= mixed >> np.uint64(29)
        mixed = mixed * _MULTIPLIER + _INCREMENT
    top = (mixed >> np.uint64(40)).astype(np.float64)  # 24 bits: exact in float32
    return (top / float(1 << 23) - 1.0).astype(np.float32)


def synthetic_tensor(name: str, shape: tuple[int, ...], salt: int) -> np.ndarray:
    """A weight of PyTorch layout ``shape`` at a sensible scale for the layer its ``name`` suggests.

    Matrices and kernels (ndim >= 2): uniform with bound ``sqrt(3 / fan_in)`` (fan_in = prod(shape[1:]), the
    in-dimension of OIHW and (out, in) layouts). Vectors named ``...weight`` (norm scales): ``1 + 0.2 u``; other
    vectors (biases, anchors): ``0.2 u``.
    """
    values = hashed_uniform(int(np.prod(shape, dtype=np.int64)), salt).reshape(shape)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return (values * np.float32(np.sqrt(3.0 / fan_in))).astype(np.float32)
    if name.endswith("weight"):
        return (1.0 + 0.2 * values).astype(np.float32)
    return (0.2 * values).astype(np.float32)


def synthetic_state_dict(entries: list[tuple[str, tuple[int, ...]]], salt: int) -> collections.OrderedDict:
    """``OrderedDict(name -> array)`` for ``(name, shape)`` entries in order; entry ``k`` uses ``salt * 100003 + k``."""
    return collections.OrderedDict(
        (name, synthetic_tensor(name, tuple(shape), salt * 100003 + k)) for k, (name, shape) in enumerate(entries)
    )
