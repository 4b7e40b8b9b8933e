"""Two-view SimCLR-style augmentation of case study 2 (SPEC.md §3.5), on the host (numpy) or on the device (jax).

Each view: RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3), bilinear) -> horizontal flip (p 0.5) ->
with p 0.8 colour jitter (brightness 0.8, contrast 0.8, saturation 0.8, hue 0.2, the four in random order) ->
grayscale (p 0.2) -> Gaussian blur (kernel 23, sigma ~ U(0.1, 2)), applied with probability ``blur_probability``
(1.0 as in the reference; SimCLR uses 0.5). Ops work on float [0, 1] pixels and clip after each jitter op like
torchvision's tensor path; unlike the reference's PIL path there is no uint8 rounding between ops.

The work is split in two: ``sample_view_parameters`` draws every random choice on the host (a pure function of
the per-example ``numpy.random.Generator``), and the photometric part is applied either by
``apply_photometric_host`` (numpy + scipy, in grain workers) or by ``apply_photometric_device`` (jax, inside the
user's jitted step) from the same parameters, so both give the same pixels up to float32 rounding. The crop always
runs on the host: it needs the full decoded image, whose size varies from file to file.

Host or device? Measured with ``python -m benchmarks.data`` on this project's 2-core CPU machine (shared with
other jobs, so the spread of three runs is given; no accelerator was available), 500x375 JPEGs -> two 224x224 views:
  host variant (decode + crops + photometric in numpy/scipy):   27-49 images/s per host core
  device variant, host share (decode + crops only):            100-230 images/s per host core
  device variant, device share on this CPU through jax:          9-28 views/s on both cores (the 23-tap blur and the
                                                               hue rotation; on a GPU/TPU this is a few fused
                                                               elementwise passes, not measured here)
Consumption (SPEC §7.4: 8192 x 5M two-view images in 1,800 h on 128 A100s) is ~49 images/s per accelerator, so a
TPU v5e host with 8 chips (taking a v5e chip as an A100) needs ~395 images/s: 8-15 host cores with the host variant,
2-4 with the device variant, out of the 224 vCPUs of a v5e host. Decision: the default is ``augment_on="host"``.
It keeps every host batch final (uint8 views; the trainer only calls ``to_float_images``), costs under 7% of a v5e
host's vCPUs at the paper's speed (still under half at a 7x faster trainer), and leaves the accelerator, whose step
is the bottleneck (the latent ODE is quadratic in the batch), untouched. ``augment_on="device"`` is there for
hosts with few cores per accelerator: it moves ~4/5 of the host work to the device and gives the same pixels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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


def apply_photometric_host(
    view: np.ndarray, parameters: dict[str, np.ndarray], *, blur_kernel_size: int = 23
) -> np.ndarray:
    """Applies flip, jitter, grayscale and blur of one view on the host.

    Args:
      view: ``uint8 (H, W, 3)``; parameters: one view's dict from ``sample_view_parameters``.
    Returns:
      ``float32 (H, W, 3)`` in [0, 1] (round ``* 255`` to get uint8).
    """
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


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 with rounding to nearest."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def two_view_host(image: np.ndarray, rng: np.random.Generator, options: TwoViewOptions) -> np.ndarray:
    """The whole two-view augmentation on the host. ``uint8 (H, W, 3)`` -> ``uint8 (2, S, S, 3)``."""
    views, parameters = two_view_crops(image, rng, options)
    out = [
        to_uint8(
            apply_photometric_host(
                views[v], {k: p[v] for k, p in parameters.items()}, blur_kernel_size=options.blur_kernel_size
            )
        )
        for v in range(2)
    ]
    return np.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# Device path (jax; call it inside the jitted training step).
# ---------------------------------------------------------------------------------------------------------------


def _gaussian_blur_device(image: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
    """Separable blur as a sum of shifted slices (vmap-friendly: the taps depend on the per-image sigma)."""
    kernel = gaussian_kernel(sigma, kernel_size, jnp)
    half = kernel_size // 2
    padded = jnp.pad(image, ((half, half), (0, 0), (0, 0)), mode="reflect")
    height, width = image.shape[0], image.shape[1]
    image = sum(kernel[k] * padded[k : k + height] for k in range(kernel_size))
    padded = jnp.pad(image, ((0, 0), (half, half), (0, 0)), mode="reflect")
    return sum(kernel[k] * padded[:, k : k + width] for k in range(kernel_size))


def _blend_device(image: jax.Array, op: jax.Array, factor: jax.Array) -> jax.Array:
    """Brightness, contrast or saturation (``op`` 0, 1, 2) as one blend ``clip(f x + (1 - f) target)``.

    The targets are 0, the mean luma and the per-pixel luma; ``factor = 1`` is the identity. One blend per
    position replaces ``lax.switch``, which under ``vmap`` would evaluate every op (hue included) at every position.
    """
    luma = grayscale(image, jnp)
    target = jnp.where(op == CONTRAST, jnp.mean(luma), luma) * (op != BRIGHTNESS)
    return jnp.clip(factor * image + (1.0 - factor) * target, 0.0, 1.0)


def _jitter_device(image: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
    """The four jitter ops in ``order``: blends before the hue position, the hue rotation once, blends after."""
    hue_position = jnp.argmax(order == HUE)
    for before_hue in (True, False):
        if not before_hue:
            image = adjust_hue(image, factors[HUE], jnp)
        for position in range(4):
            op = order[position]
            active = position < hue_position if before_hue else position > hue_position
            factor = jnp.where(active, factors[jnp.minimum(op, SATURATION)], 1.0)
            image = _blend_device(image, op, factor)
    return image


def _photometric_one_device(view: jax.Array, parameters: dict[str, jax.Array], kernel_size: int) -> jax.Array:
    image = view.astype(jnp.float32) / 255.0
    image = jnp.where(parameters["flip"], image[:, ::-1], image)
    jittered = _jitter_device(image, parameters["factors"], parameters["order"])
    image = jnp.where(parameters["jitter"], jittered, image)
    image = jnp.where(parameters["grayscale"], jnp.repeat(grayscale(image, jnp), 3, axis=-1), image)
    return jnp.where(parameters["blur"], _gaussian_blur_device(image, parameters["sigma"], kernel_size), image)


def apply_photometric_device(
    views: jax.Array, parameters: dict[str, jax.Array], *, blur_kernel_size: int = 23
) -> jax.Array:
    """Device half of the two-view augmentation; returns model inputs.

    Args:
      views: ``uint8 (..., H, W, 3)``, e.g. the pipeline's ``(B, 2, 224, 224, 3)`` crops.
      parameters: the pipeline's ``"augment"`` dict, each leaf with the leading shape ``(...)`` of ``views``.
    Returns:
      ``float32 (..., H, W, 3)`` in [-1, 1].
    """
    leading = views.shape[:-3]
    flat_views = views.reshape((-1,) + views.shape[-3:])
    flat_parameters = jax.tree.map(lambda p: p.reshape((flat_views.shape[0],) + p.shape[len(leading) :]), parameters)
    images = jax.vmap(lambda v, p: _photometric_one_device(v, p, blur_kernel_size))(flat_views, flat_parameters)
    return (images * 2.0 - 1.0).reshape(views.shape)
