"""Images -> Inception inputs: clean-fid's "clean" resize (PIL bicubic on float pixels) and the input normalisation
(docs/evaluation.md, "Preprocessing").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax.evaluation.inception import INPUT_SIZE

RESIZE_MODES = ("clean", "none")
# Pixel p in [0, 255] -> network input. "clean": (p - 128) / 128, the original graph's own Sub/Mul, which clean-fid
# applies too; "pytorch_fid": p / 255 * 2 - 1, what pytorch-fid does.
NORMALIZATIONS = ("clean", "pytorch_fid")

_BICUBIC_A = -0.5  # PIL's bicubic kernel parameter (Keys' a = -0.5)
_BICUBIC_SUPPORT = 2.0


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, support [-2, 2]. float64 in, float64 out."""
    x = np.abs(x)
    a = _BICUBIC_A
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


@functools.lru_cache(maxsize=32)
def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix M with resized = M @ line, PIL's bicubic resampling along one axis.

    Same coefficients as Pillow's resampler: output pixel i is centred at (i + 0.5) * scale in input coordinates;
    when shrinking, the kernel is stretched by the scale (antialiasing); taps that fall outside the image are
    dropped and the remaining weights renormalised to sum to 1 (this is PIL's border handling, not padding).
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    inverse = 1.0 / filter_scale
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        # int() truncates toward zero, like the C cast PIL uses to round the window bounds.
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        taps = _bicubic((np.arange(first, last) - center + 0.5) * inverse)
        total = taps.sum()
        weights[i, first:last] = taps / total if total != 0.0 else taps
    weights.setflags(write=False)
    return weights


def resize_bicubic(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(B, H, W, C) pixels in [0, 255] (uint8 or float) -> (B, size, size, C) float32, clipped to [0, 255].

    clean-fid's "clean" resize: each channel as a float image through PIL's bicubic filter, width first, then
    height (PIL's order), without rounding to uint8 in between or after. Each pass is a matmul with the
    `pil_bicubic_weights` matrix at full float32 precision; an axis that already has the target size is left alone,
    as in PIL.
    """
    x = images.astype(jnp.float32)
    _, height, width, _ = x.shape
    if width != size:
        weights = jnp.asarray(pil_bicubic_weights(width, size), jnp.float32)
        x = jnp.einsum("ow,bhwc->bhoc", weights, x, precision=jax.lax.Precision.HIGHEST)
    if height != size:
        weights = jnp.asarray(pil_bicubic_weights(height, size), jnp.float32)
        x = jnp.einsum("oh,bhwc->bowc", weights, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(x, 0.0, 255.0)


def normalize(pixels: jax.Array, mode: str = "clean") -> jax.Array:
    """float pixels in [0, 255] -> network input in about [-1, 1] (see NORMALIZATIONS). Any shape."""
    if mode == "clean":
        return (pixels - 128.0) / 128.0
    if mode == "pytorch_fid":
        return pixels / 255.0 * 2.0 - 1.0
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def preprocess(images: jax.Array, *, resize: str = "clean", normalization: str = "clean") -> jax.Array:
    """uint8 images (B, H, W, 3) -> Inception inputs (B, 299, 299, 3) float32.

    resize "clean": `resize_bicubic` to 299 (any input size); "none": the images must already be 299 x 299.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(
            f"FID-type metrics take uint8 images (B, H, W, 3) in [0, 255], got {images.dtype}; quantise generated "
            "images first so that real and generated images go through the same path"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images (B, H, W, 3), got shape {images.shape}")
    if resize == "clean":
        pixels = resize_bicubic(images)
    elif resize == "none":
        if images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"resize='none' needs {INPUT_SIZE}x{INPUT_SIZE} images, got {images.shape[1:3]}")
        pixels = images.astype(jnp.float32)
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return normalize(pixels, normalization)
