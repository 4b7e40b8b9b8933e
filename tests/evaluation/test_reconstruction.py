"""The reconstruction error: closed forms on analytic decoders (straight or linear velocity fields, where the round
trip is exact or its error is known), the hand-composed computation on a tiny NCSN++ encoder and decoder with the
same keys, the rectified-flow baseline, a sharded batch, and the protocol stated with the number."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import models, parallel, sampling, zoning
from lzn_jax.evaluation import reconstruction
from tests.objectives import tiny

FAST = tiny.FAST_COMPILE
BATCH, SIZE, CHANNELS, LATENT_DIM, NUM_CLASSES = 8, 4, 2, 3, 4
LATENT_OPTIONS = zoning.SolverOptions(solver="dpm_solver++", num_steps=5)
# One NCSN++ level without attention: the smallest encoder and decoder that still take every input.
SMALL_TRUNK = {"ch_mult": (1,), "attn_resolutions": ()}


@dataclasses.dataclass(frozen=True)
class StraightDecoder:
    """Velocity ``c = sum(latent) + class index + offset``, the same at every pixel and time: trajectories are
    straight lines, so Euler and Dormand-Prince integrate them exactly."""

    latent_dim: int = LATENT_DIM
    num_classes: int = NUM_CLASSES

    def apply(self, variables, x, t, latent, label_onehot, *, train):
        assert not train and (latent is None) == (self.latent_dim == 0)
        speed = jnp.full((x.shape[0],), variables["params"]["offset"])
        if latent is not None:
            speed = speed + latent.sum(-1)
        if label_onehot is not None:
            speed = speed + label_onehot @ jnp.arange(self.num_classes, dtype=jnp.float32)
        return jnp.broadcast_to(speed[:, None, None, None], x.shape)


@dataclasses.dataclass(frozen=True)
class LinearDecoder:
    """Velocity ``rate * x`` with no conditioning (a rectified-flow baseline): Euler's round trip multiplies the image
    by ``(1 - (h * rate)^2)^steps``, a known, non-zero error."""

    latent_dim: int = 0
    num_classes: int = 0

    def apply(self, variables, x, t, latent, label_onehot, *, train):
        assert latent is None and label_onehot is None
        return variables["params"]["rate"] * x


@dataclasses.dataclass(frozen=True)
class PixelEncoder:
    """Anchors = the first LATENT_DIM pixels of each image, times a scale."""

    def apply(self, variables, images, *, train):
        assert not train
        return variables["params"]["scale"] * images.reshape(images.shape[0], -1)[:, :LATENT_DIM]


ENCODER_PARAMS = {"scale": jnp.float32(2.0)}
STRAIGHT_PARAMS = {"offset": jnp.float32(0.3)}


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(-1, 1, (BATCH, SIZE, SIZE, CHANNELS)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, BATCH), jnp.int32)
    return images, labels


def _distances(decoder, params, images, key, options, **kwargs):
    run = jax.jit(functools.partial(reconstruction.reconstruction_distances, decoder, options=options, **kwargs),
                  compiler_options=FAST)
    return run(params, images, key)


def _hand_latents(images, key, draws):
    """Each draw's latents, composed by hand: prior N(0, I) from fold_in(key, draw), DPM-Solver++ over the batch."""
    anchors = ENCODER_PARAMS["scale"] * images.reshape(BATCH, -1)[:, :LATENT_DIM]
    return [zoning.compute_latents(anchors, jax.random.normal(jax.random.fold_in(key, d), anchors.shape),
                                   options=LATENT_OPTIONS) for d in range(draws)]


def test_a_straight_field_reconstructs_exactly_when_inverting_to_the_ode_state():
    images, labels = _problem()
    options = reconstruction.ReconstructionOptions(sampler=sampling.EULER.replace(num_steps=3), num_draws=3,
                                                   latent_options=LATENT_OPTIONS)
    assert not options.removes_image_part  # the reference's Euler inversion returns the state
    result = _distances(StraightDecoder(), STRAIGHT_PARAMS, images, jax.random.key(1), options,
                        encoder=PixelEncoder(), encoder_params=ENCODER_PARAMS, labels=labels)
    assert result.distances.shape == (3, BATCH)
    np.testing.assert_array_less(np.asarray(result.distances), 2e-5)


def test_the_reference_rk45_inversion_misses_by_eps_times_the_velocity():
    # Inverting to (x_eps - eps * x) / (1 - eps) on a straight field c gives the noise x - c; regenerating from it
    # ends at x - eps * c, so each image's error is eps * |c| * sqrt(H * W * C), with c from that draw's latent.
    images, labels = _problem(1)
    key = jax.random.key(2)
    options = reconstruction.ReconstructionOptions(sampler=sampling.DOPRI5, num_draws=2, latent_options=LATENT_OPTIONS)
    assert options.removes_image_part  # the reference's form is the default for Dormand-Prince
    result = _distances(StraightDecoder(), STRAIGHT_PARAMS, images, key, options, encoder=PixelEncoder(),
                        encoder_params=ENCODER_PARAMS, labels=labels)

    expected = [1e-3 * np.abs(np.asarray(latents).sum(-1) + np.asarray(labels) + 0.3) * np.sqrt(SIZE * SIZE * CHANNELS)
                for latents in _hand_latents(images, key, 2)]
    np.testing.assert_allclose(result.distances, np.stack(expected), rtol=2e-3, atol=1e-6)
    assert np.abs(np.diff(np.asarray(result.distances), axis=0)).max() > 1e-4  # each draw has its own latents
    assert np.all(np.asarray(result.nfe) > 2)


def test_rectified_flow_baseline_has_one_pass_and_eulers_closed_form_error():
    images, _ = _problem(2)
    rate, steps = 0.5, 4
    options = reconstruction.ReconstructionOptions(sampler=sampling.EULER.replace(num_steps=steps), num_draws=20)
    result = _distances(LinearDecoder(), {"rate": jnp.float32(rate)}, images, jax.random.key(0), options)

    h = (1 - 1e-3) / steps
    expected = abs(1 - (1 - (h * rate) ** 2) ** steps) * np.linalg.norm(np.asarray(images).reshape(BATCH, -1), axis=-1)
    assert result.distances.shape == (1, BATCH)  # no latent, nothing random: measured once
    np.testing.assert_allclose(result.distances[0], expected, rtol=1e-5)
    np.testing.assert_array_equal(result.nfe, 2 * steps)

    summary = reconstruction.reconstruction_result(result, options, weights="raw", has_latent=False)
    assert summary.value == pytest.approx(float(np.mean(expected)), rel=1e-5)
    assert summary.protocol["latent"] == "none (rectified-flow baseline)" and summary.protocol["draws"] == 1


def test_the_ncsnpp_reconstruction_equals_the_hand_composed_one():
    encoder, decoder = models.build({**tiny.ENCODER, **SMALL_TRUNK}), models.build({**tiny.DECODER, **SMALL_TRUNK})
    params = {name: jax.jit(module.init, compiler_options=FAST)(
        jax.random.key(index), *module.example_inputs(1, tiny.SIZE, tiny.CHANNELS))["params"]
        for index, (name, module) in enumerate((("encoder", encoder), ("decoder", decoder)))}
    # The decoder's output convolution starts at zero; noise on every weight makes its velocity depend on its inputs.
    params = tiny.perturbed(params, 0)
    images = tiny.images(5, 6)
    labels = jnp.arange(6, dtype=jnp.int32) % tiny.NUM_CLASSES
    key = jax.random.key(9)
    sampler = sampling.EULER.replace(num_steps=2)
    options = reconstruction.ReconstructionOptions(sampler=sampler, num_draws=2, latent_options=LATENT_OPTIONS)
    run = functools.partial(reconstruction.reconstruction_distances, decoder, encoder=encoder,
                            options=options)
    result = jax.jit(run, compiler_options=FAST)(params["decoder"], images, key, encoder_params=params["encoder"],
                                                 labels=labels)

    @functools.partial(jax.jit, compiler_options=FAST)
    def by_hand(params, images, key, draw):
        anchors = encoder.apply({"params": params["encoder"]}, images, train=False)
        onehot = jax.nn.one_hot(labels, tiny.NUM_CLASSES)
        latents = zoning.compute_latents(anchors, jax.random.normal(jax.random.fold_in(key, draw), anchors.shape),
                                         options=LATENT_OPTIONS)
        noise = sampling.invert_images(decoder, params["decoder"], images, latents=latents,
                                       label_onehot=onehot, options=sampler).x
        again = sampling.sample_images(decoder, params["decoder"], noise, latents=latents,
                                       label_onehot=onehot, options=sampler).x
        return jnp.sqrt(jnp.sum((again - images) ** 2, axis=(1, 2, 3)))

    expected = jnp.stack([by_hand(params, images, key, np.uint32(draw)) for draw in range(2)])
    np.testing.assert_allclose(result.distances, expected, rtol=1e-4, atol=1e-6)
    assert float(jnp.min(expected)) > 1e-3  # two Euler steps are far from exact: the comparison is not of zeros
    assert float(jnp.abs(expected[0] - expected[1]).max()) > 1e-5  # the latents reach the decoder

    summary = reconstruction.reconstruction_result(result, options, labels="true class")
    assert summary.value == pytest.approx(float(jnp.mean(expected)), rel=1e-4)
    assert summary.protocol["draws"] == 2 and summary.protocol["batch_size"] == 6
    assert summary.protocol["weights"] == "EMA" and "Euler, 2 steps" in summary.protocol["sampler"]
    assert summary.protocol["inversion"] == "the ODE state at t = eps"  # the reference's Euler inversion
    assert "reconstruction_l2 = " in str(summary)


def test_a_sharded_batch_is_solved_against_the_whole_batch():
    images, labels = _problem(3)
    key = jax.random.key(4)
    # Euler with the image part removed: the same closed form as Dormand-Prince above, at a fraction of the compile.
    options = reconstruction.ReconstructionOptions(sampler=sampling.EULER.replace(num_steps=2), num_draws=2,
                                                   latent_options=LATENT_OPTIONS, remove_image_part=True)
    kwargs = {"encoder": PixelEncoder(), "encoder_params": ENCODER_PARAMS, "labels": labels}
    plain = _distances(StraightDecoder(), STRAIGHT_PARAMS, images, key, options, **kwargs)
    mesh = parallel.data_mesh(4)
    with jax.set_mesh(mesh):
        sharded_images = jax.device_put(images, parallel.batch_sharding(mesh))
        sharded = _distances(StraightDecoder(), STRAIGHT_PARAMS, sharded_images, key, options, **kwargs)
    # The distances (about 1e-2) are differences of pixels near 1: float32 rounding of those is the tolerance.
    np.testing.assert_allclose(sharded.distances, plain.distances, rtol=1e-4, atol=5e-6)
    assert float(np.max(plain.distances)) > 1e-3


def test_missing_inputs_are_refused_with_a_message():
    images, labels = _problem()
    options = reconstruction.ReconstructionOptions(num_draws=1)
    with pytest.raises(ValueError, match="takes a latent"):
        reconstruction.reconstruction_distances(StraightDecoder(), STRAIGHT_PARAMS, images, jax.random.key(0),
                                                labels=labels, options=options)
    with pytest.raises(ValueError, match="class-conditional"):
        reconstruction.reconstruction_distances(StraightDecoder(), STRAIGHT_PARAMS, images, jax.random.key(0),
                                                encoder=PixelEncoder(), encoder_params=ENCODER_PARAMS,
                                                options=options)
    with pytest.raises(ValueError, match="num_draws"):
        reconstruction.ReconstructionOptions(num_draws=0)
