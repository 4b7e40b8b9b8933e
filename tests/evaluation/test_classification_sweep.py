"""The prior-scale ("tunable std") sweep and the class-weighted accuracy on a tiny NCSN++ encoder with label anchors:
each alpha's row equals ``classify`` at that alpha with the same key, the weighted variant equals the label flow run
by hand with the batch's label frequencies, and every number carries its alpha and batch size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import evaluation, models, zoning
from lzn_jax.evaluation import classification
from tests.objectives import tiny

FAST = tiny.FAST_COMPILE
LATENT = zoning.SolverOptions(solver="dpm_solver++", num_steps=5)
LABEL = zoning.SolverOptions(solver="euler", num_steps=10)
SMALL_ENCODER = {**tiny.ENCODER, "ch_mult": (1,), "attn_resolutions": ()}
SCALES = (0.0, 1.0)
KEY = jax.random.key(3)


@pytest.fixture(scope="module")
def problem():
    """(encoder, its params, label table (10, 4), images (16, 8, 8, 1), labels (16,)); init jitted (faster than
    Flax's op-by-op init of the NCSN++ encoder)."""
    encoder = models.build(SMALL_ENCODER)
    inputs = encoder.example_inputs(1, tiny.SIZE, tiny.CHANNELS)
    params = jax.jit(encoder.init, compiler_options=FAST)(jax.random.key(0), *inputs)["params"]
    table = jax.random.normal(jax.random.key(1), (tiny.NUM_CLASSES, tiny.LATENT_DIM))  # the label anchors' init
    images = tiny.images(11, 16)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, tiny.NUM_CLASSES, 16), jnp.int32)
    return encoder, params, table, images, labels


@pytest.fixture(scope="module")
def sweep(problem):
    encoder, params, table, images, labels = problem
    return _jit(classification.classify_prior_scales, encoder, prior_scales=SCALES)(params, table, images, KEY,
                                                                                     labels=labels)


def _jit(fn, encoder, **kwargs):
    """``fn`` with the encoder module and the solver options bound, jitted."""
    return jax.jit(functools.partial(fn, encoder, latent_options=LATENT, label_options=LABEL, **kwargs),
                   compiler_options=FAST)


def test_each_alpha_of_the_sweep_is_classify_at_that_alpha(problem, sweep):
    encoder, params, table, images, labels = problem
    key = KEY
    assert sweep.predictions.shape == sweep.predictions_with_class_weights.shape == (2, 16)
    classify = _jit(evaluation.classify, encoder)
    for row, alpha in enumerate(SCALES):
        expected = np.asarray(classify(params, table, images, key, prior_scale=alpha))
        assert np.mean(np.asarray(sweep.predictions[row]) == np.asarray(labels)) == np.mean(expected == labels)
        np.testing.assert_array_equal(sweep.predictions[row], expected)

    weighted = _jit(classification.classify_with_class_weights, encoder)
    np.testing.assert_array_equal(sweep.predictions_with_class_weights[1],
                                  weighted(params, table, images, labels, key, prior_scale=1.0))
    assert np.unique(np.asarray(sweep.predictions)).size > 1  # not a degenerate all-one-class answer


def test_class_weights_are_the_batch_label_frequencies(problem):
    encoder, params, table, images, labels = problem
    key = jax.random.key(4)

    @functools.partial(jax.jit, compiler_options=FAST)
    def by_hand(params, images, labels):
        anchors = encoder.apply({"params": params}, images, train=False)
        latents = zoning.compute_latents(anchors, jax.random.normal(key, anchors.shape), options=LATENT)
        counts = jnp.bincount(labels, length=tiny.NUM_CLASSES).astype(jnp.float32)
        ends = zoning.assign(latents, table, log_weights=jnp.log(counts / counts.sum()), options=LABEL).endpoints
        return classification.nearest_label(ends, table)

    weighted = _jit(classification.classify_with_class_weights, encoder)
    np.testing.assert_array_equal(weighted(params, table, images, labels, key), by_hand(params, images, labels))

    # The leak: when the whole batch has one true class, every other class has weight zero and cannot be predicted.
    one_class = jnp.full_like(labels, 7)
    np.testing.assert_array_equal(weighted(params, table, images, one_class, key), 7)


def test_sweep_results_name_alpha_and_batch_size_with_every_number(problem, sweep):
    labels = problem[-1]
    counts = classification.count_correct(sweep, labels)
    results = classification.prior_scale_results(counts, 16, prior_scales=SCALES, batch_size=16,
                                                 latent_options=LATENT, label_options=LABEL)
    assert sorted(results) == ["test_accuracy_0.0", "test_accuracy_0.0_with_class_weights", "test_accuracy_1.0",
                               "test_accuracy_1.0_with_class_weights"]
    result = results["test_accuracy_1.0"]
    assert result.value == np.mean(np.asarray(sweep.predictions[1]) == np.asarray(labels))
    assert result.protocol["alpha"] == 1.0 and result.protocol["batch_size"] == 16
    assert result.protocol["class_weights"].startswith("uniform")
    assert "label" in results["test_accuracy_0.0_with_class_weights"].protocol["class_weights"]

    unweighted = classification.count_correct(sweep._replace(predictions_with_class_weights=None), labels)
    assert len(classification.prior_scale_results(unweighted, 16, prior_scales=SCALES, batch_size=16)) == 2
