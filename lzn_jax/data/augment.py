"""Two-view SimCLR-style augmentation of case study 2: every random choice is drawn on the host; the photometric
ops run here in numpy or, from the same parameters, on the device (``device.py``). Measurements: benchmarks/README.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from lzn_jax.data import transforms

# Luma weights of ITU-R 601, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# Positions of the jitter ops in the "order" parameter and in the "factors" vector.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class TwoViewOptions:
    """Options of the two-view augmentation; defaults are the reference's case study 2 values."""

    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_probability: float = 0.5
    jitter_strength: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    jitter_probability: float = 0.8
    grayscale_probability: float = 0.2
    blur_kernel_size: int = 23
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_probability: float = 1.0


def sample_view_parameters(rng: np.random.Generator, options: TwoViewOptions) -> dict[str, np.ndarray]:
    """Draws the photometric choices of one view (flip, jitter, grayscale, blur).

    Returns:
      dict of numpy arrays: ``flip`` bool (), ``jitter`` bool (), ``factors`` float32 (4,) = brightness, contrast,
      saturation factors and hue shift, ``order`` int32 (4,) permutation of the jitter ops, ``grayscale`` bool (),
      ``blur`` bool (), ``sigma`` float32 ().
    """
    flip = rng.random() < options.flip_probability
    jitter = rng.random() < options.jitter_probability
    order = rng.permutation(4).astype(np.int32)
    brightness, contrast, saturation, hue = options.jitter_strength
    factors = np.array(
        [
            rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness),
            rng.uniform(max(0.0, 1.0 - contrast), 1.0 + contrast),
            rng.uniform(max(0.0, 1.0 - saturation), 1.0 + saturation),
            rng.uniform(-hue, hue),
        ],
        np.float32,
    )
    grayscale = rng.random() < options.grayscale_probability
    blur = rng.random() < options.blur_probability
    sigma = np.float32(rng.uniform(*options.blur_sigma))
    return {
        "flip": np.bool_(flip),
        "jitter": np.bool_(jitter),
        "factors": factors,
        "order": order,
        "grayscale": np.bool_(grayscale),
        "blur": np.bool_(blur),
        "sigma": sigma,
    }


def two_view_crops(
    image: np.ndarray, rng: np.random.Generator, options: TwoViewOptions
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Crops two views of one decoded image and draws their photometric parameters.

    The crops run on the host in both variants: they need the whole decoded image, whose size varies by file.

    Args:
      image: ``uint8 (H, W, 3)``.
    Returns:
      ``views`` uint8 ``(2, S, S, 3)`` (S = crop_size) before any photometric op, and the parameters of both views
      stacked on a leading axis of 2 (see ``sample_view_parameters``).
    """
    views, parameters = [], []
    for _ in range(2):
        box = transforms.sample_resized_crop_box(
            image.shape[0], image.shape[1], rng, scale=options.crop_scale, ratio=options.crop_ratio
        )
        views.append(transforms.crop_and_resize(image, box, options.crop_size))
        parameters.append(sample_view_parameters(rng, options))
    stacked = {key: np.stack([p[key] for p in parameters]) for key in parameters[0]}
    return np.stack(views), stacked


# ---------------------------------------------------------------------------------------------------------------
# Photometric ops written once over an array namespace ``xp`` (numpy on the host, jax.numpy on the device).
# They work on float pixels in [0, 1] and clip after each jitter op, like torchvision's tensor path; the
# reference's PIL path also rounds to uint8 between ops, which we do not (docs/differences.md).
# ---------------------------------------------------------------------------------------------------------------


def grayscale(image, xp):
    """``(..., H, W, 3)`` float in [0, 1] -> ``(..., H, W, 1)`` luma."""
    return (image[..., 0:1] * _LUMA[0] + image[..., 1:2] * _LUMA[1] + image[..., 2:3] * _LUMA[2]).astype(
        image.dtype
    )


def adjust_brightness(image, factor, xp):
    """Scales pixels by ``factor`` and clips to [0, 1]. ``(H, W, 3)`` -> ``(H, W, 3)``."""
    return xp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor, xp):
    """Blends with the image's mean luma (a scalar) and clips. ``(H, W, 3)`` -> ``(H, W, 3)``."""
    mean = xp.mean(grayscale(image, xp))
    return xp.clip(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor, xp):
    """Blends with the per-pixel luma and clips. ``(H, W, 3)`` -> ``(H, W, 3)``."""
    return xp.clip(factor * image + (1.0 - factor) * grayscale(image, xp), 0.0, 1.0)


def _channels(image, xp):
    """Splits ``(..., 3)`` into three planes; on the host as contiguous copies, since numpy is slow on strided ones."""
    if xp is np:
        return [np.ascontiguousarray(image[..., c]) for c in range(3)]
    return [image[..., c] for c in range(3)]


def _hsv_planes(red, green, blue, xp):
    """RGB planes in [0, 1] -> hue (fraction of a turn), saturation, value planes."""
    value = xp.maximum(xp.maximum(red, green), blue)
    chroma = value - xp.minimum(xp.minimum(red, green), blue)
    grey = chroma == 0
    safe_chroma = xp.where(grey, 1.0, chroma)
    saturation = chroma / xp.where(value == 0, 1.0, value)
    # Hue sector: the channel holding the maximum sets the offset (0, 2 or 4 sixths); ties go red > green > blue.
    # The sector comes from comparing channels, never from ``value == red``: XLA may recompute a fused input with
    # different rounding in two places, and an exact equality would then pick a wrong sector (a hue error of up to
    # a third of a turn), while a comparison can only flip at near-ties, where both sectors give the same hue.
    red_is_max = (red >= green) & (red >= blue)
    green_is_max = (green > red) & (green >= blue)
    hue = xp.where(
        red_is_max,
        (green - blue) / safe_chroma,
        xp.where(green_is_max, 2.0 + (blue - red) / safe_chroma, 4.0 + (red - green) / safe_chroma),
    )
    hue = xp.where(grey, 0.0, xp.mod(hue / 6.0, 1.0))
    return hue, saturation, value


def _rgb_planes(hue, saturation, value, xp):
    """HSV planes -> RGB planes, branch-free: channel ``n`` (5 red, 3 green, 1 blue) is
    ``v - v * s * clip(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6`` (the six-sector rule in one line)."""
    chroma = value * saturation
    planes = []
    for offset in (5.0, 3.0, 1.0):
        k = xp.mod(offset + hue * 6.0, 6.0)
        planes.append(value - chroma * xp.clip(xp.minimum(k, 4.0 - k), 0.0, 1.0))
    return planes


def rgb_to_hsv(image, xp):
    """``(..., 3)`` RGB in [0, 1] -> ``(..., 3)`` HSV in [0, 1] (hue as a fraction of a turn)."""
    return xp.stack(_hsv_planes(*_channels(image, xp), xp), axis=-1).astype(image.dtype)


def hsv_to_rgb(image, xp):
    """``(..., 3)`` HSV in [0, 1] -> ``(..., 3)`` RGB in [0, 1]."""
    return xp.stack(_rgb_planes(*_channels(image, xp), xp), axis=-1).astype(image.dtype)


def adjust_hue(image, shift, xp):
    """Rotates the hue by ``shift`` turns (in [-0.5, 0.5]). ``(H, W, 3)`` -> ``(H, W, 3)``."""
    hue, saturation, value = _hsv_planes(*_channels(image, xp), xp)
    hue = xp.mod(hue + shift, 1.0)
    return xp.stack(_rgb_planes(hue, saturation, value, xp), axis=-1).astype(image.dtype)


def gaussian_kernel(sigma, size: int, xp):
    """Normalised 1-D Gaussian taps at offsets ``-(size-1)/2 .. (size-1)/2``. Returns ``(size,)``."""
    offsets = xp.arange(size, dtype=xp.float32) - (size - 1) / 2.0
    taps = xp.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / xp.sum(taps)


# ---------------------------------------------------------------------------------------------------------------
# Host path (numpy + scipy).
# ---------------------------------------------------------------------------------------------------------------


def gaussian_blur_host(image: np.ndarray, sigma: float, kernel_size: int) -> np.ndarray:
    """Separable Gaussian blur with mirror padding (torch's ``reflect``). ``(H, W, C)`` float32 -> same."""
    kernel = gaussian_kernel(np.float32(sigma), kernel_size, np)
    blurred = ndimage.correlate1d(image, kernel, axis=0, mode="mirror")
    return ndimage.correlate1d(blurred, kernel, axis=1, mode="mirror")


def _jitter_host(image: np.ndarray, factors: np.ndarray, order: np.ndarray) -> np.ndarray:
    ops = {
        BRIGHTNESS: lambda x: adjust_brightness(x, factors[BRIGHTNESS], np),
        CONTRAST: lambda x: adjust_contrast(x, factors[CONTRAST], np),
        SATURATION: lambda x: adjust_saturation(x, factors[SATURATION], np),
        HUE: lambda x: adjust_hue(x, factors[HUE], np),
    }
    for op in order:
        image = ops[int(op)](image)
    return image


def _photometric_unit_host(view: np.ndarray, parameters: dict[str, np.ndarray], blur_kernel_size: int) -> np.ndarray:
    """Flip, jitter, grayscale and blur of one view. ``uint8 (H, W, 3)`` -> ``float32 (H, W, 3)`` in [0, 1]."""
    image = view.astype(np.float32) / 255.0
    if parameters["flip"]:
        image = image[:, ::-1]
    if parameters["jitter"]:
        image = _jitter_host(image, parameters["factors"], parameters["order"])
    if parameters["grayscale"]:
        image = np.repeat(grayscale(image, np), 3, axis=-1)
    if parameters["blur"]:
        image = gaussian_blur_host(np.ascontiguousarray(image), float(parameters["sigma"]), blur_kernel_size)
    return image.astype(np.float32)


def apply_photometric_host(
    views: np.ndarray, parameters: dict[str, np.ndarray], *, blur_kernel_size: int = 23
) -> np.ndarray:
    """Host twin of ``apply_photometric_device``: same arguments, same model inputs up to float32 rounding.

    Args:
      views: ``uint8 (..., H, W, 3)``, e.g. one view ``(H, W, 3)`` or the pipeline's ``(B, 2, H, W, 3)`` crops.
      parameters: ``sample_view_parameters`` leaves with the leading shape ``(...)`` of ``views``.
    Returns:
      ``float32 (..., H, W, 3)`` in [-1, 1].
    """
    leading = views.shape[:-3]
    flat_views = views.reshape((-1,) + views.shape[-3:])
    flat_parameters = {key: np.reshape(value, (len(flat_views),) + np.shape(value)[len(leading):])
                       for key, value in parameters.items()}
    images = [
        _photometric_unit_host(view, {key: value[i] for key, value in flat_parameters.items()}, blur_kernel_size)
        for i, view in enumerate(flat_views)
    ]
    return (np.stack(images) * 2.0 - 1.0).astype(np.float32).reshape(views.shape)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 with rounding to nearest."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def two_view_host(image: np.ndarray, rng: np.random.Generator, options: TwoViewOptions) -> np.ndarray:
    """The whole two-view augmentation on the host. ``uint8 (H, W, 3)`` -> ``uint8 (2, S, S, 3)``."""
    views, parameters = two_view_crops(image, rng, options)
    # Straight from [0, 1] to uint8: going through the model range first would round differently at .5 ties.
    out = [
        to_uint8(_photometric_unit_host(views[v], {k: p[v] for k, p in parameters.items()}, options.blur_kernel_size))
        for v in range(2)
    ]
    return np.stack(out)
