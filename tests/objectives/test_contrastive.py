"""The LZN contrastive loss (docs/method.md) against the method's formulas (docs/method.md) in float64 NumPy, and sharded against unsharded.

Only the anchors come from JAX (the real tiny encoder, one pass over both views with the dropout key
contrastive_loss uses); the forward flow, the reverse flow and the loss are recomputed in float64 from
docs/method.md with the broadcast form of the velocity. The test mirrors contrastive_loss's key layout, part of its
contract: ``prior, dropout = split(key)``, the views encoded as rows in (image, view) order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax.objectives import contrastive
from tests.objectives import tiny

B = tiny.BATCH
SETTINGS = contrastive.ContrastiveSettings()  # the reference's: Euler 20 steps from 1e-4, alpha 0.45, cut-off 0.2
# Both weights non-zero so that a swapped or missing term changes the total.
WEIGHTED = contrastive.ContrastiveSettings(prob_loss_weight=0.3, log_loss_weight=1.2)


def velocity(x, t, anchors):
    """docs/method.md as the reference computes it (uniform weights): (v (B, D), unnormalised p (B, N))."""
    implied_noise = (x[:, None, :] - (1.0 - t) * anchors[None]) / t  # (B, N, D)
    log_pdf = -0.5 * np.sum(implied_noise**2, axis=-1)
    pdf = np.exp(log_pdf - log_pdf.max(axis=1, keepdims=True))
    v = np.sum(pdf[..., None] * (implied_noise - anchors[None]), axis=1) / pdf.sum(axis=1)[:, None]
    return v, pdf


def forward_euler(anchors, own, noise, num_steps, eps):
    """docs/method.md: from x = eps noise + (1 - eps) a_own at t = eps, num_steps steps of h = (1 - eps)/num_steps."""
    x, t, h = eps * noise + (1.0 - eps) * own, eps, (1.0 - eps) / num_steps
    for _ in range(num_steps):
        x = x + h * velocity(x, t, anchors)[0]
        t += h
    return x


def reverse_euler(anchors, latents, num_steps):
    """docs/method.md: from t = 1, h = 1/num_steps; the normalised pdfs before each step, (S, B, N), and the end points."""
    x, t, h, probs = latents, 1.0, 1.0 / num_steps, []
    for _ in range(num_steps):
        v, pdf = velocity(x, t, anchors)
        probs.append(pdf / pdf.sum(axis=1, keepdims=True))
        x = x - h * v
        t -= h
    return np.stack(probs), x


def reference(anchors_0, anchors_1, noise, settings):
    """docs/method.md in float64: the losses and diagnostics of one (unsharded) batch."""
    latent, align = settings.latent_options, settings.alignment_options
    assert (latent.solver, align.solver) == ("euler", "euler")
    z = forward_euler(anchors_0, anchors_0, settings.prior_scale * noise, latent.num_steps, latent.start_offset)
    probs, end = reverse_euler(anchors_1, z, align.num_steps)
    rows = np.arange(anchors_1.shape[0])
    q = probs[:, rows, rows]  # (S, B): the matching view-1 sample
    first = math.floor(align.num_steps * settings.cut_off)
    best = np.max(q[first:], axis=0)
    nearest = anchors_1[np.argmax(probs[-1], axis=1)]  # the reference's rule: the arg-max of the last recorded pdf
    return dict(
        prob_loss=-np.mean(best), log_loss=-np.mean(np.log(best)), assignment_acc=np.mean(probs[-1][rows, rows]),
        ode_error=np.mean(np.linalg.norm(nearest - end, axis=1) / np.linalg.norm(nearest, axis=1)),
        first_kept_step=first,
    )


def two_views(seed: int) -> jax.Array:
    """(B, 2, H, W, C): view 1 is view 0 slightly disturbed, so the matching anchors are the closer ones."""
    view_0 = tiny.images(seed, B)
    view_1 = jnp.clip(view_0 + 0.3 * tiny.images(seed + 1, B), -1.0, 1.0)
    return jnp.stack([view_0, view_1], axis=1)


@pytest.fixture(scope="module")
def setup():
    modules, params = tiny.build(decoder=None, label_anchors=None)
    return modules, params, two_views(10), jax.random.key(11)


@pytest.fixture(scope="module")
def expected(setup):
    modules, params, views, key = setup
    prior_key, dropout_key = jax.random.split(key)  # mirrors contrastive_loss
    # One encoder pass over both views, rows in (image, view) order, as contrastive.two_view_anchors runs it.
    rows = views.reshape(-1, *views.shape[2:])
    anchors = modules.encoder.apply({"params": params["encoder"]}, rows, train=True, rngs={"dropout": dropout_key})
    anchors = np.asarray(anchors, np.float64).reshape(views.shape[0], 2, -1)
    anchors_0, anchors_1 = anchors[:, 0], anchors[:, 1]
    noise = np.asarray(jax.random.normal(prior_key, anchors_0.shape, jnp.float32), np.float64)
    return reference(anchors_0, anchors_1, noise, SETTINGS)


def test_contrastive_loss_equals_spec_in_float64(setup, expected):
    modules, params, views, key = setup
    got = contrastive.contrastive_loss(params, views, key, modules=modules, settings=SETTINGS)
    assert expected["first_kept_step"] == 4
    # A batch where the assignment is neither trivial nor hopeless, so every number below carries information.
    assert 0.2 < -expected["prob_loss"] < 0.95 and expected["log_loss"] > 0.05
    # Tolerance: float32 against float64 after 40 Euler steps; measured 2e-7 .. 4e-7 on this batch.
    for name in ("prob_loss", "log_loss", "assignment_acc", "ode_error"):
        np.testing.assert_allclose(float(getattr(got, name)), expected[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(got.loss), expected["log_loss"], rtol=1e-5)  # weights 0 and 1

    weighted = contrastive.contrastive_loss(params, views, key, modules=modules, settings=WEIGHTED)
    np.testing.assert_allclose(float(weighted.loss), 0.3 * expected["prob_loss"] + 1.2 * expected["log_loss"],
                               rtol=1e-5)


def test_sharded_loss_and_gradient_equal_unsharded(setup):
    """Under an 8-device mesh both flows run under shard_map (view-1 anchors gathered inside); the losses, the
    diagnostics and the encoder gradient equal the unsharded ones."""
    modules, params, views, key = setup

    def objective(params, views, key):
        outputs = contrastive.contrastive_loss(params, views, key, modules=modules, settings=WEIGHTED)
        return outputs.loss, outputs

    value_and_grad = tiny.jit(jax.value_and_grad(objective, has_aux=True))
    (_, outputs), grads = value_and_grad(params, views, key)
    mesh, rows = tiny.data_mesh_sharding()
    with jax.set_mesh(mesh):
        sharded_views = jax.device_put(views, rows)
        assert str(jax.make_jaxpr(objective)(params, sharded_views, key)).count("shard_map") >= 2
        (_, sharded_outputs), sharded_grads = value_and_grad(params, sharded_views, key)
    for name in outputs._fields:
        np.testing.assert_allclose(float(getattr(sharded_outputs, name)), float(getattr(outputs, name)), rtol=2e-6,
                                   err_msg=name)
    # Tolerance: as in test_generation.py, the float32 flows' error on the anchors' gradient carried into the
    # encoder; a gradient without the other devices' contributions would be off by O(1).
    norm_error, max_error = tiny.tree_errors(sharded_grads, grads)
    assert norm_error < 1e-4 and max_error < 2.5e-4, (norm_error, max_error)


def test_each_device_encodes_only_its_own_images(setup):
    """The two views share one encoder pass whose rows stay sharded: on 8 devices each device's compiled encoder
    does 1/8 of the unsharded work. (Vmapping the encoder over the view axis, as an earlier version did, made XLA
    gather the whole global batch onto every device: per-device FLOPs equal to the unsharded program's.)"""
    modules, params, views, key = setup

    def encode(params, views, key):
        return contrastive.two_view_anchors(modules.encoder, params["encoder"], views, key)

    def flops(views):
        return jax.jit(encode).lower(params, views, key).compile().cost_analysis()["flops"]

    views = jnp.concatenate([views, views[::-1]])  # 16 images: 2 per device
    mesh, rows = tiny.data_mesh_sharding()
    unsharded = flops(views)
    with jax.set_mesh(mesh):
        sharded_views = jax.device_put(views, rows)
        per_device = flops(sharded_views)
        anchors_0, anchors_1 = jax.jit(encode)(params, sharded_views, key)
    # XLA's cost analysis of an SPMD program counts one device's share.
    assert per_device < 0.2 * unsharded, (per_device, unsharded)
    for anchors in (anchors_0, anchors_1):
        assert anchors.sharding.spec[0] == "data", anchors.sharding
    np.testing.assert_allclose(np.asarray(anchors_0), np.asarray(encode(params, views, key)[0]), rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------- encoding in chunks

# Dropout off, so that one pass and the chunks (which draw their masks per chunk) encode the same function.
DETERMINISTIC = dict(tiny.ENCODER, dropout=0.0)


@pytest.fixture(scope="module")
def deterministic_encoder():
    return tiny.build(encoder=DETERMINISTIC, decoder=None, label_anchors=None)


def _loss_and_gradient(modules, params, views, key, settings):
    def objective(params, views):
        return contrastive.contrastive_loss(params, views, key, modules=modules, settings=settings).loss

    return tiny.jit(jax.value_and_grad(objective))


def test_encoding_in_chunks_gives_the_one_pass_gradient_in_a_quarter_of_the_memory(deterministic_encoder):
    """Gradient caching: the anchors' cotangent over the whole batch, pulled back chunk by chunk, is the gradient of
    one pass; the compiled program keeps one chunk's activations instead of the whole batch's."""
    modules, params = deterministic_encoder
    views = jnp.concatenate([two_views(20), two_views(21)])  # 16 images, 32 encoder rows
    key = jax.random.key(12)
    results, temporaries = {}, {}
    for chunks in (1, 4):
        settings = dataclasses.replace(WEIGHTED, encoder_chunks=chunks)
        value_and_grad = _loss_and_gradient(modules, params, views, key, settings)
        compiled = value_and_grad.lower(params, views).compile()
        temporaries[chunks] = compiled.memory_analysis().temp_size_in_bytes
        results[chunks] = compiled(params, views)
    (loss, grads), (chunked_loss, chunked_grads) = results[1], results[4]
    np.testing.assert_allclose(float(chunked_loss), float(loss), rtol=2e-6)
    # Tolerance: the encoder's float32 sums over a chunk instead of the batch, carried through the flows as in
    # test_sharded_loss_and_gradient_equal_unsharded; measured 4.7e-5 / 1.0e-4 (5.7e-5 / 1.8e-4 at XLA's default
    # optimisation level). A chunk whose cotangent slice went to other rows would be off by O(1); the dropout keys
    # are checked in the next test.
    norm_error, max_error = tiny.tree_errors(chunked_grads, grads)
    assert norm_error < 1e-4 and max_error < 2.5e-4, (norm_error, max_error)
    # Measured 0.23 (0.63 of 2.70 MB): the activations of 8 rows instead of 32.
    assert temporaries[4] < 0.4 * temporaries[1], temporaries


def test_each_chunk_is_encoded_with_its_own_dropout_key_in_both_passes():
    """With dropout on, the chunked anchors and their gradient equal chunk c = rows c, c + C, ... encoded by hand
    with key fold_in(key, c): the backward pass re-encodes each chunk with the masks of its forward pass."""
    modules, params = tiny.build(decoder=None, label_anchors=None)  # dropout 0.1
    rows = two_views(22).reshape(2 * B, *two_views(22).shape[2:])
    key, chunks = jax.random.key(13), 4
    weights = jax.random.normal(jax.random.key(14), (2 * B, tiny.LATENT_DIM))

    def chunked(params):
        anchors = contrastive.encoded_in_chunks(modules.encoder, params, rows, key, chunks)
        return jnp.sum(anchors * weights), anchors

    def by_hand(params):
        total, anchors = 0.0, []
        for c in range(chunks):
            piece = contrastive.encoder_anchors(modules.encoder, params, rows[c::chunks], jax.random.fold_in(key, c))
            total, anchors = total + jnp.sum(piece * weights[c::chunks]), anchors + [piece]
        return total, jnp.stack(anchors, axis=1).reshape(2 * B, -1)

    (_, got), got_grads = tiny.jit(jax.value_and_grad(chunked, has_aux=True))(params["encoder"])
    (_, want), want_grads = tiny.jit(jax.value_and_grad(by_hand, has_aux=True))(params["encoder"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    norm_error, max_error = tiny.tree_errors(got_grads, want_grads)
    assert norm_error < 1e-5 and max_error < 1e-5, (norm_error, max_error)


def test_encoding_in_chunks_on_eight_devices_equals_one_device(deterministic_encoder):
    """Each device encodes its own rows chunk by chunk: the same loss and gradient as unsharded, and a device's
    compiled program does an eighth of the work (no image is gathered)."""
    modules, params = deterministic_encoder
    views, key = jnp.concatenate([two_views(23), two_views(24)]), jax.random.key(15)  # 4 rows per device
    settings = dataclasses.replace(WEIGHTED, encoder_chunks=2)
    value_and_grad = _loss_and_gradient(modules, params, views, key, settings)
    loss, grads = value_and_grad(params, views)
    mesh, rows = tiny.data_mesh_sharding()
    with jax.set_mesh(mesh):
        sharded_views = jax.device_put(views, rows)
        compiled = value_and_grad.lower(params, sharded_views).compile()
        sharded_loss, sharded_grads = compiled(params, sharded_views)
    np.testing.assert_allclose(float(sharded_loss), float(loss), rtol=2e-6)
    norm_error, max_error = tiny.tree_errors(sharded_grads, grads)
    assert norm_error < 1e-4 and max_error < 2.5e-4, (norm_error, max_error)
    unsharded_flops = value_and_grad.lower(params, views).compile().cost_analysis()["flops"]
    assert compiled.cost_analysis()["flops"] < 0.2 * unsharded_flops


def test_chunks_that_do_not_divide_the_rows_are_refused(setup):
    modules, params, views, key = setup
    settings = dataclasses.replace(SETTINGS, encoder_chunks=3)
    with pytest.raises(ValueError, match="encoder_chunks=3 does not divide the 16 encoder rows"):
        contrastive.contrastive_loss(params, views, key, modules=modules, settings=settings)
    with pytest.raises(ValueError, match="positive"):
        contrastive.ContrastiveSettings(encoder_chunks=0)
    # The images are data: a gradient with respect to them is refused rather than reported as zero.
    rows = views.reshape(-1, *views.shape[2:])
    with pytest.raises(NotImplementedError, match="not the images"):
        jax.grad(lambda rows: jnp.sum(contrastive.encoded_in_chunks(
            modules.encoder, params["encoder"], rows, key, 2)))(rows)
