"""Classification with a joint LZN model (case study 3): image encoder -> latents -> reverse label flow -> the
nearest label anchor. Transductive as in the paper: each image's latent depends on the batch it is solved with,
so every reported accuracy states its batch size and prior scale alpha."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax import zoning
from lzn_jax.evaluation.fid import MetricResult

# The reference's flows for classification: DPM-Solver++ 20 steps for the image latents, reverse Euler 100 steps
# over the label anchors with uniform weights.
IMAGE_LATENT_OPTIONS = zoning.SolverOptions(solver="dpm_solver++", num_steps=20)
LABEL_FLOW_OPTIONS = zoning.SolverOptions(solver="euler", num_steps=100)


def nearest_label(endpoints: jax.Array, label_table: jax.Array) -> jax.Array:
    """Index (B,) of the label anchor nearest in squared Euclidean distance to each end point (B, D): the
    reference's decoding rule (the paper's text says arg-max inner product; docs/differences.md, item 14)."""
    distances = jnp.sum((endpoints[:, None, :] - label_table[None, :, :]) ** 2, axis=-1)
    return jnp.argmin(distances, axis=-1)


def eval_anchors(encoder, encoder_params, images: jax.Array) -> jax.Array:
    """Anchors (B, D) float32 of ``images`` (B, H, W, C) in [-1, 1], the encoder in evaluation mode (a ResNet gives
    its head's output, not its backbone features)."""
    output = encoder.apply({"params": encoder_params}, images, train=False)
    return (output.anchors if hasattr(output, "anchors") else output).astype(jnp.float32)


def decode_labels(latents: jax.Array, label_table: jax.Array, *, log_weights: jax.Array | None = None,
                  options: zoning.SolverOptions = LABEL_FLOW_OPTIONS) -> jax.Array:
    """Classes (B,) of latents (B, D): the reverse label flow over the label anchors (C, D), weighted by
    ``log_weights`` (C,) if given (uniform otherwise), then the nearest label anchor. Only the end points are used,
    so the recorded targets are arbitrary (zeros)."""
    endpoints = zoning.assign_targets(
        latents, label_table, jnp.zeros(latents.shape[0], jnp.int32), log_weights=log_weights, options=options
    ).endpoints
    return nearest_label(endpoints, label_table)


def classify(    encoder,
    encoder_params,
    label_table: jax.Array,
    images: jax.Array,
    key: jax.Array,
    *,
    prior_scale: float = 1.0,
    latent_options: zoning.SolverOptions = IMAGE_LATENT_OPTIONS,
    label_options: zoning.SolverOptions = LABEL_FLOW_OPTIONS,
) -> jax.Array:
    """Predicted classes (B,) of ``images`` (B, H, W, C) in [-1, 1], solved as one batch.

    The encoder runs in evaluation mode; the image latents are computed against all B anchors with the prior draw
    ``prior_scale * N(0, I)`` from ``key``; the reverse label flow uses uniform class weights (the paper's
    test-time setting).
    """
    anchors = eval_anchors(encoder, encoder_params, images)
    noise = prior_scale * jax.random.normal(key, anchors.shape, jnp.float32)
    latents = zoning.compute_latents(anchors, noise, options=latent_options)
    return decode_labels(latents, label_table, options=label_options)


# ----------------------------------------------------------------------------------------------------------------
# The prior-scale ("tunable std") sweep and the class-weighted variant (docs/evaluation.md, "Classification")
# ----------------------------------------------------------------------------------------------------------------

# The reference's tunable-std metric: these prior scales alpha, each with and without class weights.
DEFAULT_PRIOR_SCALES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2)


def classify_with_class_weights(
    encoder,
    encoder_params,
    label_table: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    prior_scale: float = 1.0,
    latent_options: zoning.SolverOptions = IMAGE_LATENT_OPTIONS,
    label_options: zoning.SolverOptions = LABEL_FLOW_OPTIONS,
) -> jax.Array:
    """Predicted classes (B,) as :func:`classify`, but the reverse label flow weights each class by its frequency
    among the batch's TRUE labels (B,): the reference's "..._with_class_weights" accuracy.

    The test batch's class proportions thus leak into the prediction (a class absent from the batch can never be
    predicted); report it only beside the uniform-weight accuracy (docs/differences.md, item 12).
    """
    anchors = eval_anchors(encoder, encoder_params, images)
    noise = prior_scale * jax.random.normal(key, anchors.shape, jnp.float32)
    latents = zoning.compute_latents(anchors, noise, options=latent_options)
    return decode_labels(latents, label_table, log_weights=zoning.class_log_weights(labels, label_table.shape[0]),
                         options=label_options)


class PriorScaleSweep(NamedTuple):
    """Predictions of one batch at every prior scale alpha.

    predictions: (A, B) int, uniform class weights; row ``i`` is alpha ``prior_scales[i]``.
    predictions_with_class_weights: (A, B) int with the batch's label frequencies as weights, or None when no
      labels were given.
    """

    predictions: jax.Array
    predictions_with_class_weights: jax.Array | None


def classify_prior_scales(
    encoder,
    encoder_params,
    label_table: jax.Array,
    images: jax.Array,
    key: jax.Array,
    *,
    prior_scales: Sequence[float] = DEFAULT_PRIOR_SCALES,
    labels: jax.Array | None = None,
    latent_options: zoning.SolverOptions = IMAGE_LATENT_OPTIONS,
    label_options: zoning.SolverOptions = LABEL_FLOW_OPTIONS,
) -> PriorScaleSweep:
    """The "tunable std" sweep: :func:`classify` of one batch (B, H, W, C) at every alpha in ``prior_scales``.

    Every alpha scales the same draw ``N(0, I)`` from ``key``, so the row of alpha equals
    ``classify(..., key, prior_scale=alpha)`` and differences between rows come from alpha alone. alpha = 0 starts
    every latent at its zone's centre ``(1 - eps) * anchor``. The encoder runs once for all alphas. With ``labels``
    (B,) the class-weighted variant (:func:`classify_with_class_weights`) is computed from the same latents.
    """
    anchors = eval_anchors(encoder, encoder_params, images)
    draw = jax.random.normal(key, anchors.shape, jnp.float32)
    log_weights = None if labels is None else zoning.class_log_weights(labels, label_table.shape[0])

    def at_scale(prior_scale: jax.Array):
        latents = zoning.compute_latents(anchors, prior_scale * draw, options=latent_options)
        uniform = decode_labels(latents, label_table, options=label_options)
        weighted = uniform if log_weights is None else decode_labels(latents, label_table, log_weights=log_weights,
                                                                     options=label_options)
        return uniform, weighted

    # One alpha at a time (a scan): the flows compile once, not once per alpha.
    uniform, weighted = jax.lax.map(at_scale, jnp.asarray(prior_scales, jnp.float32))
    return PriorScaleSweep(uniform, None if labels is None else weighted)


def count_correct(sweep: PriorScaleSweep, labels: jax.Array) -> PriorScaleSweep:
    """Correct predictions per alpha: the sweep's fields (A, B) reduced to (A,) int32 counts against ``labels``
    (B,). Jittable, so only counts leave the devices."""
    def count(predictions):
        return jnp.sum(predictions == labels[None, :], axis=1, dtype=jnp.int32)

    weighted = sweep.predictions_with_class_weights
    return PriorScaleSweep(count(sweep.predictions), None if weighted is None else count(weighted))


def prior_scale_results(
    correct: PriorScaleSweep,
    classified: int,
    *,
    prior_scales: Sequence[float] = DEFAULT_PRIOR_SCALES,
    batch_size: int,
    split: str = "test",
    weights: str = "EMA",
    latent_options: zoning.SolverOptions = IMAGE_LATENT_OPTIONS,
    label_options: zoning.SolverOptions = LABEL_FLOW_OPTIONS,
) -> dict[str, MetricResult]:
    """Accuracies with their protocol, named as the reference names them: ``{split}_accuracy_{alpha}`` and
    ``{split}_accuracy_{alpha}_with_class_weights``.

    Args:
      correct: :func:`count_correct` summed over the batches (``jax.tree.map(operator.add, ...)``), on the host
        or the devices.
      classified: the number of images classified (full batches only: the zones depend on the batch).
      batch_size: the global batch each image was solved with; part of every number's protocol.
    """
    variants = {"": (correct.predictions, "uniform (the paper's test-time setting)")}
    if correct.predictions_with_class_weights is not None:
        leak = "class frequencies of the batch's true labels (leaks the labels' proportions into the prediction)"
        variants["_with_class_weights"] = (correct.predictions_with_class_weights, leak)
    results = {}
    for suffix, (counts, class_weights) in variants.items():
        counts = np.asarray(jax.device_get(counts))
        for index, alpha in enumerate(prior_scales):
            name = f"{split}_accuracy_{alpha}{suffix}"
            results[name] = MetricResult(name, float(counts[index]) / classified, {
                "alpha": alpha,
                "batch_size": batch_size,
                "classified": classified,
                "split": split,
                "class_weights": class_weights,
                "image_latents": (f"{latent_options.solver} {latent_options.num_steps} steps against the "
                                  "batch's anchors"),
                "label_flow": f"reverse {label_options.solver} {label_options.num_steps} steps, nearest label anchor",
                "weights": weights,
            })
    return results
