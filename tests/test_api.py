"""The functional API on a real checkpoint of the tiny joint model (tests/train/tiny.py): what ``load`` reads, each
function against the library calls it composes (a second path), batch independence of inductive classification,
the ambient mesh, no recompilation, and the errors of missing workdirs and checkpoints."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import api, checkpoint, evaluation, parallel, sampling, zoning
from lzn_jax.data.device import to_float_images
from lzn_jax.evaluation import classification
from lzn_jax.train import loop, optim
from lzn_jax.train.state import build_modules
from tests.objectives.tiny import perturbed
from tests.train import tiny

BATCH = 4  # also the number of context images, so that their anchors reuse the program of the batch's
# Two Euler steps: the composition is what is tested, not the integration.
FEW_STEPS = sampling.SamplerOptions(sampler="euler", num_steps=2)
# The second paths compile at XLA's lowest backend optimisation level: the same values, compiled sooner.
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """The API's programs compile at XLA's lowest backend optimisation level too (on top of the platform's options
    that it asks lzn_jax.parallel for): compiling them is most of this file's time, and the values are the same."""
    platform_options = parallel.compiler_options

    def with_fast_compile(platform=None):
        return {**(platform_options(platform) or {}), **FAST}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "compiler_options", with_fast_compile)
        yield


def _random_state(abstract, seed: int):
    """A train state of the shapes of ``abstract`` with random weights (no compiled init: the tiny NCSN++'s init takes
    longer to compile than the rest of this file's setup): kernels N(0, 1 / fan-in), norm scales near 1, biases
    near 0, label anchors N(0, 1); optimiser moments and counters zero."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or "opt_state" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        noise = rng.standard_normal(leaf.shape)
        if "label_anchors" in name:
            values = noise
        elif len(leaf.shape) >= 2:
            values = noise / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            values = ("scale" in name) + 0.1 * noise
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A joint-model workdir as a training run leaves it: config.json and checkpoints of steps 0 and 5, whose raw and
    EMA weights all differ."""
    config = tiny.joint()
    modules = build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = loop.abstract_train_state(config, modules, optimizer, one_device)
    directory = tmp_path_factory.mktemp("api_workdir")
    (directory / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    states = {}
    with checkpoint.Checkpointer(directory / "checkpoints", async_save=False, handle_sigterm=False) as writer:
        for step in (0, 5):
            state = _random_state(abstract, step)
            states[step] = state.replace(step=jnp.int32(step), ema_params=perturbed(state.params, step, scale=0.05))
            writer.save(step, states[step], force=True)
    return directory, states


@pytest.fixture(scope="module")
def model(workdir):
    return api.load(workdir[0])


@pytest.fixture(scope="module")
def images():
    """(2 * BATCH, 8, 8, 1) uint8: a batch and as many context images."""
    return np.random.default_rng(0).integers(0, 256, (2 * BATCH, 8, 8, 1), dtype=np.uint8)


def _leaves_equal(actual, expected) -> bool:
    a, e = jax.tree.leaves(actual), jax.tree.leaves(expected)
    return len(a) == len(e) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, e))


@functools.cache
def _encoder(model):
    return jax.jit(lambda params, images: model.modules.encoder.apply({"params": params}, to_float_images(images),
                                                                      train=False), compiler_options=FAST)


def _encoder_anchors(model, images):
    return _encoder(model)(model.params["encoder"], images)


def _label_table(model):
    return model.modules.label_anchors.apply({"params": model.params["label_anchors"]})


# ------------------------------------------------------------------------------------------------ load


def test_load_reads_the_newest_ema_weights_or_the_raw_ones(workdir, model):
    directory, states = workdir
    assert model.step == 5 and model.ema
    assert _leaves_equal(model.params, states[5].ema_params)
    assert model.modules == build_modules(tiny.joint())
    assert model.image_shape == (8, 8, 1) and model.num_classes == 10
    raw = api.load(directory, ema=False)
    assert not raw.ema and _leaves_equal(raw.params, states[5].params)
    assert not _leaves_equal(raw.params, model.params)
    first = api.load(directory, step=0)
    assert first.step == 0 and _leaves_equal(first.params, states[0].ema_params)


def test_missing_workdir_config_checkpoint_or_step_is_named(workdir, tmp_path):
    directory, _ = workdir
    (tmp_path / "other_run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no workdir .*missing.*holds: other_run/"):
        api.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"has no config.json.*holds: nothing"):
        api.load(tmp_path / "other_run")
    (tmp_path / "other_run" / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"holds no complete checkpoint.*holds: config.json"):
        api.load(tmp_path / "other_run")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 .*available steps: 0, 5"):
        api.load(directory, step=7)


def test_bad_inputs_are_refused_before_anything_runs(model, images):
    rng = jax.random.key(0)
    with pytest.raises(ValueError, match=r"images must be \(B, 8, 8, 1\).*got shape \(4, 8, 8, 3\)"):
        api.anchors(model, np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="inductive classification needs context"):
        api.classify(model, images[:BATCH], rng, mode="inductive")
    with pytest.raises(ValueError, match="context has latent dimension 5, expected 4"):
        api.latents(model, images[:BATCH], rng, context=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"labels must be \(4,\) integers"):
        api.reconstruct(model, images[:BATCH], rng, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="sampler='rk45' does not exist"):
        api.generate(model, rng, BATCH, labels=np.arange(BATCH), sampler="rk45")


# ---------------------------------------------------------------------------------- the second paths


def test_anchors_embed_and_latents_are_the_library_calls(model, images):
    batch, rng = images[:BATCH], jax.random.key(1)
    expected = _encoder_anchors(model, batch)
    np.testing.assert_allclose(api.anchors(model, batch), expected, rtol=1e-5, atol=1e-6)
    # An NCSN++ encoder has no backbone output: its embedding is its anchors. Float input in [-1, 1] is the same.
    np.testing.assert_allclose(api.embed(model, to_float_images(batch)), expected, rtol=1e-5, atol=1e-6)

    latents = api.latents(model, batch, rng, prior_scale=0.5)
    noise = 0.5 * jax.random.normal(rng, expected.shape, jnp.float32)
    reference = zoning.compute_latents(expected, noise, options=classification.IMAGE_LATENT_OPTIONS)
    assert latents.shape == (BATCH, 4)
    np.testing.assert_allclose(latents, reference, rtol=1e-4, atol=1e-5)


def test_transductive_classification_is_evaluation_classify(model, images):
    batch, rng = images[:BATCH], jax.random.key(2)
    predicted = api.classify(model, batch, rng)
    library = jax.jit(functools.partial(evaluation.classify, model.modules.encoder), compiler_options=FAST)
    expected = library(model.params["encoder"], _label_table(model), to_float_images(batch), rng)
    assert predicted.shape == (BATCH,) and predicted.dtype == jnp.int32
    np.testing.assert_array_equal(predicted, expected)


def test_inductive_latents_and_classes_do_not_depend_on_batch_mates(model, images):
    batch, rng = images[:BATCH], jax.random.key(3)
    context = api.anchors(model, images[BATCH:])  # (BATCH, 4): any number of context rows works
    inductive = np.asarray(api.latents(model, batch, rng, context=context))

    # Second path: each row alone, against the context plus its own anchor.
    own = _encoder_anchors(model, batch)
    noise = jax.random.normal(rng, own.shape, jnp.float32)
    for row in range(BATCH):
        zones = jnp.concatenate([context, own[row:row + 1]])
        alone = zoning.compute_latents(own[row:row + 1], noise[row:row + 1], context=zones,
                                       options=classification.IMAGE_LATENT_OPTIONS)
        np.testing.assert_allclose(inductive[row], alone[0], rtol=1e-4, atol=1e-5)
    table = _label_table(model)
    endpoints = zoning.assign_targets(inductive, table, jnp.zeros(BATCH, jnp.int32),
                                      options=classification.LABEL_FLOW_OPTIONS).endpoints
    predicted = api.classify(model, batch, rng, mode="inductive", context=context)
    np.testing.assert_array_equal(predicted, classification.nearest_label(endpoints, table))

    # Other batch-mates for image 0: its inductive latent and class stay, its transductive latent moves.
    mates = np.concatenate([batch[:1], 255 - batch[1:]])
    np.testing.assert_allclose(api.latents(model, mates, rng, context=context)[0], inductive[0], rtol=1e-6, atol=1e-7)
    assert api.classify(model, mates, rng, mode="inductive", context=context)[0] == predicted[0]
    transductive = api.latents(model, batch, rng)[0]
    assert np.abs(np.asarray(api.latents(model, mates, rng)[0] - transductive)).max() > 1e-3


def test_generate_is_the_label_flow_and_the_sampler(model):
    rng, labels = jax.random.key(4), np.array([3, 1, 4, 1])
    generated = api.generate(model, rng, BATCH, labels=labels, sampler=FEW_STEPS)
    assert generated.shape == (BATCH, 8, 8, 1) and generated.dtype == jnp.float32

    noise_key, latent_key = jax.random.split(rng)
    noise = jax.random.normal(noise_key, (BATCH, 8, 8, 1), jnp.float32)
    prior = sampling.unconditional_latents(latent_key, BATCH, 4)
    latents = sampling.class_conditional_latents(_label_table(model), jnp.asarray(labels), prior)
    library = jax.jit(functools.partial(sampling.sample_images, model.modules.decoder, options=FEW_STEPS),
                      compiler_options=FAST)
    expected = library(model.params["decoder"], noise, latents=latents, label_onehot=jax.nn.one_hot(labels, 10)).x
    np.testing.assert_allclose(generated, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(generated - noise)).max() > 1e-2  # the decoder moved the noise

    with pytest.raises(ValueError, match="class-conditional .*pass labels"):
        api.generate(model, rng, BATCH)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        api.generate(model, rng, BATCH, labels=np.array([0, 1, 2, 10]))


def test_reconstruct_inverts_then_samples_with_the_image_latent(model, images):
    batch, rng, labels = images[:BATCH], jax.random.key(5), np.array([0, 1, 2, 3])
    result = api.reconstruct(model, batch, rng, labels, sampler=FEW_STEPS)
    assert result.images.shape == result.noise.shape == (BATCH, 8, 8, 1) and result.distances.shape == (BATCH,)

    x = to_float_images(batch)
    own = _encoder_anchors(model, batch)
    latents = zoning.compute_latents(own, jax.random.normal(rng, own.shape, jnp.float32),
                                     options=classification.IMAGE_LATENT_OPTIONS)

    @functools.partial(jax.jit, compiler_options=FAST)
    def library(params, x, latents, onehot):
        conditioning = {"latents": latents, "label_onehot": onehot, "options": FEW_STEPS}
        noise = sampling.invert_images(model.modules.decoder, params, x, **conditioning).x
        return noise, sampling.sample_images(model.modules.decoder, params, noise, **conditioning).x

    noise, regenerated = library(model.params["decoder"], x, latents, jax.nn.one_hot(labels, 10))
    np.testing.assert_allclose(result.noise, noise, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.images, regenerated, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.distances, np.sqrt(np.sum((np.asarray(regenerated) - np.asarray(x)) ** 2,
                                                                axis=(1, 2, 3))), rtol=1e-4)


# ----------------------------------------------------------------------------------- compiling, meshes


def test_a_second_call_and_a_second_load_compile_nothing(workdir, model, images):
    batch, labels = images[:BATCH], np.arange(BATCH)

    def call_all(model, batch, rng):
        return [api.latents(model, batch, rng), api.classify(model, batch, rng),
                api.generate(model, rng, BATCH, labels=labels, sampler=FEW_STEPS),
                api.reconstruct(model, batch, rng, labels, sampler=FEW_STEPS).images]

    first = call_all(model, batch, jax.random.key(6))  # compiles what earlier tests have not
    traces = api.trace_counts()
    again = call_all(model, batch, jax.random.key(7))  # new values, same shapes
    call_all(api.load(workdir[0], step=0), 255 - batch, jax.random.key(6))  # same config: the same programs
    assert api.trace_counts() == traces
    for index in (0, 2, 3):  # the float results moved with the key
        assert np.abs(np.asarray(first[index] - again[index])).max() > 1e-3


def test_the_ambient_mesh_shards_the_batch_when_it_divides(model, images):
    batch, rng = images[:BATCH], jax.random.key(8)
    single = api.latents(model, batch, rng)
    with jax.set_mesh(parallel.data_mesh(2)):
        sharded = api.latents(model, batch, rng)
    assert sharded.sharding.spec == jax.P("data") and len(sharded.sharding.device_set) == 2
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)  # shard_map against the plain solver

    traces = api.trace_counts()
    with jax.set_mesh(parallel.data_mesh(3)):  # 4 rows do not divide over 3 devices: one device, as without mesh
        fallback = api.latents(model, batch, rng)
    assert len(fallback.sharding.device_set) == 1 and api.trace_counts() == traces
    np.testing.assert_array_equal(fallback, single)
