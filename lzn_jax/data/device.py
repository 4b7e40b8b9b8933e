"""What runs on the accelerator inside the user's jitted step: uint8 pixels to float model inputs in [-1, 1], the
device half of the two-view augmentation, and ``model_inputs_fn``, which picks the right one for a data config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from lzn_jax.data import augment
from lzn_jax.data.config import check_config

Batch = Mapping[str, Any]


def to_float_images(images) -> jax.Array:
    """Maps ``uint8`` pixels to ``float32`` in ``[-1, 1]`` (``x / 255 * 2 - 1``), the model's input convention.

    Args:
      images: any-shape ``uint8`` array (numpy or jax), e.g. ``(B, H, W, C)``.
    Returns:
      ``float32`` jax array of the same shape.
    """
    return jnp.asarray(images, jnp.float32) * (2.0 / 255.0) - 1.0


def _gaussian_blur_device(image: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
    """Separable blur as a sum of shifted slices (vmap-friendly: the taps depend on the per-image sigma)."""
    kernel = augment.gaussian_kernel(sigma, kernel_size, jnp)
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
    luma = augment.grayscale(image, jnp)
    target = jnp.where(op == augment.CONTRAST, jnp.mean(luma), luma) * (op != augment.BRIGHTNESS)
    return jnp.clip(factor * image + (1.0 - factor) * target, 0.0, 1.0)


def _jitter_device(image: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
    """The four jitter ops in ``order``: blends before the hue position, the hue rotation once, blends after."""
    hue_position = jnp.argmax(order == augment.HUE)
    for before_hue in (True, False):
        if not before_hue:
            image = augment.adjust_hue(image, factors[augment.HUE], jnp)
        for position in range(4):
            op = order[position]
            active = position < hue_position if before_hue else position > hue_position
            factor = jnp.where(active, factors[jnp.minimum(op, augment.SATURATION)], 1.0)
            image = _blend_device(image, op, factor)
    return image


def _photometric_one_device(view: jax.Array, parameters: dict[str, jax.Array], kernel_size: int) -> jax.Array:
    """One view: ``uint8 (H, W, 3)`` -> ``float32 (H, W, 3)`` in [0, 1]; every op runs, ``where`` keeps the chosen."""
    image = view.astype(jnp.float32) / 255.0
    image = jnp.where(parameters["flip"], image[:, ::-1], image)
    jittered = _jitter_device(image, parameters["factors"], parameters["order"])
    image = jnp.where(parameters["jitter"], jittered, image)
    image = jnp.where(parameters["grayscale"], jnp.repeat(augment.grayscale(image, jnp), 3, axis=-1), image)
    return jnp.where(parameters["blur"], _gaussian_blur_device(image, parameters["sigma"], kernel_size), image)


def apply_photometric_device(
    views: jax.Array, parameters: dict[str, jax.Array], *, blur_kernel_size: int = 23
) -> jax.Array:
    """Device half of the two-view augmentation; returns model inputs (``apply_photometric_host`` is its twin).

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


# ---------------------------------------------------------------------------------------------------------------
# Batches to model inputs, one function per kind of batch.
# ---------------------------------------------------------------------------------------------------------------


def _image_inputs(batch: Batch) -> dict[str, Any]:
    """``"image"`` uint8 ``(B, H, W, C)`` -> float32 in [-1, 1]; other keys pass through."""
    return {**batch, "image": to_float_images(batch["image"])}


def _view_inputs(batch: Batch) -> dict[str, Any]:
    """Final ``"views"`` uint8 ``(B, 2, S, S, 3)`` -> float32 in [-1, 1]; other keys pass through."""
    return {**batch, "views": to_float_images(batch["views"])}


def _augmented_view_inputs(batch: Batch, *, blur_kernel_size: int) -> dict[str, Any]:
    """Crops ``"views"`` plus their ``"augment"`` parameters -> augmented float32 views; ``"augment"`` is used up."""
    inputs = {key: value for key, value in batch.items() if key != "augment"}
    inputs["views"] = apply_photometric_device(batch["views"], batch["augment"], blur_kernel_size=blur_kernel_size)
    return inputs


def model_inputs_fn(config: ml_collections.ConfigDict) -> Callable[[Batch], dict[str, Any]]:
    """The jittable ``batch -> model inputs`` function for the batches of data config ``config``.

    The result maps ``"image"`` uint8 ``(B, H, W, C)`` or ``"views"`` uint8 ``(B, 2, S, S, 3)`` to float32 in
    [-1, 1] of the same shape; with ``augment_on="device"`` it also applies the two-view photometric ops and drops
    the ``"augment"`` parameters. ``"label"`` and ``"mask"`` pass through. A training step calls it first, so that
    nothing after it depends on where the augmentation ran.
    """
    check_config(config)
    if config.augmentation != "two_view":
        return _image_inputs
    if config.augment_on == "host":
        return _view_inputs
    return functools.partial(_augmented_view_inputs, blur_kernel_size=config.two_view.blur_kernel_size)
