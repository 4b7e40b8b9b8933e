"""The LZN generation loss (docs/method.md) against a hand-composed computation, sharded against unsharded, the plain
rectified-flow baseline, and the stage masks.

The hand composition mirrors generation_loss's key layout, which is part of its contract (a resumed run must draw
what it would have drawn): ``prior, rf, encoder dropout, decoder dropout = split(key, 4)`` and, inside
rectified_flow_pair, ``time, noise = split(rf, 2)``. Everything else (weights, masks, rf pairs, class weights,
the cut-off and the max over steps) is recomputed here from docs/method.md.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import zoning
from lzn_jax.objectives import generation
from tests.objectives import tiny

B = tiny.BATCH
# Classes 2, 4, 5, 6 and 8 are absent: their weight is zero (log-weight -inf).
LABELS = np.array([0, 1, 1, 3, 3, 3, 7, 9], np.int32)
# Non-default values wherever a wrong constant would go unnoticed with the defaults.
SETTINGS = generation.GenerationSettings(
    latent_options=zoning.SolverOptions(solver="dpm_solver++", num_steps=20),
    prior_scale=0.8,
    rf_time_eps=0.25,
    rf_loss_weight=0.7,
    label_options=zoning.SolverOptions(solver="euler", num_steps=100),
    label_cut_off=0.2,
    label_loss_weight=1.3,
    label_use_log=False,
)


@pytest.fixture(scope="module")
def setup():
    modules, params = tiny.build()
    return modules, params, tiny.images(0, B), jnp.asarray(LABELS), jax.random.key(7)


def hand_rf_pair(images, rf_key, time_eps):
    """docs/method.md: t ~ U[eps, 1] per image, n ~ N(0, I), x_t = t x + (1 - t) n, target x - n (float32 numpy)."""
    time_key, noise_key = jax.random.split(rf_key)  # mirrors rectified_flow_pair
    t = np.asarray(jax.random.uniform(time_key, (images.shape[0],), jnp.float32)) * np.float32(1.0 - time_eps)
    t = t + np.float32(time_eps)
    noise = np.asarray(jax.random.normal(noise_key, images.shape, jnp.float32))
    x = np.asarray(images)
    tt = t[:, None, None, None]
    return (tt * x + (np.float32(1.0) - tt) * noise).astype(np.float32), t, x - noise


def mse(prediction, target) -> float:
    """Batch mean of per-image mean squared errors, in float64."""
    error = (np.asarray(target, np.float64) - np.asarray(prediction, np.float64)) ** 2
    return float(np.mean(error.reshape(error.shape[0], -1).mean(axis=1)))


def hand_class_log_weights(labels, num_classes):
    """docs/method.md: log(count_k / B), -inf for absent classes."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def hand_label_loss(target_log_probs, cut_off) -> float:
    """docs/method.md, no log: -mean_b max_{s >= floor(S cut_off)} P[s, b, y_b]."""
    probs = np.exp(np.asarray(target_log_probs, np.float64))
    first = math.floor(probs.shape[0] * cut_off)
    return float(-np.mean(np.max(probs[first:], axis=0)))


def hand_generation(modules, params, images, labels, key, settings, *, latents_override=None, log_weights=True):
    """The whole of docs/method.md's loss, composed by hand (unsharded, un-jitted)."""
    prior_key, rf_key, encoder_key, decoder_key = jax.random.split(key, 4)  # mirrors generation_loss
    anchors = modules.encoder.apply({"params": params["encoder"]}, images, train=True, rngs={"dropout": encoder_key})
    noise = jax.random.normal(prior_key, anchors.shape, jnp.float32)
    latents = zoning.compute_latents(anchors, settings.prior_scale * noise, options=settings.latent_options)
    if latents_override is not None:
        latents = latents_override(anchors, latents)
    x_t, t, target = hand_rf_pair(images, rf_key, settings.rf_time_eps)
    onehot = jax.nn.one_hot(labels, tiny.NUM_CLASSES, dtype=jnp.float32)
    prediction = modules.decoder.apply({"params": params["decoder"]}, jnp.asarray(x_t), jnp.asarray(t), latents,
                                       onehot, train=True, rngs={"dropout": decoder_key})
    rf_loss = mse(prediction, target)
    table = params["label_anchors"]["anchors"]
    weights = jnp.asarray(hand_class_log_weights(labels, table.shape[0]), jnp.float32) if log_weights else None
    assignment = zoning.assign_targets(latents, table, labels, log_weights=weights, options=settings.label_options)
    assert assignment.target_log_probs.shape == (100, B)
    label_loss = hand_label_loss(assignment.target_log_probs, settings.label_cut_off)
    return dict(
        loss=settings.rf_loss_weight * rf_loss + settings.label_loss_weight * label_loss, rf_loss=rf_loss,
        label_loss=label_loss, anchor_norm=float(np.mean(np.linalg.norm(np.asarray(anchors, np.float64), axis=1))),
        latent_std=float(np.std(np.asarray(latents, np.float64))),
    )


@pytest.fixture(scope="module")
def eager_outputs(setup):
    """generation_loss called as a notebook would: no jit, no mesh (the unsharded latents_of path)."""
    modules, params, images, labels, key = setup
    return generation.generation_loss(params, images, labels, key, modules=modules, settings=SETTINGS)


def test_cut_off_keeps_steps_20_to_99():
    assert zoning.align.cut_off_step(100, 0.2) == 20 and zoning.align.cut_off_step(20, 0.2) == 4


def test_class_log_weights_are_the_batch_frequencies():
    got = np.asarray(zoning.class_log_weights(jnp.asarray(LABELS), tiny.NUM_CLASSES))
    np.testing.assert_allclose(got, hand_class_log_weights(LABELS, tiny.NUM_CLASSES), rtol=1e-6)
    assert np.isneginf(got[[2, 4, 5, 6, 8]]).all()


def test_generation_loss_equals_hand_composition(setup, eager_outputs):
    modules, params, images, labels, key = setup
    expected = hand_generation(modules, params, images, labels, key, SETTINGS)
    got = eager_outputs
    for name in ("loss", "rf_loss", "label_loss", "anchor_norm", "latent_std"):
        np.testing.assert_allclose(float(getattr(got, name)), expected[name], rtol=1e-6, err_msg=name)
    # Both terms are non-trivial (the label loss lies in [-1, 0): minus a probability).
    assert expected["rf_loss"] > 0.1 and -1.0 < expected["label_loss"] < -0.1


def test_hand_composition_would_notice_wrong_latents_or_weights(setup, eager_outputs):
    """The comparison above can fail: feeding the decoder the anchors instead of the latents, or dropping the
    class weights of the label flow, each moves a term by far more than its 1e-6 tolerance."""
    modules, params, images, labels, key = setup
    with_anchors = hand_generation(modules, params, images, labels, key, SETTINGS,
                                   latents_override=lambda anchors, latents: anchors)
    assert abs(with_anchors["rf_loss"] / float(eager_outputs.rf_loss) - 1.0) > 1e-4
    uniform = hand_generation(modules, params, images, labels, key, SETTINGS, log_weights=False)
    assert abs(uniform["label_loss"] / float(eager_outputs.label_loss) - 1.0) > 1e-3


def _loss_and_outputs(modules, settings):
    def fn(params, images, labels, key):
        outputs = generation.generation_loss(params, images, labels, key, modules=modules, settings=settings)
        return outputs.loss, outputs

    return fn


@pytest.fixture(scope="module")
def dense_value_and_grad(setup):
    """``((loss, outputs), grads)`` of the jitted, unsharded loss with the dense kernel (compiled once here)."""
    modules, params, images, labels, key = setup
    return tiny.jit(jax.value_and_grad(_loss_and_outputs(modules, SETTINGS), has_aux=True))(params, images, labels,
                                                                                          key)


def test_sharded_loss_and_gradients_equal_unsharded(setup, eager_outputs, dense_value_and_grad):
    """Under an 8-device mesh the latents and the label flow run under shard_map (latents_of,
    target_log_probs_of); the loss, its terms and the parameter gradients equal those of the unsharded run."""
    modules, params, images, labels, key = setup
    value_and_grad = jax.value_and_grad(_loss_and_outputs(modules, SETTINGS), has_aux=True)
    (loss, outputs), grads = dense_value_and_grad
    np.testing.assert_allclose(float(loss), float(eager_outputs.loss), rtol=1e-5)

    mesh, rows = tiny.data_mesh_sharding()
    with jax.set_mesh(mesh):
        sharded_images, sharded_labels = jax.device_put((images, labels), rows)
        jaxpr = str(jax.make_jaxpr(_loss_and_outputs(modules, SETTINGS))(params, sharded_images, sharded_labels,
                                                                          key))
        assert jaxpr.count("shard_map") >= 2, "latents and label flow both run under shard_map"
        (sharded_loss, sharded_outputs), sharded_grads = tiny.jit(value_and_grad)(
            params, sharded_images, sharded_labels, key)
    assert "shard_map" not in str(jax.make_jaxpr(_loss_and_outputs(modules, SETTINGS))(params, images, labels, key))
    np.testing.assert_allclose(float(sharded_loss), float(loss), rtol=2e-6)
    for name in ("loss", "rf_loss", "label_loss", "anchor_norm", "latent_std"):
        np.testing.assert_allclose(float(getattr(sharded_outputs, name)), float(getattr(outputs, name)), rtol=2e-6,
                                   err_msg=name)
    # Tolerance: the float32 zoning flows alone put ~1e-5 relative error on the anchors' gradient (measured against
    # float64: 4e-6 unsharded, 8e-6 sharded), which the encoder's backward pass carries; measured here: encoder
    # 1.6e-5 (norm) / 5.6e-5 (max), decoder and label anchors 1.5e-6. A gradient missing the other devices'
    # contributions would be off by O(1).
    for module in ("encoder", "decoder", "label_anchors"):
        norm_error, max_error = tiny.tree_errors(sharded_grads[module], grads[module])
        assert norm_error < 1e-4 and max_error < 2.5e-4, (module, norm_error, max_error)


def test_rectified_flow_baseline_is_the_plain_rf_loss():
    """No encoder, decoder latent_dim 0: the loss is docs/method.md's RF term alone; no label term, no latent stats."""
    decoder = dict(tiny.DECODER, latent_dim=0, num_classes=0)
    modules, params = tiny.build(encoder=None, decoder=decoder, label_anchors=None)
    images, key = tiny.images(1, B), jax.random.key(3)
    got = generation.generation_loss(params, images, None, key, modules=modules, settings=SETTINGS)

    _, rf_key, _, decoder_key = jax.random.split(key, 4)  # mirrors generation_loss
    x_t, t, target = hand_rf_pair(images, rf_key, SETTINGS.rf_time_eps)
    prediction = modules.decoder.apply({"params": params["decoder"]}, jnp.asarray(x_t), jnp.asarray(t),
                                       train=True, rngs={"dropout": decoder_key})
    expected = mse(prediction, target)
    np.testing.assert_allclose(float(got.rf_loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(got.loss), SETTINGS.rf_loss_weight * expected, rtol=1e-6)
    assert float(got.label_loss) == float(got.anchor_norm) == float(got.latent_std) == 0.0


def test_class_conditional_decoder_needs_labels():
    modules, params = tiny.build(encoder=None, decoder=dict(tiny.DECODER, latent_dim=0), label_anchors=None)
    with pytest.raises(ValueError, match="labels"):
        generation.generation_loss(params, tiny.images(1, B), None, jax.random.key(0), modules=modules,
                                   settings=SETTINGS)


def test_stage_masks_zero_exactly_the_terms_spec_says(setup):
    """docs/method.md: the RF term stays while the decoder or the encoder trains, the label term while the encoder or
    the label anchors train; a term whose modules are all frozen is exactly zero. A module missing from
    ``enabled`` counts as frozen."""
    modules, params, images, labels, key = setup

    @tiny.jit
    def terms(enabled):
        outputs = generation.generation_loss(params, images, labels, key, modules=modules, settings=SETTINGS,
                                             enabled=enabled)
        return outputs.loss, outputs.rf_loss, outputs.label_loss

    names = ("encoder", "decoder", "label_anchors")
    everything = terms({name: jnp.bool_(True) for name in names})
    full_loss, full_rf, full_label = (float(v) for v in everything)
    assert full_rf > 0 and full_label < 0
    np.testing.assert_allclose(full_loss, 0.7 * full_rf + 1.3 * full_label, rtol=1e-6)
    for flags in itertools.product((False, True), repeat=3):
        on = dict(zip(names, flags, strict=True))
        loss, rf, label = (float(v) for v in terms({name: jnp.bool_(value) for name, value in on.items()}))
        assert rf == (full_rf if on["decoder"] or on["encoder"] else 0.0), on
        assert label == (full_label if on["encoder"] or on["label_anchors"] else 0.0), on
        np.testing.assert_allclose(loss, SETTINGS.rf_loss_weight * rf + SETTINGS.label_loss_weight * label,
                                   rtol=1e-6, atol=1e-7)

    only_decoder = generation.generation_loss(params, images, labels, key, modules=modules, settings=SETTINGS,
                                              enabled={"decoder": jnp.bool_(True)})
    np.testing.assert_allclose(float(only_decoder.rf_loss), full_rf, rtol=1e-5)
    assert float(only_decoder.label_loss) == 0.0


def test_a_config_can_choose_the_blockwise_kernel_and_gets_the_same_loss(setup, eager_outputs, dense_value_and_grad):
    """``block_size`` in a config's solver blocks reaches the solver: the loss and its gradient through both flows
    equal the dense kernel's (float32), and the traced step streams over anchor blocks."""
    import dataclasses

    from configs import common

    modules, params, images, labels, key = setup
    latent_block = common.solver_block("dpm_solver++", 20)
    latent_block.block_size = 4  # 2 blocks of the batch's 8 anchors
    label_block = common.solver_block("euler", 100)
    label_block.block_size = 5  # 2 blocks of the 10 label anchors
    blockwise = dataclasses.replace(SETTINGS, latent_options=generation.solver_options(latent_block),
                                    label_options=generation.solver_options(label_block))
    assert (blockwise.latent_options.block_size, blockwise.label_options.block_size) == (4, 5)
    value_and_grad = jax.jit(jax.value_and_grad(_loss_and_outputs(modules, blockwise), has_aux=True))
    (loss, outputs), grads = value_and_grad(params, images, labels, key)
    _, dense_grads = dense_value_and_grad
    np.testing.assert_allclose(float(loss), float(eager_outputs.loss), rtol=2e-5)
    np.testing.assert_allclose(float(outputs.label_loss), float(eager_outputs.label_loss), rtol=2e-5)
    norm_error, max_error = tiny.tree_errors(grads, dense_grads)
    assert norm_error < 1e-4 and max_error < 2.5e-4, (norm_error, max_error)
    # The traced step runs the blockwise kernel's own custom-gradient posteriors, which the dense one never calls.
    jaxpr = str(jax.make_jaxpr(_loss_and_outputs(modules, blockwise))(params, images, labels, key))
    dense_jaxpr = str(jax.make_jaxpr(_loss_and_outputs(modules, SETTINGS))(params, images, labels, key))
    assert "name=blockwise" in jaxpr and "name=blockwise" not in dense_jaxpr
